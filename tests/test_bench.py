"""Every benchmark is one command that runs end to end at a tiny size on the CPU (GPU figures: bench/RESULTS.md)."""

import json
from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize("name", ["bench_cosine_loss", "bench_ema", "bench_lamb", "bench_lars"])
def test_bench_tiny_runs_and_writes_rows(name, tmp_path, capsys):
    import importlib

    mod = importlib.import_module(f"bench.{name}")
    out = tmp_path / "rows.jsonl"
    rows = mod.main(["--tiny", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| provider |" in text or "| provider | ms |" in text or " provider " in text
    timed = [r for r in rows if "ms" in r]
    base = "loop" if name == "bench_ema" else "reference"
    want = {"fused", "eager", "compiled"} if name == "bench_cosine_loss" else {"ours", base}
    assert want <= {r["provider"] for r in timed}
    assert all(r["ms"] > 0 for r in timed)
    # every figure names what it rests on: --tiny is 1 warm-up and 3 timed repetitions (bench.timing.TINY)
    assert all((r["samples"], r["warmup"], r["timer"]) == (3, 1, "perf_counter") and r["p20"] <= r["ms"] <= r["p80"]
               for r in timed)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(rows)
    for r in lines:
        assert {"device", "torch", "triton", "git", "date"} <= r.keys()


def test_bench_data_tiny(tmp_path, capsys):
    import multiprocessing

    from bench import bench_data

    rows = bench_data.main(["--tiny", "--jpeg-dir", str(tmp_path / "j"), "--out", str(tmp_path / "rows.jsonl")])
    paths = {r["path"]: r for r in rows}
    assert paths["cifar_device"]["img_per_s"] > 0 and paths["torchvision_cpu_baseline"]["img_per_s"] > 0
    timed = [r for r in rows if r.get("img_per_s")]
    # warm-up: the tiny count (1) or a whole epoch of a loader that has a length; then >= 2 epochs timed
    assert all(r["warmup_batches"] >= 1 and r["batches"] >= max(3, 2 * r["warmup_batches"]) and r["children_left"] == 0
               for r in timed), [(r["path"], r["batches"], r["warmup_batches"]) for r in timed]
    assert multiprocessing.active_children() == []  # every path's workers were shut down
    sizes = [p.stat().st_size for p in (tmp_path / "j" / "train").rglob("*.jpg")]
    assert len(sizes) == 32 and 40_000 < sum(sizes) / len(sizes) < 120_000  # photo-like 500x375 JPEGs
    # each row names the pipeline it measured (DALI with `cuda` unindexed once measured its CPU pipeline as "GPU")
    cuda = torch.cuda.is_available()
    nv = paths["torchvision_nvjpeg" if cuda else "torchvision_decode_jpeg_cpu"]
    assert ("nvJPEG decode on cuda:" if cuda else "decode_jpeg on the CPU") in nv["note"]
    dali = paths.get("dali") or paths["dali_cpu_only"]
    assert dali["img_per_s"] is None or ("GPU mixed decode (nvJPEG) on cuda:" if cuda else "DALI CPU-only") in dali["note"]


def test_benchmark_jpegs_are_made_in_parallel_once_and_deterministically(tmp_path):
    from bench.bench_data import make_jpegs

    a = make_jpegs(tmp_path / "a", 6, size=(64, 48), procs=2)
    b = make_jpegs(tmp_path / "b", 6, size=(64, 48), procs=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files) == 6 and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    stamp = {f: (a / f).stat().st_mtime_ns for f in files}
    make_jpegs(tmp_path / "a", 8, size=(64, 48))  # the data and e2e benchmarks share one folder: only the missing are made
    assert all((a / f).stat().st_mtime_ns == stamp[f] for f in files) and len(list(a.rglob("*.jpg"))) == 8


def test_bench_step_tiny(tmp_path):
    """The fast step in its GPU configuration on the CPU: channels-last, bf16 autocast, fused losses,
    FusedLARS and the EMA kernel under the interpreter (a tiny backbone; ResNet-18 would take minutes)."""
    from bench import bench_step

    out = tmp_path / "rows.jsonl"
    rows = bench_step.main(["--tiny", "--out", str(out)])
    variants = [r["variant"] for r in rows]
    assert variants[0] == "a_reference" and variants[1] == "c_backbone_floor" and variants[2].startswith("b_fast")
    fast = rows[2]
    assert fast["channels_last"] is True and fast["optimizer"] == "FusedLARS"
    timed = rows[:4]
    assert fast["b_over_a"] > 0 and fast["b_over_c"] > 0 and all(r["views_per_s"] > 0 for r in timed)
    assert all(r["first_call_s"] > 0 and (r["samples"], r["warmup"]) == (3, 1) for r in timed)
    assert [r["variant"] for r in rows[2:]] == ["b_fast(compile=none=auto,graph=off)", "b_fast(compile=none=auto,graph=static)",
                                                "decision(train.graph, compile=none)"]
    decision = rows[-1]  # what train.graph=auto would rest on: both modes' samples and spread
    assert decision["decision"] == "train.graph" and set(decision["rests_on"]) == {"off", "static"}
    assert all(v["samples"] == 3 for v in decision["rests_on"].values())
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["variant"] for r in written] == variants  # every row on disk, in the order measured


def test_e2e_and_vssl_vs_byol_commands_tiny(cifar_tiny_tar, tmp_path, monkeypatch):
    from bench import bench_e2e, vssl_vs_byol

    # the train.py subprocesses run the CPU reference path, not the (slow) Triton interpreter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    # the step benchmark's row at 32 px comes from a rows file (as gpu_check's step stage leaves it); 64 px is timed here
    step_rows = tmp_path / "step.jsonl"
    step_rows.write_text(json.dumps({"bench": "step", "px": 32, "batch": 8, "variant": "b_fast(compile=none=auto,graph=off)",
                                     "views_per_s": 100.0}) + "\n")
    rows = bench_e2e.main(["--tiny", "--cifar", str(cifar_tiny_tar), "--work", str(tmp_path / "e2e"), "--out", "",
                           "--step-rows", str(step_rows)])
    assert {r["path"] for r in rows} == {"cifar_gpu", "jpeg_folder"} and all(r["train_views_per_s"] > 0 for r in rows)
    by = {r["path"]: r for r in rows}
    assert by["cifar_gpu"]["step_bench_views_per_s"] == 100.0 and by["cifar_gpu"]["step_bench_from"] == "step stage"
    assert by["jpeg_folder"]["step_bench_from"] == "timed here" and by["jpeg_folder"]["step_bench_views_per_s"] > 0
    from vssl_fast.data.folder import dali_available  # each row names the pipeline that fed the run (results.json)

    fed = by["jpeg_folder"]["data_loader"]
    assert ("DALI CPU-only decode" if dali_available()[0] else "torchvision ImageFolder, PIL") in fed, fed
    assert by["cifar_gpu"]["data_loader"], by["cifar_gpu"]
    rows, summary = vssl_vs_byol.main(["--tiny", "--cifar", str(cifar_tiny_tar), "--epochs", "1",
                                       "--work", str(tmp_path / "cmp"), "--out", "", f"--data.cache_dir={tmp_path / 'c'}"])
    assert [r["method"] for r in rows] == ["vssl", "byol", "vssl"]
    for r in rows:  # the table comes from each run's own results.json
        res = json.loads((Path(r["run_dir"]) / "results.json").read_text())
        assert Path(r["run_dir"]).parent.parent == tmp_path / "cmp" and Path(r["run_dir"]).name == f"{r['method']}_{r['run']}"
        assert r["online_top1"] == res["online_top1"] and r["knn_k200_top1"] == res["knn_k200_t0.1_top1"]
    assert summary["vssl_repeat_spread_online"] == 0.0  # same seed, same CPU: identical


def test_gpu_check_runs_real_tiny_stages_and_leaves_few_files(tmp_path):
    """The device command end to end on the CPU with tiny stages, in priority order, each stage's
    rows on disk, the summary against every goal, <= 6 files. The caps here are hang guards (600 s
    for stages that take seconds): budgets and cuts are tested on a fake clock below."""
    from bench import gpu_check

    out = tmp_path / "out"
    guards = [a for st in ("tests", "tune", "ema") for a in ("--cap", f"{st}=600")]
    rc = gpu_check.main(["--tiny", "--budget-s", "3600", "--stages", "tests,tune,ema", *guards, "--out", str(out)])
    assert rc == 0
    stages = {s["stage"]: s for s in json.loads((out / "stages.json").read_text())}
    assert list(stages) == ["tests", "tune", "ema"] and all(s["rc"] == 0 for s in stages.values())
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert {r["bench"] for r in rows} == {"tune_launch", "ema"} and all("first_call_s" in r for r in rows)
    assert {r["launch"] for r in rows} == {"interpreter"}  # every row says which launch settings it ran with
    summary = (out / "summary.md").read_text()
    assert "| ema | provider=ours | vs_flat |" in summary and "not measured" in summary
    files = sorted(p.name for p in out.iterdir())
    assert files == ["env.txt", "launch_table.json", "logs.tar.gz", "rows.jsonl", "stages.json", "summary.md"]


class _FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _fake_runner(gpu_check, out, clock, durations, needs_rc=0, calls=None, checks=None):
    """Stages that take ``durations[name]`` fake seconds (cut when over their limit); needs checks answer
    ``needs_rc`` and take NEED_CHECK_S each (listed in ``checks``), env.txt's three commands ENV_S in all."""
    names = {}
    for st in gpu_check.stages(out, ".gpu/cifar10-jpeg.tar.gz"):
        names[tuple(st.cmd)], names[tuple(st.tiny_cmd)] = st.name, st.name

    def runner(cmd, env, timeout):
        if tuple(cmd) not in names:
            if cmd[-1].startswith("import torch, triton, platform") or cmd[0] in ("nvidia-smi", "git"):
                clock.t += gpu_check.ENV_S / 3  # env.txt
                return 0, "fake"
            clock.t += gpu_check.NEED_CHECK_S  # a needs check (python -c 'import torch; assert cuda')
            if checks is not None:
                checks.append(cmd[-1])
            return needs_rc, "" if needs_rc == 0 else "AssertionError: no CUDA device"
        name = names[tuple(cmd)]
        if calls is not None:
            calls.append((name, timeout))
        if durations[name] > timeout:
            clock.t += timeout
            return None, f"{name} partial"
        clock.t += durations[name]
        return 0, f"{name} ok"

    return runner


def test_gpu_check_budget_cuts_and_skips_on_a_fake_clock(tmp_path):
    """A stage over its cap is cut and recorded so, a stage without budget is skipped, either fails the run."""
    from bench import gpu_check

    out, clock = tmp_path / "out", _FakeClock()
    runner = _fake_runner(gpu_check, out, clock, {"tests": 30, "tune": 20, "ema": 10, "step": 50})
    rc = gpu_check.main(["--tiny", "--budget-s", "240", "--stages", "tests,tune,ema,step", "--cap", "step=2",
                         "--out", str(out)], runner=runner, clock=clock)
    assert rc == 1  # the cut stage makes the run incomplete
    stages = {s["stage"]: s for s in json.loads((out / "stages.json").read_text())}
    assert list(stages) == ["tests", "tune", "ema", "step"]
    assert [stages[n]["rc"] for n in ("tests", "tune", "ema")] == [0, 0, 0] and stages["ema"]["seconds"] == 10
    assert stages["step"]["rc"] is None and "cut at its 2 s limit" in stages["step"]["note"]

    out2, clock2 = tmp_path / "out2", _FakeClock()
    clock2.t = 0.0
    rc = gpu_check.main(["--tiny", "--budget-s", "100", "--stages", "tests,ema", "--out", str(out2)],
                        runner=_fake_runner(gpu_check, out2, clock2, {"tests": 90, "ema": 1}), clock=clock2)
    info = json.loads((out2 / "stages.json").read_text())
    assert rc == 1 and info[0]["rc"] is None and info[1]["note"].startswith("skipped")  # 100 - 15 reserve: tests cut at 85


@pytest.mark.parametrize("call", ["kernels", "data", "rest"])
def test_the_planned_caps_fit_each_call_at_the_default_budget(tmp_path, call, monkeypatch):
    """Each call's stages at their full caps (every one cut at its limit) still all start with their whole cap,
    with env.txt and each need's check taking the seconds the plan allows them (a real call, not --tiny:
    its needs are checked, once each)."""
    from bench import gpu_check

    assert gpu_check.check_plan() == []
    monkeypatch.setattr(gpu_check, "_with_dali", lambda env: dict(env, DALI="set up"))  # no bundle here
    out, clock, calls, checks = tmp_path / "out", _FakeClock(), [], []
    caps = {s.name: s.cap_s for s in gpu_check.stages(out, "")}
    runner = _fake_runner(gpu_check, out, clock, {n: 10 * c for n, c in caps.items()}, calls=calls, checks=checks)
    rc = gpu_check.main(["--call", call, "--out", str(out)], runner=runner, clock=clock)
    assert rc == 1 and [n for n, _ in calls] == gpu_check.PLAN[call]["stages"]
    assert all(limit == caps[n] for n, limit in calls)  # nothing squeezed or skipped by another stage's time
    assert len(checks) == len({need for st in gpu_check.stages(out, "") if st.name in gpu_check.PLAN[call]["stages"]
                               for need in st.needs})  # each need checked once
    assert clock.t + gpu_check.RESERVE_S <= gpu_check.PLAN[call]["budget_s"] <= gpu_check.CALL_BUDGET_S <= 540


def test_each_session_fits_its_device_time_with_one_start():
    """15 minutes of device time per session, starts and idle waits included: one start, then the session's
    calls back to back (the first plan's two 540 s calls came to 1,200 s and more)."""
    from bench import gpu_check

    assert {c["session"] for c in gpu_check.PLAN.values()} == {1, 2}
    assert gpu_check.session_s(1) == gpu_check.START_S + 480 + 240 + 2 * gpu_check.TRANSFER_S <= gpu_check.SESSION_S
    assert any("session 1" in p for p in gpu_check.check_plan(session_limit_s=700))
    assert [n for c in gpu_check.PLAN.values() for n in c["stages"]].count("tests") == 1


def test_the_plan_check_catches_caps_over_budget_and_carries_over_the_limit():
    from bench import gpu_check

    assert any("caps add up" in p for p in gpu_check.check_plan(caps={"step": 400}))
    assert any("under its minimum" in p for p in gpu_check.check_plan(caps={"data": 10}))
    assert gpu_check.check_plan(parts_mib=[49.0]) == []  # the pruned bundle as built on 2026-12-01
    assert any("call data carries" in p for p in gpu_check.check_plan(parts_mib=[62.0, 62.0, 40.0]))  # the shared tool's


def test_the_working_tree_fits_beside_what_the_device_calls_carry():
    """The plan counts the tree at TREE_MIB beside the CIFAR tar and the DALI parts."""
    import subprocess

    from bench import gpu_check

    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=gpu_check.REPO, capture_output=True, text=True,
                               timeout=60, check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    size = sum((gpu_check.REPO / f).stat().st_size for f in files if f and (gpu_check.REPO / f).is_file())
    assert size < gpu_check.TREE_MIB * 2**20, f"the tree is {size / 2**20:.2f} MiB: raise TREE_MIB and re-check the plan"


def test_a_stage_that_cannot_measure_fails_the_call_without_running(tmp_path):
    """Off --tiny, a stage needing CUDA (or DALI) fails at once when its need is missing; nothing is 'not measured' quietly."""
    from bench import gpu_check

    out, clock, calls = tmp_path / "out", _FakeClock(), []
    runner = _fake_runner(gpu_check, out, clock, {"tests": 1, "ema": 1}, needs_rc=1, calls=calls)
    rc = gpu_check.main(["--call", "kernels", "--stages", "tests,ema", "--out", str(out)], runner=runner, clock=clock)
    info = json.loads((out / "stages.json").read_text())
    assert rc == 1 and calls == [] and [s["rc"] for s in info] == [3, 3]
    assert all(s["note"].startswith("cannot measure: needs CUDA (AssertionError: no CUDA device)") for s in info)


def test_a_stage_over_its_limit_is_cut():
    """The real runner: a child that blocks until it is stopped is cut at its limit, whatever this machine's speed."""
    import sys

    from bench import gpu_check

    rc, _ = gpu_check.run_subprocess([sys.executable, "-c", "import time; time.sleep(3600)"], {}, 1)
    assert rc is None


def test_tune_launch_writes_a_valid_table_and_keeps_rows_when_cut(tmp_path, monkeypatch, capsys):
    """The tuner's plumbing on the CPU (the timings mean nothing here): every candidate's row is
    written as it ends, the table entry is valid, carries provenance and is what the kernels read;
    a spent budget skips families and writes no entry for them."""
    from vssl_fast.kernels import launch

    from bench import tune_launch

    table, rows = tmp_path / "launch_table.json", tmp_path / "rows.jsonl"
    res = tune_launch.main(["--tiny", "--families", "ema,cosine", "--cap", "sm_90", "--table", str(table),
                            "--out", str(rows)])
    assert set(res) == {"ema", "cosine"}
    lines = [json.loads(x) for x in rows.read_text().splitlines()]
    assert {r["family"] for r in lines} == {"ema", "cosine"} and all(r["ms"] > 0 for r in lines)
    assert len(lines) == 2 * 1 + 2 * 4  # two candidates: ema one workload, cosine four
    saved = json.loads(table.read_text())
    launch.validate_table(saved)
    meta = saved["sm_90"]["_measured"]
    assert meta["command"].startswith("python -m bench.tune_launch") and meta["families"]["ema"]["complete"]
    monkeypatch.setattr(launch, "_tables", {})
    for fam in ("ema", "cosine"):
        assert launch.for_capability(fam, "sm_90", launch.load_table(table)) == res[fam]["best"]
    cut = tune_launch.main(["--tiny", "--families", "lars", "--budget", "0", "--cap", "sm_90", "--table", str(table),
                            "--out", ""])
    assert cut == {} and "lars" not in json.loads(table.read_text())["sm_90"]
    assert "lars: skipped, budget spent" in capsys.readouterr().out


def test_the_dali_sweep_times_the_defaults_first_and_last_and_names_its_choice(tmp_path):
    """The sweep on this machine's DALI (CPU-only mode without a GPU: the plumbing, not a figure)."""
    pytest.importorskip("nvidia.dali", reason="DALI is the optional 'dali' extra")
    import multiprocessing

    from bench.bench_data import make_jpegs, sweep_dali
    from bench.timing import TINY
    from vssl_fast.data.augment import view_specs
    from vssl_fast.data.folder_dali import dali_threads

    rows = []
    train = make_jpegs(tmp_path / "j", 16)
    default = (dali_threads(0), 0.65)
    sweep_dali(train, view_specs("imagenet", "asymmetric", 32), 4, torch.device("cpu"), TINY,
               [(1, 0.65), default], 1000.0, 32, 60, lambda **r: rows.append(r))
    swept = [(r["dali_threads"], r["hw_decoder_load"]) for r in rows[:-1]]
    assert swept == [default, (1, 0.65), default]  # the defaults again last: their drift over the sweep
    assert all(r["path"] == "dali_cpu_only_sweep" and r["img_per_s"] > 0 and r["children_left"] == 0
               for r in rows[:-1])
    assert "1 threads" in rows[1]["note"] and rows[0]["note"].endswith("the defaults")
    last = rows[-1]
    assert last["path"] == "dali_cpu_only_settings" and last["default"]["data.dali_threads"] == 0  # auto
    assert last["choice"] == "keep the defaults" or last["choice"] == {"data.dali_threads": 1,
                                                                        "data.dali_hw_decoder_load": 0.65}
    assert len(last["rests_on"]["defaults, each timing"]) == 2
    assert multiprocessing.active_children() == []


def test_the_device_check_summary_names_the_dali_settings_and_the_launches_per_step():
    from bench import gpu_check
    from bench.bench_data import choose_dali_settings

    assert "--dali-threads" in next(s for s in gpu_check.stages(Path("/tmp/x"), "c.tar") if s.name == "data").cmd
    row = dict(bench="data", path="dali_settings", **choose_dali_settings((8, 0.65), {(8, 0.65): 15000.0,
                                                                                      (4, 0.9): 17000.0},
                                                                           [14800.0, 15000.0]))
    step = dict(bench="step", px=224, batch=32, variant="b_fast(compile=none=auto,graph=on)", host_launches=3,
                gpu_kernels=1400)
    text = gpu_check.summarize([row, step], [])
    assert "DALI settings (dali_settings): {'data.dali_threads': 4, 'data.dali_hw_decoder_load': 0.9}" in text
    assert "224x32 b_fast(compile=none=auto,graph=on): 3 / 1400" in text
