"""The prepared device check: correctness first, every stage capped, planned for the device's time.

    OUT=/path python -m bench.gpu_check --call kernels   # session 1, call 1: tests, tune, ema, lars, lamb, step, e2e_cifar
    OUT=/path python -m bench.gpu_check --call data      # session 1, call 2: dali, jpegs, dali_tests, data
    OUT=/path python -m bench.gpu_check --call rest      # a later session: cosine, dali, jpegs, e2e_jpeg
    python -m bench.gpu_check --plan                     # the plan (sessions, calls, caps, carries), checked
    python -m bench.gpu_check --tiny --call kernels --budget-s 600 --out /tmp/check   # the CPU test of this command

Runs from the source tree on a bare device machine (no install, no network). A session has 15
minutes of device time in all (``SESSION_S``), a fresh machine's start (a minute or more,
``START_S``) and every idle wait included, at most 10 minutes a command; a machine goes back after
~30 s idle; the tool carries at most 64 MiB per call, the working tree included. Hence the plan
(``PLAN``; ``--plan`` prints it and checks it): one session runs one start and two calls back to
back, 120 + 480 + 240 s and 20 s of transfers per call, 880 s of its 900:

- **call 1, ``kernels``** (480 s): CUDA correctness (the kernel, loss, step, evaluation and data
  tests), the launch tuner, the EMA / LARS / LAMB benchmarks, the step grid (with launches per
  step profiled) and the end-to-end CIFAR run. Carries the CIFAR tar (19.6 MB) in ``.gpu/``;
- **call 2, ``data``** (240 s, issued as soon as call 1 returns, while the machine is warm): the DALI
  bundle set up (``bench.dali_bundle install``, checked with a GPU decode), the 4,096 benchmark JPEGs
  made once with every core, the DALI tests and the data-path benchmark (DALI's
  ``data.dali_threads`` x ``data.dali_hw_decoder_load`` swept last, for their defaults). Carries
  the DALI bundle in ``.gpu/dali/``: one part of 49 MiB (``bench.dali_bundle``: sm_90 code only,
  symbols stripped, what the JPEG path never loads left out, xz -9e; the shared tool's bundle was
  three parts of up to 62 MiB);
- **call 3, ``rest``** (a later session's device time): the cosine-loss benchmark and the
  end-to-end JPEG-folder run, the DALI set-up and JPEGs again on the fresh machine. To run the
  cosine stage with call 1's tuned launch settings, copy call 1's ``launch_table.json`` to
  ``.gpu/launch_table.json`` and carry it too (else the defaults, and every row says which).

The caps of a call's stages add up to at most its budget less what it spends outside them (a
reserve, env.txt, one check per distinct need: ``fixed_s``; ``check_plan``, tested on the CPU with
those seconds charged), so no stage is skipped for time another took; a stage still gets at most
what is left.
A stage that cannot measure what it exists for (no CUDA; DALI missing) fails without running,
so the call fails. Every benchmark appends its JSON rows as each case ends, so a stage cut by its
limit keeps what it measured; first-time compilation is reported apart (``first_call_s``).

Leaves at most 6 files in OUT: ``env.txt`` (card, driver, versions), ``rows.jsonl`` (every row),
``summary.md`` (every figure against its goal, also printed), ``stages.json`` (each stage's exit
code, seconds, and whether it was cut, skipped or could not measure), ``logs.tar.gz`` (each stage's
full log) and ``launch_table.json`` (the ``tune`` stage's measured launch settings for this card,
which the later stages use; copy it to ``kernels/launch_table.json`` to make it the product's).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESERVE_S = 15  # kept back from a call's budget: the summary, the log bundle, Python start-up
ENV_S = 10  # env.txt: nvidia-smi and a child importing torch and triton (cold), before the first stage
NEED_CHECK_S = 10  # one child per distinct need of a call ('cuda': import torch + CUDA init; 'dali'), checked once
CALL_BUDGET_S = 540  # the most any one call is planned for: a command may run 10 minutes
SESSION_S = 900  # a session's device time in all (the device tool: 15 minutes, starts and idle waits included)
START_S = 120  # a fresh machine's start ("a minute or more"), counted once per session
TRANSFER_S = 20  # per call: the tree and its carries out, OUT's files back
SETUP_STAGES = {"dali", "jpegs"}  # set-up a fresh machine needs again: may be in every call that needs it
CARRY_MIB = 64  # what the device tool carries per call, the working tree included
TREE_MIB = 1.25  # the working tree (1.04 MiB on 2026-12-02; tests/test_bench.py checks it)
CIFAR_MIB = 19.6  # ../shared/data/cifar10-jpeg.tar.gz
TINY_TAR_MIB = 0.6  # .gpu/cifar-tiny.tar: 300 of its JPEGs, what tests/conftest.py extracts
JPEGS = "/tmp/vssl_bench_jpegs"  # made once per machine, shared by data and e2e_jpeg
DALI_CARRIED = ".gpu/dali"  # the bundle's parts, carried by call 2
CARRIED_TABLE = ".gpu/launch_table.json"  # call 1's tuned launch settings, when copied there for call 2
DALI_SWEEP = ("--dali-threads", "4,8", "--dali-hw-load", "0.65,0.9")  # the data stage's sweep for DALI's defaults
DALI_SITE = "/tmp"


@dataclass
class Stage:
    name: str
    cap_s: int  # the most this stage may take
    min_s: int  # not started with less than this left
    cmd: list[str]
    tiny_cmd: list[str]
    needs: tuple[str, ...] = ()  # "cuda", "dali": without it the stage cannot measure what it exists for


def stages(out: Path, cifar: str) -> list[Stage]:
    rows = str(out / "rows.jsonl")
    py = [sys.executable]
    m = lambda mod, *a: py + ["-m", f"bench.{mod}", "--out", rows, *a]  # noqa: E731
    pytest = py + ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    kernel_tests = ["tests/kernels", "tests/test_losses.py", "tests/train/test_step.py", "tests/train/test_graph_step.py",
                    "tests/train/test_gpu_config_on_cpu.py", "tests/train/test_evaluate.py", "tests/data",
                    # issue 25's GPU test (torch's SyncBatchNorm vs ours, 1-rank NCCL, sync debug mode) and the
                    # launch-count guard as CUDA dispatches it
                    "tests/train/test_sync_batchnorm.py::test_cuda_sync_batchnorm_matches_torch_and_never_syncs",
                    "tests/train/test_ddp_graph.py::test_captured_ddp_step_on_one_nccl_rank_matches_the_eager_one",
                    "tests/train/test_dispatch_budget.py::test_fast_step_dispatch_budget"]
    tiny_work = str(out / ".work")
    return [
        # the ahead-of-time compile check needs no GPU (CI runs it); here only what needs the card
        Stage("tests", 130, 60, pytest + [*kernel_tests, "--ignore=tests/kernels/test_aot_compile.py"],
              pytest + ["tests/kernels/test_restore.py"], ("cuda",)),
        Stage("tune", 50, 30, m("tune_launch", "--table", str(out / "launch_table.json"), "--budget", "40"),
              m("tune_launch", "--tiny", "--families", "ema", "--cap", "sm_00", "--table", str(out / "launch_table.json")),
              ("cuda",)),
        Stage("ema", 15, 10, m("bench_ema"), m("bench_ema", "--tiny"), ("cuda",)),
        Stage("lars", 15, 10, m("bench_lars"), m("bench_lars", "--tiny"), ("cuda",)),
        Stage("lamb", 15, 10, m("bench_lamb"), m("bench_lamb", "--tiny"), ("cuda",)),
        Stage("cosine", 90, 30, m("bench_cosine_loss"), m("bench_cosine_loss", "--tiny"), ("cuda",)),
        # 224x32: the per-GPU batch of an 8-GPU ImageNet-100 run, eager vs captured (issue 25); 32x512 last
        Stage("step", 145, 60, m("bench_step", "--cases", "32x256,224x32,224x128,224x256,32x512", "--graph-modes", "off,on",
                                 "--profile-cases", "32x256,224x32"),
              m("bench_step", "--tiny"), ("cuda",)),
        # the step benchmark's row for the same size comes from the step stage when it got that far
        Stage("e2e_cifar", 75, 45, m("bench_e2e", "--paths", "cifar_gpu", "--cifar", cifar, "--work", "/tmp/vssl_e2e",
                                     "--step-rows", rows),
              m("bench_e2e", "--tiny", "--paths", "cifar_gpu", "--cifar", cifar, "--work", tiny_work + "/e2e"), ("cuda",)),
        Stage("dali", 30, 15, py + ["-m", "bench.dali_bundle", "install", DALI_CARRIED, "--dest", DALI_SITE, "--check"],
              py + ["-c", "import nvidia.dali"], ("cuda",)),
        Stage("jpegs", 25, 10, py + ["-m", "bench.bench_data", "--make-jpegs-only", "--jpeg-dir", JPEGS],
              py + ["-m", "bench.bench_data", "--tiny", "--make-jpegs-only", "--jpeg-dir", tiny_work + "/jpegs"]),
        Stage("dali_tests", 45, 30, pytest + ["tests/data", "-k", "dali"], pytest + ["tests/data/test_sources.py"],
              ("cuda", "dali")),
        # DALI's settings swept last (the defaults first and last): a cut keeps the rows above it
        Stage("data", 95, 90, m("bench_data", "--require-dali", "--jpeg-dir", JPEGS, *DALI_SWEEP),
              m("bench_data", "--tiny", "--jpeg-dir", tiny_work + "/jpegs"), ("cuda", "dali")),
        # e2e_jpeg's --cifar is not read (the JPEG-folder run only): call 3 carries no CIFAR tar
        Stage("e2e_jpeg", 135, 90, m("bench_e2e", "--paths", "jpeg_folder", "--cifar", cifar, "--jpeg-dir", JPEGS,
                                     "--work", "/tmp/vssl_e2e"),
              m("bench_e2e", "--tiny", "--paths", "jpeg_folder", "--cifar", cifar, "--jpeg-dir", tiny_work + "/jpegs",
                "--work", tiny_work + "/e2e"), ("cuda", "dali")),
    ]


# The device calls: which session (one session's device time holds one machine start and its calls, back to
# back while the machine is warm), the call's budget, its stages in priority order, what it carries (MiB, the
# tree aside; a call with the dali stage carries the DALI part too).
PLAN = {
    "kernels": {"session": 1, "budget_s": 480, "stages": ["tests", "tune", "ema", "lars", "lamb", "step", "e2e_cifar"],
                "carries": {"CIFAR tar": CIFAR_MIB}},
    "data": {"session": 1, "budget_s": 240, "stages": ["dali", "jpegs", "dali_tests", "data"],
             "carries": {"the tests' CIFAR extract": TINY_TAR_MIB}},
    "rest": {"session": 2, "budget_s": 540, "stages": ["cosine", "dali", "jpegs", "e2e_jpeg"], "carries": {}},
}


def session_s(session: int) -> int:
    """A session's planned device time: one machine start, then its calls back to back, each with its transfers."""
    return START_S + sum(c["budget_s"] + TRANSFER_S for c in PLAN.values() if c["session"] == session)


def dali_parts_mib(manifest: Path | None = None) -> list[float]:
    """The DALI bundle's part sizes (MiB) from its manifest, if one was built (``bench.dali_bundle build``)."""
    manifest = manifest or REPO / DALI_CARRIED / "manifest.json"
    if not manifest.exists():
        return []
    return [v["bytes"] / 2**20 for v in json.loads(manifest.read_text())["parts"].values()]


def prepare(cifar: Path) -> None:
    """What the two calls carry, made here (git-ignored .gpu/): the CIFAR tar (call 1), the tests' tiny
    extract of it (call 2: 20 + 10 JPEGs per class) and the DALI bundle (call 2)."""
    import shutil

    gpu = REPO / ".gpu"
    gpu.mkdir(exist_ok=True)
    if not (gpu / "cifar10-jpeg.tar.gz").exists():
        shutil.copy(cifar, gpu / "cifar10-jpeg.tar.gz")
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import _make_tiny_tar  # the fixture's own extract, so the tests see the same images

    _make_tiny_tar(gpu / "cifar-tiny.tar", 20, 10, src_tar=gpu / "cifar10-jpeg.tar.gz")
    if not (REPO / DALI_CARRIED / "manifest.json").exists():
        from bench.dali_bundle import build

        build(REPO / DALI_CARRIED)
    print("session 1, call 1: carry ['.gpu/cifar10-jpeg.tar.gz'], command: OUT=$OUT bash bench/gpu_check.sh kernels\n"
          f"session 1, call 2 (at once, while warm): carry ['{DALI_CARRIED}', '.gpu/cifar-tiny.tar'], command: "
          "OUT=$OUT bash bench/gpu_check.sh data\n"
          f"a later session, call 3: carry ['{DALI_CARRIED}', '{CARRIED_TABLE}' (call 1's, if copied)], command: "
          "OUT=$OUT bash bench/gpu_check.sh rest")


def fixed_s(call: str, by_name: dict | None = None) -> int:
    """What a call spends outside its stages: the reserve, env.txt, and one check per distinct need."""
    by_name = by_name or {s.name: s for s in stages(Path("/tmp/plan"), ".gpu/cifar10-jpeg.tar.gz")}
    needs = {n for st in PLAN[call]["stages"] for n in by_name[st].needs}
    return RESERVE_S + ENV_S + NEED_CHECK_S * len(needs)


def check_plan(budget_s: float | None = None, caps: dict | None = None, parts_mib: list[float] | None = None,
               session_limit_s: float = SESSION_S) -> list[str]:
    """Problems with the plan (none: it fits): every call's caps within its budget (``budget_s``: one for
    all) less what it spends outside its stages, every cap at least its stage's minimum, every stage in
    exactly one call (set-up stages aside), each session's start and calls within its device time, the
    carries within the tool's limit."""
    caps = caps or {}
    by_name = {s.name: s for s in stages(Path("/tmp/plan"), ".gpu/cifar10-jpeg.tar.gz")}
    problems = []
    planned = [n for call in PLAN.values() for n in call["stages"] if n not in SETUP_STAGES]
    if sorted(planned) != sorted(set(by_name) - SETUP_STAGES):
        problems.append(f"stages in no call or in two: {sorted(set(by_name) - SETUP_STAGES ^ set(planned))}")
    for call, spec in PLAN.items():
        budget = budget_s if budget_s is not None else spec["budget_s"]
        total = sum(caps.get(n, by_name[n].cap_s) for n in spec["stages"])
        fixed = fixed_s(call, by_name)
        if total + fixed > budget:
            problems.append(f"call {call}: caps add up to {total} s + {fixed} s of reserve, env.txt and needs checks "
                            f"> {budget:.0f} s")
        for n in spec["stages"]:
            if caps.get(n, by_name[n].cap_s) < by_name[n].min_s:
                problems.append(f"call {call}: {n}'s cap is under its minimum {by_name[n].min_s} s")
        if budget > CALL_BUDGET_S:
            problems.append(f"call {call}: a budget of {budget:.0f} s leaves no slack in a 600 s command")
    for session in sorted({c["session"] for c in PLAN.values()}):
        if session_s(session) > session_limit_s:
            problems.append(f"session {session}: a start ({START_S} s) and its calls come to {session_s(session)} s "
                            f"> {session_limit_s:.0f} s of device time")
    for call, spec in PLAN.items():  # a call with the dali stage carries the DALI bundle
        load = TREE_MIB + sum(spec["carries"].values()) + (sum(parts_mib or []) if "dali" in spec["stages"] else 0)
        if load > CARRY_MIB:
            problems.append(f"call {call} carries {load:.1f} MiB > {CARRY_MIB} MiB (the tool's limit per call)")
    return problems


def describe_plan(parts_mib: list[float]) -> str:
    by_name = {s.name: s for s in stages(Path("$OUT"), ".gpu/cifar10-jpeg.tar.gz")}
    lines = []
    for k, (call, spec) in enumerate(PLAN.items(), 1):
        total = sum(by_name[n].cap_s for n in spec["stages"])
        carry = dict(spec["carries"])
        if "dali" in spec["stages"] and parts_mib:
            carry[f"the DALI bundle in {DALI_CARRIED}/ ({len(parts_mib)} part{'s' if len(parts_mib) > 1 else ''})"] = round(
                sum(parts_mib), 1)
        lines.append(f"call {k} ({call}, session {spec['session']}): {total} s of caps + {fixed_s(call, by_name)} s "
                     f"(reserve, env.txt, needs checks) <= {spec['budget_s']} s; carries "
                     f"the tree ({TREE_MIB} MiB)" + "".join(f", {n} ({v} MiB)" for n, v in carry.items()))
        lines += [f"  {n}: cap {by_name[n].cap_s} s" + (f", needs {'+'.join(by_name[n].needs)}" if by_name[n].needs else "")
                  for n in spec["stages"]]
    for session in sorted({c["session"] for c in PLAN.values()}):
        calls = [c for c, spec in PLAN.items() if spec["session"] == session]
        lines.append(f"session {session}: a start ({START_S} s) + {' + '.join(calls)} back to back, {TRANSFER_S} s of "
                     f"transfers each: {session_s(session)} s <= {SESSION_S} s of device time")
    if not parts_mib:
        lines.append(f"DALI bundle: not built here (python -m bench.dali_bundle build {DALI_CARRIED}); "
                     "without it calls 2 and 3 fail")
    return "\n".join(lines)


# (bench, row filter, figure, goal as (op, value)): the issues' targets
GOALS = [
    ("ema", {"provider": "ours"}, "vs_flat", ("<=", 1.2)),
    ("ema", {"provider": "ours"}, "gpu_vs_flat", ("<=", 1.2)),
    ("lars", {"provider": "ours"}, "x_roofline", ("<=", 1.5)),
    ("lars", {"provider": "ours"}, "gpu_x_roofline", ("<=", 1.5)),
    ("lamb", {"provider": "ours"}, "x_roofline", ("<=", 1.5)),
    ("lamb", {"provider": "ours"}, "gpu_x_roofline", ("<=", 1.5)),
    ("cosine_loss", {"provider": "fused", "op": "kl_sample", "B": 8192, "d": 2048}, "pct_peak", (">=", 60)),
    ("cosine_loss", {"provider": "fused", "op": "ll", "B": 8192, "d": 2048}, "pct_peak", (">=", 60)),
    ("cosine_loss", {"provider": "fused", "op": "kl_sample", "B": 8192, "d": 2048}, "gpu_pct_peak", (">=", 60)),
    ("cosine_loss", {"provider": "fused", "op": "ll", "B": 8192, "d": 2048}, "gpu_pct_peak", (">=", 60)),
    ("cosine_loss", {"provider": "fused", "op": "kl_sample", "B": 256, "d": 256}, "speedup_vs_compiled", (">=", 1.0)),
    ("cosine_loss", {"provider": "fused", "op": "kl_sample", "B": 256, "d": 256}, "gpu_speedup_vs_compiled",
     (">=", 1.5)),
    ("cosine_loss", {"provider": "fused", "op": "ll", "B": 256, "d": 256}, "gpu_speedup_vs_compiled", (">=", 1.5)),
    ("step", {"px": 32, "batch": 256, "variant": "b_fast*"}, "b_over_a", (">=", 3.5)),
    ("step", {"px": 32, "batch": 256, "variant": "b_fast*"}, "b_over_c", (">=", 1.2)),
    ("step", {"px": 32, "batch": 512, "variant": "b_fast*"}, "b_over_a", (">=", 2.2)),
    ("step", {"px": 32, "batch": 512, "variant": "b_fast*"}, "b_over_c", (">=", 1.0)),
    ("step", {"px": 224, "batch": 128, "variant": "b_fast*"}, "b_over_a", (">=", 1.8)),
    ("step", {"px": 224, "batch": 128, "variant": "b_fast*"}, "b_over_c", (">=", 0.95)),
    ("step", {"px": 224, "batch": 256, "variant": "b_fast*"}, "b_over_a", (">=", 1.8)),
    ("step", {"px": 224, "batch": 256, "variant": "b_fast*"}, "b_over_c", (">=", 0.95)),
    ("e2e", {"path": "cifar_gpu"}, "ratio", (">=", 0.9)),
    ("e2e", {"path": "cifar_gpu"}, "data_wait", ("<=", 0.05)),
    ("e2e", {"path": "jpeg_folder"}, "ratio", (">=", 0.8)),
    ("e2e", {"path": "jpeg_folder"}, "data_wait", ("<=", 0.10)),
    ("data", {"path": "cifar_device"}, "img_per_s", (">=", 150_000)),
    ("data", {"path": "dali"}, "img_per_s", (">=", 15_000)),
    ("data", {"path": "dali"}, "x_cpu_baseline", (">=", 5)),
]


def _match(row: dict, bench: str, flt: dict) -> bool:
    if row.get("bench") != bench:
        return False
    for k, v in flt.items():
        got = row.get(k)
        if isinstance(v, str) and v.endswith("*"):
            if not (isinstance(got, str) and got.startswith(v[:-1])):
                return False
        elif got != v:
            return False
    return True


def summarize(rows: list[dict], stage_info: list[dict]) -> str:
    lines = ["| bench | case | figure | measured | goal | met |", "|---|---|---|---|---|---|"]
    for bench, flt, fig, (op, goal) in GOALS:
        hits = [r for r in rows if _match(r, bench, flt) and r.get(fig) is not None]
        case = ", ".join(f"{k}={v}" for k, v in flt.items())
        if not hits:
            lines.append(f"| {bench} | {case} | {fig} | not measured | {op} {goal} | - |")
            continue
        for r in hits:
            val = r[fig]
            met = val <= goal if op == "<=" else val >= goal
            label = case + (f" [{r['variant']}]" if "variant" in r else "")
            lines.append(f"| {bench} | {label} | {fig} | {val:.4g} | {op} {goal} | {'yes' if met else 'NO'} |")
    lines += ["", "| stage | rc | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s.get('rc', '')} | {s.get('seconds', 0):.0f} | {s.get('note', '')} |" for s in stage_info]
    launches = [r for r in rows if r.get("bench") == "step" and r.get("host_launches") is not None]
    if launches:
        lines += ["", "Launches per step (torch.profiler, one step after the timing; host calls / device kernels):",
                  "; ".join(f"{r['px']}x{r['batch']} {r['variant']}: {r['host_launches']} / {r['gpu_kernels']}"
                            for r in launches)]
    for r in rows:
        if r.get("bench") == "data" and str(r.get("path", "")).endswith("_settings"):
            lines += ["", f"DALI settings ({r['path']}): {r['choice']}; fastest {r['fastest']} at x{r['x_default']:.3f} "
                          f"the defaults (needed > x{1 + r['needed_gain']:.3f}); images/s: {r['rests_on']}"]
    compile_s = [(r.get("bench"), r.get("provider") or r.get("variant"), r["first_call_s"]) for r in rows
                 if r.get("first_call_s")]
    if compile_s:
        lines += ["", "First calls (compilation; excluded from every timing):",
                  ", ".join(f"{b}/{p} {s:.1f} s" for b, p, s in compile_s)]
    return "\n".join(lines) + "\n"


def _env_text(runner) -> str:
    """env.txt: the card, the versions, the commit, the date (through ``runner``: its seconds count, ``ENV_S``)."""
    code = ("import torch, triton, platform; "
            "print(torch.__version__, torch.version.cuda, triton.__version__, platform.python_version())")
    out = []
    for cmd, limit, prefix in ((["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"], 30, ""),
                               ([sys.executable, "-c", code], 120, ""), (["git", "rev-parse", "--short", "HEAD"], 10, "git ")):
        rc, text = runner(cmd, dict(os.environ), limit)
        out.append(prefix + text.strip() if rc == 0 else f"{cmd[0]}: {'timed out' if rc is None else text.strip()[-200:]}")
    return "\n".join(out) + f"\ndate {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"


def _needs_met(needs: tuple[str, ...], env: dict, runner, known: dict[str, str]) -> str:
    """'' when every need is there, else what is missing (checked in a child with the stages' environment,
    once per need: ``known`` keeps each answer until the environment changes; the plan counts
    ``NEED_CHECK_S`` per distinct need)."""
    checks = {"cuda": "import torch; assert torch.cuda.is_available(), 'no CUDA device'",
              "dali": "import torch, nvidia.dali"}
    for need in needs:
        if need not in known:
            rc, text = runner([sys.executable, "-c", checks[need]], env, 120)
            last = (text.strip().splitlines() or ["?"])[-1]
            known[need] = "" if rc == 0 else f"needs {need.upper() if need == 'cuda' else 'DALI'} ({last[:160]})"
        if known[need]:
            return known[need]
    return ""


def run_subprocess(cmd: list[str], env: dict, timeout: float) -> tuple[int | None, str]:
    """(exit code, output) of ``cmd``; (None, output so far) when cut at ``timeout``."""
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        return None, _text(e.stdout) + _text(e.stderr)
    except OSError as e:  # no such program (nvidia-smi on a CPU machine)
        return 127, str(e)


def main(argv=None, *, runner=run_subprocess, clock=time.monotonic, extra_stages: list[Stage] = ()) -> int:
    """``runner(cmd, env, timeout) -> (rc or None when cut, text)`` and ``clock`` are the tests' seams."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--call", choices=sorted(PLAN), default=None, help="one of the plan's two device calls")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for the call's stages together (default: "
                    "the call's in PLAN, else 540)")
    ap.add_argument("--stages", default=None, help="a subset (default: the call's), run in priority order")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--cifar", default=".gpu/cifar10-jpeg.tar.gz",
                    help="the CIFAR-10 JPEG tar, carried into a git-ignored folder")
    ap.add_argument("--tiny", action="store_true", help="tiny stages, needs not enforced: the CPU test of this command")
    ap.add_argument("--cap", action="append", default=[], metavar="STAGE=SECONDS", help="override a stage's cap")
    ap.add_argument("--plan", action="store_true", help="print the plan, check it, and exit (1 if it does not fit)")
    ap.add_argument("--prepare", metavar="CIFAR_TAR", default=None,
                    help="here, before the calls: copy the CIFAR tar into .gpu/, write the tests' tiny extract, build "
                         "the DALI bundle into .gpu/dali (minutes, once), print the plan")
    a = ap.parse_args(argv)
    caps = {}
    for c in a.cap:
        name, _, secs = c.partition("=")
        caps[name] = float(secs)
    if a.prepare:
        prepare(Path(a.prepare))
    if a.plan or a.prepare:
        parts = dali_parts_mib()
        print(describe_plan(parts))
        problems = check_plan(a.budget_s, caps, parts)
        print("\n".join(problems) if problems else "the plan fits")
        return 1 if problems else 0
    t_start = clock()
    budget = a.budget_s if a.budget_s is not None else PLAN[a.call]["budget_s"] if a.call else CALL_BUDGET_S
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "env.txt").write_text(_env_text(runner))
    all_stages = [*stages(out, a.cifar), *extra_stages]
    known = {st.name for st in all_stages}
    if a.stages is not None:
        wanted = [x for x in a.stages.split(",") if x]
    elif a.call is not None:
        wanted = PLAN[a.call]["stages"]
    else:
        ap.error(f"--call {'|'.join(PLAN)} (the plan's device calls) or --stages")
    unknown = set(wanted) - known
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if "tune" in wanted:  # this run's measurement only: never a table left in OUT by an earlier run
        (out / "launch_table.json").unlink(missing_ok=True)
    elif (REPO / CARRIED_TABLE).exists():  # call 1's table, carried into call 2 (rows say which: 'launch')
        env["VSSL_LAUNCH_TABLE"] = str(REPO / CARRIED_TABLE)
    if a.tiny:
        env.setdefault("TRITON_INTERPRET", "0" if _has_cuda() else "1")
    if not a.tiny and Path(DALI_SITE, "dalisite", "nvidia", "dali").is_dir():  # set up by an earlier call's dali stage
        env = _with_dali(env)
    info, logs, met = [], {}, {}
    for st in all_stages:
        if st.name not in wanted:
            continue
        missing = "" if a.tiny else _needs_met(st.needs, env, runner, met)
        if missing:  # it could not measure what it exists for: a failure, not a quiet 'not measured'
            info.append(dict(stage=st.name, rc=3, seconds=0.0, note=f"cannot measure: {missing}"))
            print(f"== {st.name}: cannot measure: {missing}", flush=True)
            continue
        left = budget - (clock() - t_start) - RESERVE_S  # after the needs check: its seconds are spent
        limit = min(caps.get(st.name, st.cap_s), left)
        if limit < (1 if a.tiny else st.min_s):
            info.append(dict(stage=st.name, note=f"skipped: {left:.0f} s left, needs {st.min_s}"))
            print(f"== {st.name}: skipped ({left:.0f} s left)", flush=True)
            continue
        print(f"== {st.name} (limit {limit:.0f} s)", flush=True)
        t0 = clock()
        rc, text = runner(st.tiny_cmd if a.tiny else st.cmd, env, limit)
        note = f"cut at its {limit:.0f} s limit (rows it wrote are kept)" if rc is None else ""
        secs = clock() - t0
        logs[st.name] = text
        info.append(dict(stage=st.name, rc=rc, seconds=secs, cap_s=caps.get(st.name, st.cap_s),
                         note=note or ("ok" if rc == 0 else "failed: see its log")))
        print(f"   rc={rc} {secs:.0f} s {note}\n" + "\n".join(text.splitlines()[-12:]), flush=True)
        if st.name == "tune" and (out / "launch_table.json").exists():
            # the stages after it launch with the settings it measured (rows say which: 'launch')
            env["VSSL_LAUNCH_TABLE"] = str(out / "launch_table.json")
        if st.name == "dali" and rc == 0 and not a.tiny:
            env = _with_dali(env)  # the later stages import the bundle
            met.pop("dali", None)  # asked again in the new environment
    rows_path = out / "rows.jsonl"
    rows = [json.loads(x) for x in rows_path.read_text().splitlines() if x.strip()] if rows_path.exists() else []
    summary = summarize(rows, info)
    (out / "summary.md").write_text(summary)
    (out / "stages.json").write_text(json.dumps(info, indent=2))
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for name, text in logs.items():
            data = text.encode()
            ti = tarfile.TarInfo(f"{name}.log")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    _remove_tree(out / ".work")
    print(summary, flush=True)
    return 0 if all(s.get("rc") == 0 for s in info) else 1  # a stage skipped, cut, failed or unable to measure fails the call


def _with_dali(env: dict) -> dict:
    from bench.dali_bundle import env_for, merged_env

    return merged_env(env, env_for(Path(DALI_SITE) / "dalisite"))


def _text(x) -> str:
    """A timed-out child's captured output (bytes even under text=True, or None)."""
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _remove_tree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
