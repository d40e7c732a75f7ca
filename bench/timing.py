"""Timing with stated, sufficient samples: repetition counts, never milliseconds of budget.

A case runs ``warmup`` calls that are never timed, then timed repetitions until both minimums hold:
at least ``min_reps`` repetitions and at least ``min_time_s`` seconds of timed work (at most
``max_reps``). The result names what it rests on: the number of samples, the warm-ups, the
timed seconds, the clock, and the spread (median with p20/p80, min and max).

Clocks (all return stamps whose difference is seconds):

- ``HostClock``: ``time.perf_counter`` (the CPU; host-side work);
- ``CudaEventClock``: a CUDA event recorded on the current stream; subtracting two stamps waits
  for the later one (GPU time between the two points of the stream, what ``triton.testing.do_bench``
  measures per repetition);
- ``SyncedClock``: ``torch.cuda.synchronize()`` then ``perf_counter`` (wall time of work that mixes
  host and device, e.g. a loader's batch).

``triton.testing.do_bench(fn, warmup, rep)`` is not used: its ``warmup`` and ``rep`` are
milliseconds, so a 100 ms call got one or two timed repetitions.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Reps:
    """How often a case runs: ``warmup`` untimed calls, then at least ``min_reps`` timed ones and at
    least ``min_time_s`` timed seconds, at most ``max_reps`` (which wins over ``min_time_s``)."""

    warmup: int = 5
    min_reps: int = 20
    min_time_s: float = 0.5
    max_reps: int = 10_000

    def __post_init__(self):
        if self.warmup < 0 or self.min_reps < 1 or self.max_reps < self.min_reps or self.min_time_s < 0:
            raise ValueError(f"Reps: need warmup >= 0, 1 <= min_reps <= max_reps, min_time_s >= 0; got {self}")

    def planned(self, est_s: float) -> int:
        """Timed repetitions for a call of ``est_s`` seconds: both minimums, at most ``max_reps``."""
        need = math.ceil(self.min_time_s / est_s) if est_s > 0 else self.max_reps
        return min(self.max_reps, max(self.min_reps, need))


# The defaults per kind of case. Kernels and optimizer steps (microseconds to a few ms): 20+
# repetitions and 0.5 s. A training step (15-300 ms): 30 repetitions and 2 s. A loader batch
# (a few to hundreds of ms, prefetch queues of 2-4): 8 warm-up batches, then 40+ and 3 s.
KERNEL = Reps(warmup=5, min_reps=20, min_time_s=0.5)
STEP = Reps(warmup=5, min_reps=30, min_time_s=2.0)
LOADER = Reps(warmup=8, min_reps=40, min_time_s=3.0)
TINY = Reps(warmup=1, min_reps=3, min_time_s=0.0, max_reps=3)  # CPU smoke runs: the plumbing, not a figure


class _Clock:
    name = "?"

    def __repr__(self):  # what pytest-benchmark records as its timer
        return self.name


class HostClock(_Clock):
    name = "perf_counter"

    def __call__(self):
        return time.perf_counter()


class _EventStamp:
    __slots__ = ("event",)

    def __init__(self, event):
        self.event = event

    def __sub__(self, other: _EventStamp) -> float:
        self.event.synchronize()
        return other.event.elapsed_time(self.event) / 1e3


class CudaEventClock(_Clock):
    name = "cuda-event"

    def __call__(self):
        import torch

        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return _EventStamp(e)


class SyncedClock(_Clock):
    name = "cuda-synchronize+perf_counter"

    def __call__(self):
        import torch

        torch.cuda.synchronize()
        return time.perf_counter()


def kernel_clock():
    """CUDA events on a card, else perf_counter."""
    import torch

    return CudaEventClock() if torch.cuda.is_available() else HostClock()


def wall_clock():
    """Synchronized wall time on a card, else perf_counter."""
    import torch

    return SyncedClock() if torch.cuda.is_available() else HostClock()


def quantile(sorted_x: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_x:
        raise ValueError("quantile of no samples")
    pos = q * (len(sorted_x) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_x) - 1)
    return sorted_x[lo] + (sorted_x[hi] - sorted_x[lo]) * (pos - lo)


@dataclass(frozen=True)
class Timing:
    """Milliseconds of one case and what they rest on."""

    ms: float  # median
    p20: float
    p80: float
    min_ms: float
    max_ms: float
    mean_ms: float
    samples: int  # timed repetitions
    warmup: int  # untimed calls before them
    timed_s: float  # seconds of timed work
    timer: str

    @classmethod
    def of(cls, seconds: list[float], warmup: int, timer: str) -> Timing:
        ms = sorted(1e3 * s for s in seconds)
        return cls(ms=statistics.median(ms), p20=quantile(ms, 0.2), p80=quantile(ms, 0.8), min_ms=ms[0], max_ms=ms[-1],
                   mean_ms=statistics.fmean(ms), samples=len(ms), warmup=warmup, timed_s=sum(seconds), timer=timer)

    def row(self, prefix: str = "") -> dict:
        """The fields a benchmark row carries (``prefix`` for a second timing of the same case)."""
        return {f"{prefix}{k}": v for k, v in asdict(self).items() if k not in ("min_ms", "max_ms", "mean_ms")} | {
            f"{prefix}spread": (self.p80 - self.p20) / self.ms if self.ms > 0 else None}

    def clearly_faster_than(self, other: Timing) -> bool:
        """This case's p80 is below the other's p20: faster beyond both spreads."""
        return self.p80 < other.p20


def warm(fn: Callable, reps: Reps, setup: Callable | None = None, clock=None) -> list[float]:
    """Run the warm-up calls; returns their durations (seconds), which are never reported as timings."""
    clock = clock or HostClock()
    out = []
    for _ in range(reps.warmup):
        if setup is not None:
            setup()
        t0 = clock()
        fn()
        t1 = clock()
        out.append(t1 - t0)
    return out


def time_ms(fn: Callable, reps: Reps = KERNEL, *, setup: Callable | None = None, clock=None,
            before_each: Callable | None = None) -> Timing:
    """Time ``fn()``: ``reps.warmup`` untimed calls, then repetitions until both minimums of ``reps``
    hold. ``setup()`` (untimed) runs before every call and restores state; ``before_each()`` too,
    right before the clock starts (an L2 flush). ``clock`` defaults to ``kernel_clock()``."""
    clock = clock or kernel_clock()
    warm(fn, reps, setup, clock)
    seconds: list[float] = []
    total, target = 0.0, reps.min_reps
    while True:
        while len(seconds) < target:
            if setup is not None:
                setup()
            if before_each is not None:
                before_each()
            t0 = clock()
            fn()
            t1 = clock()
            d = t1 - t0
            seconds.append(d)
            total += d
        if total >= reps.min_time_s or len(seconds) >= reps.max_reps:
            break
        mean = total / len(seconds)
        target = min(reps.max_reps, len(seconds) + max(1, math.ceil((reps.min_time_s - total) / mean) if mean > 0 else
                                                            reps.max_reps))
    return Timing.of(seconds, reps.warmup, getattr(clock, "name", type(clock).__name__))


class L2Flush:
    """Zeroes a buffer larger than the card's L2 before each repetition (as ``do_bench`` does), so a
    repetition does not find its operands cached by the previous one. A no-op without CUDA."""

    def __init__(self, nbytes: int = 256 << 20):
        import torch

        self.buf = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda") if torch.cuda.is_available() else None

    def __call__(self):
        if self.buf is not None:
            self.buf.zero_()
