"""Running train.py in subprocesses with a tiny, fast configuration of the real trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def tiny_args(data: Path, run_dir: Path, cache: Path, steps: int = 8, **extra) -> list[str]:
    args = {
        "preset": "smoke", "run-dir": str(run_dir), "data.path": str(data), "data.cache_dir": str(cache),
        "data.train_subset": "0", "data.val_subset": "0", "train.batch_size": "8", "train.max_steps": str(steps),
        "train.epochs": "100", "method.proj_hidden_dim": "32", "method.pred_hidden_dim": "32",
        "method.denoiser_hidden_dim": "32", "method.proj_output_dim": "16", "log.every_steps": "1",
        "ckpt.every_steps": "4", "eval.knn_every_epochs": "0", "eval.online_every_epochs": "1000",
        "log.tensorboard": "false", "log.progress": "false", "optim.warmup_epochs": "0.1",
    }
    args.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    out = []
    for k, v in args.items():
        out.append(f"--{k}={v}")
    return out


def env(**kw) -> dict:
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)  # the trainer's CPU path uses the references, not the interpreter
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONUNBUFFERED"] = "1"
    e.update({k: str(v) for k, v in kw.items()})
    return e


# multi-process CPU tests (gloo) on a GPU machine: a rank would otherwise take cuda:LOCAL_RANK, which a
# one-GPU machine does not have for rank 1
CPU_RANKS = {"CUDA_VISIBLE_DEVICES": ""}


def run_train(args: list[str], launcher: list[str] | None = None, timeout: int = 600, **envkw):
    if launcher:
        envkw = {**CPU_RANKS, **envkw}
    cmd = (launcher or [sys.executable]) + [str(REPO / "train.py")] + args
    return subprocess.run(cmd, cwd=REPO, env=env(**envkw), capture_output=True, text=True, timeout=timeout)


def train_rows(run_dir: Path) -> dict[int, dict]:
    """step -> the last logged training row for that step (a resumed run logs some steps twice)."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train":
            rows[r["step"]] = r
    return rows
