"""The run directory: who owns it, and what a start may write into it, when.

A start that does not resume (``--resume`` unset) into a directory that already holds a run
(config.json, metrics, results or checkpoints) is refused before anything is written; so is an
explicit ``--resume PATH`` into a directory holding a run that PATH is not part of
(``refuse_foreign``). Nothing is written before the start is accepted (``accept``): the data
loads, the checkpoint loads and matches the config. Then, on rank 0: the directory is created,
train.log opened, partial files of interrupted saves removed, checkpoints and metrics rows newer
than the resumed step (a trajectory this run replaces) set aside, not deleted
(``*.superseded``, ``metrics.superseded.jsonl``), so metrics.jsonl keeps one row per step and
summaries count each step once; and config.json written (the previous one, when the config
changed on resume, is kept as ``config.before_step_<N>.json``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from vssl_fast import checkpoint as ckpt
from vssl_fast.faults import RunDirError
from vssl_fast.monitor import attach_log_file

__all__ = ["held_run", "refusal", "refuse_foreign", "accept", "trim_metrics", "write_config"]

RUN_FILES = ("config.json", "metrics.jsonl", "results.json", "summary.md")


def held_run(run_dir: str | Path) -> list[str]:
    """What in ``run_dir`` shows that it holds a run (empty: a new or empty directory)."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    found = [n for n in RUN_FILES if (d / n).exists()]
    ck = d / "checkpoints"
    if ck.is_dir():
        n = sum(1 for p in ck.iterdir() if p.name.startswith(("step_", ".step_")))
        if n:
            found.append(f"checkpoints/ ({n} files)")
    return found


def refusal(run_dir: str | Path, resume: str) -> str | None:
    """Why this start may not use ``run_dir`` (one line), or None."""
    held = held_run(run_dir)
    if not held:
        return None
    what = f"run dir {run_dir} already holds a run ({', '.join(held)})"
    if resume == "none":
        return f"{what}; to continue it pass --resume auto, to start a new run pass a fresh --run-dir"
    if resume != "auto" and Path(resume).resolve().parent != (Path(run_dir) / "checkpoints").resolve():
        return (f"{what} and --resume {resume} is not one of its checkpoints; continue that run with --resume auto, "
                "or resume this checkpoint into a fresh --run-dir")
    return None


def refuse_foreign(run_dir: str | Path, resume: str, dist) -> None:
    """Raise RunDirError on every rank when rank 0 finds the run dir taken (nothing is written)."""
    why = refusal(run_dir, resume) if dist.is_main else None
    if dist.any_true(why is not None):
        raise RunDirError(why or "rank 0 refused the run dir (its message says why)")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def trim_metrics(path: Path, step: int) -> int:
    """Move the rows of ``path`` after ``step`` (and any line a kill cut short) to metrics.superseded.jsonl."""
    if not path.exists():
        return 0
    keep, drop = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            later = int(json.loads(line).get("step", 0)) > step
        except (ValueError, AttributeError):
            later = True  # a partial line
        (drop if later else keep).append(line)
    if not drop:
        return 0
    with open(path.with_name("metrics.superseded.jsonl"), "a") as f:
        f.write("".join(x + "\n" for x in drop))
        f.flush()
        os.fsync(f.fileno())
    _atomic_write(path, "".join(x + "\n" for x in keep))
    return len(drop)


def _set_aside_results(run_dir: Path, step: int, log: logging.Logger) -> None:
    """results.json / summary.md of a trajectory past ``step`` no longer describe the run: rename them."""
    res = run_dir / "results.json"
    try:
        later = json.loads(res.read_text()).get("steps", 0) > step if res.exists() else False
    except (ValueError, AttributeError):
        later = True
    if later:
        for name in ("results.json", "summary.md"):
            if (run_dir / name).exists():
                (run_dir / name).replace(run_dir / name.replace(".", ".superseded.", 1))
        log.info("results.json and summary.md were for steps after %d: renamed to *.superseded.*", step)


def write_config(run_dir: Path, cfg, step: int, log: logging.Logger) -> None:
    """config.json describes this run; a different earlier one is kept as config.before_step_<step>.json."""
    path = run_dir / "config.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        launch = ("resume", "run_dir")  # how this part was started, not what the run is
        new = cfg.to_dict()
        if old is None or {k: v for k, v in old.items() if k not in launch} != {k: v for k, v in new.items() if k not in launch}:
            keep = run_dir / f"config.before_step_{step:08d}.json"
            path.replace(keep)
            log.info("config changed on resume; the earlier config.json is kept as %s", keep.name)
    _atomic_write(path, cfg.to_json())


def accept(run_dir: str | Path, cfg, resumed_step: int | None, log: logging.Logger) -> None:
    """The start is accepted (rank 0): create the dir, open train.log, tidy it, write config.json."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    attach_log_file(log, d)
    step = resumed_step or 0
    gone = ckpt.remove_partials(d / "checkpoints")
    if gone:
        log.info("removed %d partial files of interrupted saves: %s", len(gone), ", ".join(gone))
    moved = ckpt.set_aside_newer(d / "checkpoints", step)
    if moved:
        log.warning("checkpoints after step %d belong to the trajectory this run replaces; renamed to *.superseded: %s",
                    step, ", ".join(moved))
    n = trim_metrics(d / "metrics.jsonl", step)
    _set_aside_results(d, step, log)
    if n:
        log.info("metrics.jsonl: %d rows after step %d moved to metrics.superseded.jsonl (those steps run again)", n, step)
    write_config(d, cfg, step, log)
    log.info("resolved config:\n%s", cfg.to_json())
