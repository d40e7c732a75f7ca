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
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(rows)
    for r in lines:
        assert {"device", "torch", "triton", "git", "date"} <= r.keys()


def test_bench_data_tiny(tmp_path, capsys):
    from bench import bench_data

    rows = bench_data.main(["--tiny", "--jpeg-dir", str(tmp_path / "j"), "--out", str(tmp_path / "rows.jsonl")])
    paths = {r["path"]: r for r in rows}
    assert paths["cifar_device"]["img_per_s"] > 0 and paths["torchvision_cpu_baseline"]["img_per_s"] > 0
    sizes = [p.stat().st_size for p in (tmp_path / "j" / "train").rglob("*.jpg")]
    assert len(sizes) == 32 and 40_000 < sum(sizes) / len(sizes) < 120_000  # photo-like 500x375 JPEGs
    # each row names the pipeline it measured (DALI with `cuda` unindexed once measured its CPU pipeline as "GPU")
    cuda = torch.cuda.is_available()
    nv = paths["torchvision_nvjpeg" if cuda else "torchvision_decode_jpeg_cpu"]
    assert ("nvJPEG decode on cuda:" if cuda else "decode_jpeg on the CPU") in nv["note"]
    dali = paths.get("dali") or paths["dali_cpu_only"]
    assert dali["img_per_s"] is None or ("GPU mixed decode (nvJPEG) on cuda:" if cuda else "DALI CPU-only") in dali["note"]


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
    assert fast["b_over_a"] > 0 and fast["b_over_c"] > 0 and all(r["views_per_s"] > 0 for r in rows)
    assert all(r["first_call_s"] > 0 for r in rows)
    assert [r["variant"] for r in rows[2:]] == ["b_fast(compile=none=auto,graph=off)", "b_fast(compile=none=auto,graph=static)"]
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["variant"] for r in written] == variants  # every row on disk, in the order measured


def test_e2e_and_vssl_vs_byol_commands_tiny(cifar_tiny_tar, tmp_path, monkeypatch):
    from bench import bench_e2e, vssl_vs_byol

    # the train.py subprocesses run the CPU reference path, not the (slow) Triton interpreter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    rows = bench_e2e.main(["--tiny", "--cifar", str(cifar_tiny_tar), "--work", str(tmp_path / "e2e"), "--out", ""])
    assert {r["path"] for r in rows} == {"cifar_gpu", "jpeg_folder"} and all(r["train_views_per_s"] > 0 for r in rows)
    rows, summary = vssl_vs_byol.main(["--tiny", "--cifar", str(cifar_tiny_tar), "--epochs", "1",
                                       "--work", str(tmp_path / "cmp"), "--out", "", f"--data.cache_dir={tmp_path / 'c'}"])
    assert [r["method"] for r in rows] == ["vssl", "byol", "vssl"]
    for r in rows:  # the table comes from each run's own results.json
        res = json.loads((Path(r["run_dir"]) / "results.json").read_text())
        assert Path(r["run_dir"]).parent.parent == tmp_path / "cmp" and Path(r["run_dir"]).name == f"{r['method']}_{r['run']}"
        assert r["online_top1"] == res["online_top1"] and r["knn_k200_top1"] == res["knn_k200_t0.1_top1"]
    assert summary["vssl_repeat_spread_online"] == 0.0  # same seed, same CPU: identical


def test_gpu_check_runs_stages_under_one_budget_and_leaves_few_files(tmp_path):
    """The device command end to end on the CPU with tiny stages: priority order, a stage cut by its
    limit recorded as cut, a stage without budget skipped, the summary against every goal, <= 8 files."""
    from bench import gpu_check

    out = tmp_path / "out"
    rc = gpu_check.main(["--tiny", "--budget-s", "240", "--stages", "tests,tune,ema,step", "--cap", "step=2",
                         "--out", str(out)])
    assert rc == 1  # the cut stage makes the run incomplete
    stages = {s["stage"]: s for s in json.loads((out / "stages.json").read_text())}
    assert list(stages) == ["tests", "tune", "ema", "step"]
    assert stages["tests"]["rc"] == 0 and stages["tune"]["rc"] == 0 and stages["ema"]["rc"] == 0
    assert stages["step"]["rc"] is None and "cut" in stages["step"]["note"]
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert {r["bench"] for r in rows} == {"tune_launch", "ema"} and all("first_call_s" in r for r in rows)
    assert {r["launch"] for r in rows} == {"interpreter"}  # every row says which launch settings it ran with
    summary = (out / "summary.md").read_text()
    assert "| ema | provider=ours | vs_flat |" in summary and "not measured" in summary
    files = sorted(p.name for p in out.iterdir())
    assert files == ["env.txt", "launch_table.json", "logs.tar.gz", "rows.jsonl", "stages.json", "summary.md"]

    out2 = tmp_path / "out2"
    gpu_check.main(["--tiny", "--budget-s", "5", "--stages", "ema", "--out", str(out2)])
    (only,) = json.loads((out2 / "stages.json").read_text())
    assert only["stage"] == "ema" and only["note"].startswith("skipped")


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
