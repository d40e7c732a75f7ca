"""The run directory: who owns it, and what a start may write into it, when.

One process owns a run dir at a time (``claim``, the first thing a start does, before any data is
read): rank 0 takes an exclusive ``fcntl.flock`` on ``RUN_DIR/.vssl_run.lock`` and holds it for the
run's life. The kernel drops the lock when the process ends, however it ends (a SIGKILLed run's
stale file locks again at once); a clean end removes the file. Of several starts into one dir at
the same instant exactly one gets the lock; the others exit 3 with one line, having written
nothing, and so does ``--resume auto`` into a dir a live process holds. The lock file is the only
thing a start writes before it is accepted; a refused start removes it again, and the run dir too
when the start created it. Under torchrun only rank 0 locks, and every rank raises alike.

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

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from vssl_fast import checkpoint as ckpt
from vssl_fast.faults import RunDirError, WriteError, classify
from vssl_fast.monitor import attach_log_file

__all__ = ["held_run", "refusal", "claim", "RunDirLock", "LOCK_NAME", "accept", "trim_metrics", "write_config"]

RUN_FILES = ("config.json", "metrics.jsonl", "results.json", "summary.md")
LOCK_NAME = ".vssl_run.lock"


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


class RunDirLock:
    """An exclusive ``flock`` on ``run_dir/.vssl_run.lock``, held until ``release`` or the process's end."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self.fd: int | None = None
        self.made_dir = False  # this process created the run dir: a refused start removes it again

    def _not_a_dir(self) -> RunDirError:
        return RunDirError(f"--run-dir {self.dir} is an existing file, not a directory (or lies under one); "
                           "pass a directory: a new one for a new run")

    def _holder(self) -> str:
        with contextlib.suppress(OSError):
            text = self.path.read_text().strip()
            if text:
                return text
        return "its holder has not yet said who it is"

    def acquire(self) -> None:
        """Take the lock now or raise RunDirError (another live process holds it; the path is a file)."""
        for _ in range(100):  # a retry only when a holder removed the file between our open and our lock
            if not self.dir.is_dir():
                if self.dir.exists():
                    raise self._not_a_dir()
                try:
                    self.dir.mkdir(parents=True)
                    self.made_dir = True
                except FileExistsError:  # made meanwhile by a simultaneous start (or a file by someone else)
                    if not self.dir.is_dir():
                        raise self._not_a_dir() from None
                except NotADirectoryError:
                    raise self._not_a_dir() from None
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # the dir was removed meanwhile by a refused start that had made it
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise RunDirError(f"run dir {self.dir} is in use by another live process ({self._holder()}; lock "
                                      f"{self.path}); two runs must never share a run dir: wait for it to end "
                                      "(then --resume auto continues it), or pass a fresh --run-dir") from None
                raise RunDirError(f"cannot lock {self.path}: {e.strerror} (a file system without flock?); put the "
                                  "run dir on a local or lock-capable file system") from None
            try:  # the file we locked must still be the one at the path: a holder removes it before unlocking
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.fd = fd
            with contextlib.suppress(OSError):  # who holds it, for the refusal line of a later start
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                             .encode())
            return
        raise RunDirError(f"could not lock {self.path}: other processes kept replacing it")

    def release(self) -> None:
        """Remove the lock file and unlock (in that order: see ``acquire``); a dir this start made and left empty goes too."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None
        if self.made_dir:
            with contextlib.suppress(OSError):  # not empty: the run was accepted and wrote into it
                self.dir.rmdir()

    @property
    def held(self) -> bool:
        return self.fd is not None


_RANK_FAILURES = {RunDirError.exit_code: RunDirError, WriteError.exit_code: WriteError}


def claim(run_dir: str | Path, resume: str, dist) -> RunDirLock:
    """Own the run dir for this run, or raise on every rank alike (the first thing a start does).

    Rank 0 takes the lock (``RunDirLock``) and checks that this start may use the dir (``refusal``);
    a refused start releases it, so nothing is left written. Every rank learns the outcome (a CPU
    collective) and raises: rank 0 its own error, the others the same kind pointing at rank 0's line.
    """
    lock, err = RunDirLock(run_dir), None
    if dist.is_main:
        try:
            lock.acquire()
            why = refusal(run_dir, resume)
            if why:
                raise RunDirError(why)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it before any rank raises
            lock.release()
            err = e
    code = dist.max_int(classify(err)[0] if err is not None else 0)
    if err is not None:
        raise err
    if code:
        raise _RANK_FAILURES.get(code, RunDirError)(f"rank 0 could not claim the run dir {run_dir} (its line says why)")
    return lock


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
