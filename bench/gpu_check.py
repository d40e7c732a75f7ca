"""One prepared device run: correctness on CUDA first, then the benchmarks, under one time budget.

    OUT=/path python -m bench.gpu_check [--budget-s 540] [--stages tests,cosine,...] [--cifar .gpu/cifar10-jpeg.tar.gz]
    python -m bench.gpu_check --tiny --budget-s 240 --out /tmp/check   # the CPU test of this command

Runs from the source tree on a bare device machine (no install, no network). Stages run in
priority order (correctness first); each gets at most its own cap and what is left of the budget
(less a reserve for the summary), and a stage that cannot get its minimum is skipped and said so.
Every benchmark appends its JSON rows as each case ends, so a stage cut by its limit keeps what
it measured; first-time compilation is reported apart (``first_call_s``), never in a timing.

Leaves at most 6 files in OUT: ``env.txt`` (card, driver, versions), ``rows.jsonl`` (every row),
``summary.md`` (every figure against its goal, also printed), ``stages.json`` (each stage's exit
code, seconds, and whether it was cut or skipped), ``logs.tar.gz`` (each stage's full log) and
``launch_table.json`` (the ``tune`` stage's measured launch settings for this card, which every later
stage uses; copy it to ``kernels/launch_table.json`` to make it the product's).
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
RESERVE_S = 10  # kept back from the budget for the summary and the bundle


@dataclass
class Stage:
    name: str
    cap_s: int  # the most this stage may take
    min_s: int  # not started with less than this left
    cmd: list[str]
    tiny_cmd: list[str]


def stages(out: Path, cifar: str) -> list[Stage]:
    rows = str(out / "rows.jsonl")
    py = [sys.executable]
    m = lambda mod, *a: py + ["-m", f"bench.{mod}", "--out", rows, *a]  # noqa: E731
    kernel_tests = ["tests/kernels", "tests/test_losses.py", "tests/train/test_step.py", "tests/train/test_graph_step.py",
                    "tests/train/test_gpu_config_on_cpu.py", "tests/train/test_evaluate.py"]
    return [
        # the ahead-of-time compile check needs no GPU (CI runs it); here only what needs the card
        Stage("tests", 200, 60, py + ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *kernel_tests,
                                      "--ignore=tests/kernels/test_aot_compile.py"],
              py + ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/kernels/test_restore.py"]),
        Stage("tune", 150, 60, py + ["-m", "bench.tune_launch", "--out", rows, "--table", str(out / "launch_table.json"),
                                     "--budget", "120"],
              py + ["-m", "bench.tune_launch", "--tiny", "--families", "ema", "--cap", "sm_00", "--out", rows,
                    "--table", str(out / "launch_table.json")]),
        Stage("ema", 60, 20, m("bench_ema"), m("bench_ema", "--tiny")),
        Stage("lars", 60, 20, m("bench_lars"), m("bench_lars", "--tiny")),
        Stage("lamb", 60, 20, m("bench_lamb"), m("bench_lamb", "--tiny")),
        Stage("cosine", 120, 40, m("bench_cosine_loss"), m("bench_cosine_loss", "--tiny")),
        Stage("step", 240, 90, m("bench_step", "--cases", "32x256,32x512,224x128,224x256", "--graph-modes", "off,on"),
              m("bench_step", "--tiny")),
        Stage("e2e", 180, 60, m("bench_e2e", "--cifar", cifar, "--work", "/tmp/vssl_e2e"),
              m("bench_e2e", "--tiny", "--cifar", cifar, "--work", str(out / ".work" / "e2e"))),
        Stage("data", 150, 60, m("bench_data", "--jpeg-dir", "/tmp/vssl_bench_jpegs"),
              m("bench_data", "--tiny", "--jpeg-dir", str(out / ".work" / "jpegs"))),
    ]


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
    compile_s = [(r.get("bench"), r.get("provider") or r.get("variant"), r["first_call_s"]) for r in rows
                 if r.get("first_call_s")]
    if compile_s:
        lines += ["", "First calls (compilation; excluded from every timing):",
                  ", ".join(f"{b}/{p} {s:.1f} s" for b, p, s in compile_s)]
    return "\n".join(lines) + "\n"


def _env_text() -> str:
    out = []
    try:
        out.append(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"],
                                  capture_output=True, text=True, timeout=30).stdout.strip())
    except (OSError, subprocess.TimeoutExpired) as e:
        out.append(f"nvidia-smi: {e}")
    code = ("import torch, triton, platform; "
            "print(torch.__version__, torch.version.cuda, triton.__version__, platform.python_version())")
    out.append(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip())
    try:
        out.append("git " + subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                           timeout=10).stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "\n".join(out) + f"\ndate {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=540, help="total seconds for every stage together (default 9 min)")
    ap.add_argument("--stages", default="tests,tune,ema,lars,lamb,cosine,step,e2e,data",
                    help="a subset, run in priority order")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--cifar", default=".gpu/cifar10-jpeg.tar.gz",
                    help="the CIFAR-10 JPEG tar, carried into a git-ignored folder")
    ap.add_argument("--tiny", action="store_true", help="tiny stages: the CPU test of this command")
    ap.add_argument("--cap", action="append", default=[], metavar="STAGE=SECONDS", help="override a stage's cap")
    a = ap.parse_args(argv)
    t_start = time.monotonic()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "env.txt").write_text(_env_text())
    wanted = a.stages.split(",")
    unknown = set(wanted) - {s.name for s in stages(out, a.cifar)}
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}")
    caps = {}
    for c in a.cap:
        name, _, secs = c.partition("=")
        caps[name] = float(secs)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if "tune" in wanted:  # this run's measurement only: never a table left in OUT by an earlier run
        (out / "launch_table.json").unlink(missing_ok=True)
    if a.tiny:
        env.setdefault("TRITON_INTERPRET", "0" if _has_cuda() else "1")
    info, logs = [], {}
    for st in stages(out, a.cifar):
        if st.name not in wanted:
            continue
        left = a.budget_s - (time.monotonic() - t_start) - RESERVE_S
        limit = min(caps.get(st.name, st.cap_s), left)
        if limit < (1 if a.tiny else st.min_s):
            info.append(dict(stage=st.name, note=f"skipped: {left:.0f} s left, needs {st.min_s}"))
            print(f"== {st.name}: skipped ({left:.0f} s left)", flush=True)
            continue
        print(f"== {st.name} (limit {limit:.0f} s)", flush=True)
        t0 = time.monotonic()
        try:
            p = subprocess.run(st.tiny_cmd if a.tiny else st.cmd, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=limit)
            rc, text, note = p.returncode, p.stdout + p.stderr, ""
        except subprocess.TimeoutExpired as e:
            rc, note = None, f"cut at its {limit:.0f} s limit (rows it wrote are kept)"
            text = _text(e.stdout) + _text(e.stderr)
        secs = time.monotonic() - t0
        logs[st.name] = text
        info.append(dict(stage=st.name, rc=rc, seconds=secs, note=note or ("ok" if rc == 0 else "failed: see its log")))
        print(f"   rc={rc} {secs:.0f} s {note}\n" + "\n".join(text.splitlines()[-12:]), flush=True)
        if st.name == "tune" and (out / "launch_table.json").exists():
            # the stages after it launch with the settings it measured (rows say which: 'launch')
            env["VSSL_LAUNCH_TABLE"] = str(out / "launch_table.json")
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
    return 0 if all(s.get("rc") == 0 for s in info if "rc" in s) else 1


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
