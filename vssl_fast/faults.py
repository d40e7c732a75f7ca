"""Known failures: one clear line and a distinct exit code each; the stop flag that SIGTERM/SIGUSR1 set.

``run(fn, argv)`` is the whole error policy of ``train.py`` and of the other commands (evaluate,
export, ``python -m vssl_fast.data``). A known failure prints one line naming the setting or file
and returns its code; an unexpected exception is a bug and keeps its traceback.
``--debug`` (or ``VSSL_DEBUG=1``) prints the traceback of known failures too.

    code  meaning                                                     raised as
    0     finished
    1     a bug: an unexpected exception (traceback printed)
    2     config error: a bad key or value (named)                     config.ConfigError
    3     the run dir holds another run and this start did not resume, RunDirError
          a live process holds it, or it is a file
    4     data not found, unreadable, cut short, classes missing       DataError
    5     checkpoint missing, unloadable, non-finite or incompatible   CheckpointError
    6     non-finite run: train.max_consecutive_skips bad steps in a row NonFiniteError
    7     cannot write: disk full, quota, read-only or no permission   WriteError (or such an OSError)
    8     distributed: a collective timed out or a peer rank was lost  DistributedError (or gloo/NCCL's)
    130   interrupted from the keyboard (Ctrl-C)
    143   stopped by SIGTERM/SIGUSR1: a checkpoint was saved; resume with --resume auto   Preempted

Stopping: the trainer installs ``install_stop_signals``; a signal only sets a flag. The training
loop reads it at step boundaries, evaluation loops (``vssl_fast.evaluate``) after each batch
(``stop_requested``), and both agree across ranks (``raise_if_stop_agreed``, a CPU collective)
before acting, so every rank stops at the same point.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import traceback

__all__ = ["Failure", "RunDirError", "DataError", "CheckpointError", "NonFiniteError", "WriteError",
           "DistributedError", "Preempted", "StopRequested", "classify", "run", "one_line", "exit_now",
           "install_stop_signals", "restore_signals", "stop_requested", "raise_if_stop_agreed"]


class Failure(RuntimeError):
    """A known failure: its message is one line that names the setting or file."""

    exit_code = 1


class RunDirError(Failure):
    exit_code = 3


class DataError(Failure):
    exit_code = 4


class CheckpointError(Failure):
    exit_code = 5


class NonFiniteError(Failure):
    exit_code = 6


class WriteError(Failure):
    exit_code = 7


class DistributedError(Failure):
    exit_code = 8


class Preempted(Failure):
    exit_code = 143


class StopRequested(Exception):
    """Raised inside evaluation when every rank agreed to stop; the trainer saves and raises Preempted."""


EXIT_INTERRUPTED = 130
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# gloo and NCCL report a lost or hung peer as a RuntimeError (torch.distributed.DistError in newer paths)
_DIST_TEXT = re.compile(r"timed out waiting|connection closed by peer|connection reset by peer|\bnccl\b|"
                        r"watchdog caught collective|socket timeout|timeout.*(collective|store|barrier)",
                        re.IGNORECASE)


def one_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's text, shortened (torch's load errors run to pages)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def classify(e: BaseException) -> tuple[int, str]:
    """(exit code, one line) for a known failure; (1, ...) for anything else (a bug)."""
    from vssl_fast.config import ConfigError  # config imports nothing from here; keep the import graph flat

    if isinstance(e, Failure):
        return e.exit_code, one_line(e, 2000)
    if isinstance(e, ConfigError):
        return 2, f"config error: {one_line(e, 2000)}"
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted (Ctrl-C); resume from the last checkpoint with --resume auto"
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        where = f" {e.filename}" if e.filename else ""
        return WriteError.exit_code, (f"cannot write{where}: {e.strerror or one_line(e)}; free space or fix "
                                      "permissions (checkpoints already complete are intact), then --resume auto")
    if _is_distributed(e):
        return DistributedError.exit_code, (f"distributed: a collective failed ({one_line(e, 200)}); another rank "
                                            "stopped, crashed or hung longer than dist.timeout_s; resume with "
                                            "--resume auto")
    return 1, f"unexpected error (a bug; please report it with the traceback above): {type(e).__name__}: {one_line(e)}"


def _is_distributed(e: BaseException) -> bool:
    try:
        import torch.distributed as dist

        if isinstance(e, getattr(dist, "DistError", ())):
            return True
    except ImportError:  # pragma: no cover - torch always has it here
        pass
    return isinstance(e, RuntimeError) and bool(_DIST_TEXT.search(str(e)))


def run(fn, argv: list[str]) -> int:
    """Call ``fn(argv)`` (``--debug`` removed from argv) and turn its known failures into exit codes.

    ``fn`` returns None (exit 0) or its own exit code. While ``run`` is active, ``restore_signals``
    leaves the stop handlers in place (a second SIGTERM while a stopping process saves, closes its
    process group or prints is one more flag, not a death by the signal), so a stopped process
    always ends with 143; the handlers stay until the process exits (``sys.exit(run(...))``).
    """
    debug = "--debug" in argv or os.environ.get("VSSL_DEBUG", "0") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    _stop["held"] += 1
    try:
        rc = fn(argv)
        return int(rc) if rc is not None else 0
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the one place failures become exit codes
        code, line = classify(e)
        if code == 1 or debug:
            traceback.print_exc()
        prefix = "" if code in (2, Preempted.exit_code) else "error: "
        print(prefix + line, file=sys.stderr, flush=True)
        return code
    finally:
        _stop["held"] -= 1


def exit_now(code: int) -> None:
    """Leave at once with ``code`` (logs and streams flushed, no interpreter finalizers): after a stuck
    collective, whose process group was aborted, a finalizer of that group could wait on it forever."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------- the stop flag
_stop = {"requested": False, "vote": None, "previous": {}, "held": 0}  # held: inside run()
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _on_signal(signum, frame):
    _stop["requested"] = True


def install_stop_signals(vote=None) -> None:
    """SIGTERM/SIGUSR1 set the stop flag; ``vote(flag) -> bool`` makes the ranks agree (None: this process only)."""
    _stop["requested"], _stop["vote"] = False, vote
    for s in STOP_SIGNALS:
        prev = signal.signal(s, _on_signal)
        _stop["previous"].setdefault(s, prev)


def restore_signals() -> None:
    """Put back the handlers that were there before ``install_stop_signals``; forget the flag and vote.

    Inside ``run`` (a command's whole life) only the vote is dropped: the stop signals keep setting
    the flag until the process exits, so a signal after the save cannot turn exit 143 into a death by
    SIGTERM (the default handler). A later call outside ``run`` restores the handlers.
    """
    if _stop["held"]:
        _stop["vote"] = None
        return
    for s, prev in _stop["previous"].items():
        signal.signal(s, prev)
    _stop.update(requested=False, vote=None, previous={})


def stop_requested() -> bool:
    """This process got SIGTERM/SIGUSR1 (no communication; cheap enough for every batch)."""
    return _stop["requested"]


def stop_agreed() -> bool:
    """Any rank got a stop signal (a collective when the trainer installed a vote: call it on every rank alike)."""
    vote = _stop["vote"]
    return vote(_stop["requested"]) if vote is not None else _stop["requested"]


def raise_if_stop_agreed() -> None:
    """Raise StopRequested on every rank alike when any rank got a stop signal (call it on every rank alike)."""
    if stop_agreed():
        raise StopRequested
