"""Checkpoints: atomic writes, retention, auto-resume, strict loading.

A checkpoint ``step_00001234.pt`` is written as ``.step_00001234.pt.<pid>.tmp`` (flushed and fsynced), renamed into
place with ``os.replace``, and only then is its completeness marker ``step_00001234.pt.done``
written (also fsynced). ``--resume auto`` takes the newest checkpoint that has its marker and
loads; a file without its marker (a kill mid-write) is never chosen. The last ``keep`` (>= 2)
complete checkpoints are retained. Loading uses ``weights_only=True``; a checkpoint carries the
resolved config and a format version, and a load under an incompatible config names the field.

Resuming (``select_for_resume``): ``--resume auto`` takes the newest complete checkpoint that loads
and holds only finite values, saying in one line why it skips any newer one; an explicit path must
be such a checkpoint. Once a start is accepted, partial files are removed (``remove_partials``) and
checkpoints newer than the resumed one, from the trajectory being replaced, are renamed
``*.superseded`` (``set_aside_newer``) so that retention never prefers them to the new run's own.
The optimizer's hyperparameters come from this run's config, not from the checkpoint
(``load_optimizer_state_``): an LR changed on the command line takes effect.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from vssl_fast.faults import CheckpointError, WriteError, one_line

__all__ = ["save_checkpoint", "find_latest", "load_checkpoint", "check_compatible", "FORMAT_VERSION", "CheckpointError",
           "nonfinite_entries", "load_good", "select_for_resume", "last_good", "nonfinite_advice", "remove_partials",
           "set_aside_newer", "load_optimizer_state_"]

FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8,})\.pt$")
_TMP = re.compile(r"^\.step_\d{8,}\.pt(\.\d+)?\.tmp$")  # .step_N.pt.<pid>.tmp (.step_N.pt.tmp before issue 26)
# config fields that change the model's or the optimizer's structure: a resume across them is refused
STRUCTURAL = [
    ("method", "method"), ("method", "proj_hidden_dim"), ("method", "proj_output_dim"), ("method", "pred_hidden_dim"),
    ("method", "denoiser_hidden_dim"), ("method", "head"), ("method", "teacher_predictor"), ("method", "denoiser_input"),
    ("model", "backbone"), ("model", "cifar_stem"), ("data", "dataset"), ("optim", "name"), ("train", "batch_size"),
    ("train", "seed"),
]


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
    tmp = d / f".step_{step:08d}.pt.{os.getpid()}.tmp"  # each process its own: two writers never share a temp
    state = dict(state, format_version=FORMAT_VERSION, step=step)
    marker = final.with_name(final.name + ".done")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(d)
        with open(marker, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # disk full, quota, read-only: the complete checkpoints already there stay intact
        tmp.unlink(missing_ok=True)
        if not marker.exists():
            final.unlink(missing_ok=True)
        prev = find_latest(d)
        raise WriteError(f"could not write checkpoint {final}: {e.strerror or one_line(e)}; the newest complete "
                         f"checkpoint is {prev or 'none'}. Free space or fix permissions, then --resume auto") from e
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
    except Exception as e:  # noqa: BLE001 - re-raised in one line with the path
        raise CheckpointError(f"checkpoint {p} could not be loaded: {_load_reason(e)}") from e
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {p} has format version {version}, expected {FORMAT_VERSION}")
    return state


def check_compatible(saved: dict, current: dict, path) -> None:
    """Raise naming the first structural config field that differs between a checkpoint and this run."""
    for sec, key in STRUCTURAL:
        a, b = saved.get(sec, {}).get(key), current.get(sec, {}).get(key)
        if a != b:
            raise CheckpointError(f"checkpoint {path} was saved with {sec}.{key}={a!r} but this run has {sec}.{key}={b!r}")


def _load_reason(e: Exception) -> str:
    """One line for a failed ``torch.load``; never torch's advice to retry with weights_only=False."""
    text = str(e)
    if "Weights only load failed" in text:
        detail = next((x.strip() for x in text.splitlines() if "nsupported" in x), "an object it does not allow")
        return f"not a checkpoint this trainer wrote: the safe loader (weights_only=True) refuses it ({detail})"
    return f"corrupt, truncated or not a checkpoint ({type(e).__name__}: {one_line(e, 200)})"


# ----------------------------------------------------------------------------- resuming
def nonfinite_entries(state, prefix: str = "") -> list[str]:
    """Names of the floating tensors (and floats) in a nested checkpoint state that hold NaN or inf."""
    out, flags = [], []
    stack = [(prefix, state)]
    while stack:
        name, v = stack.pop()
        if isinstance(v, dict):
            stack += [(f"{name}.{k}" if name else str(k), x) for k, x in v.items()]
        elif isinstance(v, (list, tuple)):
            stack += [(f"{name}.{i}", x) for i, x in enumerate(v)]
        elif isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
            flags.append((name, torch.isfinite(v).all()))
        elif isinstance(v, float) and not math.isfinite(v):
            out.append(name)
    if flags:
        ok = torch.stack([f for _, f in flags]).cpu()  # one device sync for the whole state
        out += [n for (n, _), good in zip(flags, ok.tolist()) if not good]
    return sorted(out)


def load_good(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint that must also hold only finite values; CheckpointError (one line) otherwise."""
    state = load_checkpoint(path, map_location)
    bad = nonfinite_entries(state)
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite values in {len(bad)} tensors (e.g. {', '.join(bad[:3])})")
    return state


def select_for_resume(ckpt_dir: str | Path, resume: str, map_location="cpu", log=None):
    """(path, state) to resume from, or (None, None) for a fresh start (``resume auto`` with no checkpoint).

    ``auto``: the newest complete checkpoint that loads with all values finite; each newer one that
    does not is skipped with one logged line. A path: that checkpoint, or CheckpointError.
    """
    if resume != "auto":
        return Path(resume), load_good(resume, map_location)
    complete = _complete(Path(ckpt_dir))
    for p in reversed(complete):
        try:
            return p, load_good(p, map_location)
        except CheckpointError as e:
            if log is not None:
                log.warning("resume auto: skipping %s: %s", p.name, str(e).replace(f"checkpoint {p} ", "", 1))
    if complete:
        raise CheckpointError(f"resume auto: none of the {len(complete)} complete checkpoints in {ckpt_dir} loads with "
                              "all values finite (each is named above); pass --resume PATH to a good one or start "
                              "a fresh --run-dir")
    return None, None


def last_good(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint that loads with all values finite (checked), or None."""
    for p in reversed(_complete(Path(ckpt_dir))):
        try:
            load_good(p)
            return p
        except CheckpointError:
            continue
    return None


def nonfinite_advice(ckpt_dir: str | Path, lr: float) -> str:
    """Where to go back to after a non-finite run, and how (one sentence)."""
    p = last_good(ckpt_dir)
    if p is None:
        return (f"no checkpoint in {ckpt_dir} holds only finite values: start again with a lower LR "
                f"(e.g. --optim.lr={lr / 10:g}) in a fresh --run-dir")
    return (f"the last checkpoint with all values finite (checked) is {p}: resume from it with a lower LR, "
            f"e.g. --resume {p} --optim.lr={lr / 10:g}")


def remove_partials(ckpt_dir: str | Path) -> list[str]:
    """Delete what interrupted saves left: temp files, checkpoints without their marker, orphan markers."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    gone = []
    for p in sorted(d.iterdir()):
        orphan_pt = _NAME.match(p.name) and not p.with_name(p.name + ".done").exists()
        orphan_done = p.name.endswith(".pt.done") and _NAME.match(p.name[:-5]) and not p.with_name(p.name[:-5]).exists()
        if p.is_file() and (_TMP.match(p.name) or orphan_pt or orphan_done):
            p.unlink()
            gone.append(p.name)
    if gone:
        _fsync_dir(d)
    return gone


def set_aside_newer(ckpt_dir: str | Path, step: int) -> list[str]:
    """Rename complete checkpoints newer than ``step`` to ``*.superseded`` (kept, never chosen or pruned)."""
    moved = []
    for p in _complete(Path(ckpt_dir)):
        if int(_NAME.match(p.name).group(1)) > step:
            p.with_name(p.name + ".done").unlink()
            p.replace(p.with_name(p.name + ".superseded"))
            moved.append(p.name)
    if moved:
        _fsync_dir(Path(ckpt_dir))
    return moved


_GROUP_STATE = ("params", "step")  # per-group entries that are optimizer state, not hyperparameters


def load_optimizer_state_(opt: torch.optim.Optimizer, saved: dict) -> list[str]:
    """Load an optimizer's state but keep this run's hyperparameters (LR, weight decay, ...) in its groups.

    ``torch.optim.Optimizer.load_state_dict`` would restore the saved groups' values, silently undoing
    a changed ``--optim.lr``. Returns "group.key old -> new" for each hyperparameter that changed
    (``lr`` itself is the schedule's current value, recomputed every step from ``base_lr``).
    """
    ours = [{k: v for k, v in g.items() if k not in _GROUP_STATE} for g in opt.param_groups]
    opt.load_state_dict(saved)
    changed = []
    for i, (g, mine) in enumerate(zip(opt.param_groups, ours)):
        for k, v in mine.items():
            if k != "lr" and k in g and g[k] != v:
                changed.append(f"{mine.get('name', i)}.{k} {g[k]:g} -> {v:g}" if isinstance(v, float)
                               else f"{mine.get('name', i)}.{k} {g[k]!r} -> {v!r}")
        g.update(mine)
    return changed
