"""The cosine KL+sample and LL, forward+backward, per provider (``bench.bench_cosine_loss``'s cases).

The eager references run anywhere (host-side: on a CPU they time the CPU's arithmetic, at the two
smaller shapes); ``torch.compile(reference)`` and the fused kernels are GPU cases. Per case,
extra_info: bytes per fwd+bwd, GB/s, % of peak (on a card), and the speed-up over the same run's
eager and compiled references.
"""

from __future__ import annotations

import functools

import pytest

from bench.bench_cosine_loss import figures, providers
from bench.common import bench_device, first_call_s, peak_bandwidth_gbps
from bench.conftest import CUDA, SMOKE
from bench.timing import KERNEL

SHAPES = [(B, d) for B in (256, 1024, 8192) for d in (256, 2048)] if CUDA else [(256, 256), (1024, 256)]
CASES = [(op, B, d, prov) for B, d in SHAPES for op in ("kl_sample", "ll") for prov in ("eager", "compiled", "fused")]
NOT_HERE = {"compiled": "torch.compile(reference): a GPU case (on this CPU, minutes of C++ compilation per shape)",
            "fused": "the fused Triton kernels: a GPU case (here they run only under the interpreter)"}


@functools.lru_cache(maxsize=2)
def _providers(B: int, d: int):
    return providers(2 * B, d, bench_device())


@pytest.mark.parametrize("op,B,d,provider", CASES, ids=[f"{op}-B{B}-d{d}-{p}" for op, B, d, p in CASES])
def test_cosine_loss(benchmark, measure, same_run, op, B, d, provider):
    if not CUDA and provider in NOT_HERE and not (SMOKE and provider == "fused" and B == 256):
        pytest.skip(NOT_HERE[provider])
    ops, zero, elt = _providers(B, d)
    fns, n_elems = ops[op]
    fn = fns[provider]
    zero()
    first = first_call_s(fn)  # compilation, reported apart
    group = f"cosine {op} B={B} d={d}"
    t = measure(fn, group=group, setup=zero, reps=KERNEL, first_call_s=first)
    if t is None:
        return
    same_run[(group, provider)] = t
    fig = figures(n_elems, 2 * B, d, elt, t.ms, None, peak_bandwidth_gbps())
    for base in ("eager", "compiled"):
        if (group, base) in same_run:
            fig[f"speedup_vs_{base}"] = same_run[(group, base)].ms / t.ms
    benchmark.extra_info.update(fig)
