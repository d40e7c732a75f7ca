"""The benchmark suite under pytest-benchmark (the ``dev`` extra): the same cases the scripts time.

    python -m pytest bench --benchmark-only                               # every case this machine can run
    python -m pytest bench --benchmark-only --benchmark-autosave          # ... saved under .benchmarks/
    python -m pytest bench --benchmark-only --benchmark-compare           # against the newest saved run
    python -m pytest bench --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:10%

Host-side cases run anywhere (the reference losses, the optimizer steps' host work with their Triton
launches counted, the device-CIFAR loader's host time per batch); GPU cases run on a card, timed
with CUDA events (pytest-benchmark's timer is replaced per case by ``bench.timing``'s clock), and
are skipped elsewhere with the reason. Each case: its warm-ups apart (``Reps.warmup``), then as
many rounds as both minimums of its ``Reps`` need (planned from the fastest warm-up, 2x margin), one call
per round; ``extra_info`` carries the case's figures (bytes, GB/s, % of peak, ratios to the
baseline measured earlier in the same run), the samples, warm-ups and the p20/p80 spread.
``VSSL_BENCH_REPS=tiny`` runs every case at 1 warm-up + 3 rounds (the plumbing test);
``VSSL_BENCH_SMOKE=1`` without CUDA runs the GPU cases too, at tiny sizes (their plumbing only).

The default ``python -m pytest`` (testpaths = tests) collects nothing here and needs no plugin.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported: the host-side cases count launches on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from bench.timing import KERNEL, TINY, L2Flush, Reps, Timing, kernel_clock, wall_clock, warm  # noqa: E402

CUDA = torch.cuda.is_available()
# VSSL_BENCH_SMOKE=1 on a machine without CUDA: the GPU cases too, at tiny sizes and 1 + 3 repetitions, to
# test their plumbing (the kernels under the interpreter); their figures mean nothing
SMOKE = os.environ.get("VSSL_BENCH_SMOKE") == "1" and not CUDA
GPU_ONLY = pytest.mark.skipif(not CUDA and not SMOKE, reason="a GPU case: timed with CUDA events on a card; on a CPU "
                              "its figures would measure the interpreter or the CPU's arithmetic, not the product")


def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("benchmark"):  # not installed, or -p no:benchmark
        skip = pytest.mark.skip(reason="the benchmark suite needs pytest-benchmark (pip install -e '.[dev]')")
        for item in items:
            item.add_marker(skip)


def reps_for(default: Reps) -> Reps:
    return TINY if (SMOKE or os.environ.get("VSSL_BENCH_REPS") == "tiny") else default


@pytest.fixture(scope="session")
def same_run() -> dict:
    """Timings measured earlier in this session, by (group, provider): the baselines of the ratios."""
    return {}


@pytest.fixture(scope="session")
def l2_flush():
    return L2Flush()


@pytest.fixture
def measure(benchmark, l2_flush):
    """``measure(fn, group=..., setup=None, reps=KERNEL, kind='kernel'|'wall', **extra) -> Timing`` with
    pytest-benchmark: warm-ups apart, then rounds planned from them; ``extra`` goes to extra_info."""

    def run(fn, *, group: str, setup=None, reps: Reps = KERNEL, kind: str = "kernel", **extra) -> Timing | None:
        reps = reps_for(reps)
        clock = kernel_clock() if kind == "kernel" else wall_clock()
        flush = l2_flush if kind == "kernel" else None
        warmed = warm(fn, reps, setup, clock) if reps.warmup else []
        # planned from the fastest warm-up with a 2x margin (pedantic rounds cannot be extended afterwards);
        # extra_info's timed_s says what was reached
        rounds = reps.planned(min(warmed) / 2) if warmed else reps.min_reps

        def before():
            if setup is not None:
                setup()
            if flush is not None:
                flush()

        if hasattr(benchmark, "_timer"):  # pytest-benchmark's stats then come from the same clock as the scripts'
            benchmark._timer = clock
        benchmark.group = group
        benchmark.pedantic(fn, setup=before, rounds=rounds, warmup_rounds=0, iterations=1)
        if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
            return None
        t = Timing.of(list(benchmark.stats.stats.data), reps.warmup, clock.name)
        benchmark.extra_info.update({**t.row(), "min_reps": reps.min_reps, "min_time_s": reps.min_time_s, **extra})
        return t

    return run
