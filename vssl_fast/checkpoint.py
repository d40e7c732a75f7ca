"""Checkpoints: atomic writes, retention, auto-resume, strict loading.

A checkpoint ``step_00001234.pt`` is written as ``.tmp`` (flushed and fsynced), renamed into
place with ``os.replace``, and only then is its completeness marker ``step_00001234.pt.done``
written (also fsynced). ``--resume auto`` takes the newest checkpoint that has its marker and
loads; a file without its marker (a kill mid-write) is never chosen. The last ``keep`` (>= 2)
complete checkpoints are retained. Loading uses ``weights_only=True``; a checkpoint carries the
resolved config and a format version, and a load under an incompatible config names the field.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

__all__ = ["save_checkpoint", "find_latest", "load_checkpoint", "check_compatible", "FORMAT_VERSION", "CheckpointError"]

FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8,})\.pt$")
# config fields that change the model's or the optimizer's structure: a resume across them is refused
STRUCTURAL = [
    ("method", "method"), ("method", "proj_hidden_dim"), ("method", "proj_output_dim"), ("method", "pred_hidden_dim"),
    ("method", "denoiser_hidden_dim"), ("method", "head"), ("method", "teacher_predictor"), ("method", "denoiser_input"),
    ("model", "backbone"), ("model", "cifar_stem"), ("data", "dataset"), ("optim", "name"), ("train", "batch_size"),
    ("train", "seed"),
]


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict, ckpt_dir: str | Path, step: int, keep: int = 2) -> Path:
    """Atomically write ``state`` as step_<step>.pt plus its marker; prune to the newest ``keep``."""
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step_{step:08d}.pt"
    tmp = d / f".step_{step:08d}.pt.tmp"
    state = dict(state, format_version=FORMAT_VERSION, step=step)
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(d)
    marker = final.with_name(final.name + ".done")
    with open(marker, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(d)
    complete = _complete(d)
    for old in complete[:-max(keep, 2)]:
        old.with_name(old.name + ".done").unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return final


def _complete(d: Path) -> list[Path]:
    out = []
    for p in d.glob("step_*.pt"):
        if _NAME.match(p.name) and p.with_name(p.name + ".done").exists():
            out.append(p)
    return sorted(out, key=lambda p: int(_NAME.match(p.name).group(1)))


def find_latest(ckpt_dir: str | Path) -> Path | None:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    complete = _complete(d)
    return complete[-1] if complete else None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist (an explicit --resume path must exist)")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise CheckpointError(f"checkpoint {p} could not be loaded: {e}") from e
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {p} has format version {state.get('format_version')}, expected {FORMAT_VERSION}")
    return state


def check_compatible(saved: dict, current: dict, path) -> None:
    """Raise naming the first structural config field that differs between a checkpoint and this run."""
    for sec, key in STRUCTURAL:
        a, b = saved.get(sec, {}).get(key), current.get(sec, {}).get(key)
        if a != b:
            raise CheckpointError(f"checkpoint {path} was saved with {sec}.{key}={a!r} but this run has {sec}.{key}={b!r}")
