"""The training step's variants (``bench.bench_step``): (a) reference, (c) backbone floor, (b) fast step
eager and as one CUDA graph, at 32 px (B 256) and 224 px (B 128). GPU cases: a step on this CPU
would time bf16 convolutions on 2 cores. extra_info: views/s, and (b)'s ratios to the same run's
(a) and (c); the first call (compilation) apart.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import bench_device, first_call_s
from bench.conftest import GPU_ONLY, SMOKE
from bench.timing import STEP

SIZES = [(16, 4)] if SMOKE else [(32, 256), (224, 128)]
NAMES = ["a_reference", "c_backbone_floor", "b_fast(graph=off)", "b_fast(graph=on)"]


def _graph(variant: str) -> str:
    """'b_fast(graph=on)' -> 'on' ('static', its uncaptured twin, without CUDA)."""
    g = variant.split("graph=")[1].rstrip(")")
    return "static" if (g == "on" and not torch.cuda.is_available()) else g


@GPU_ONLY
@pytest.mark.parametrize("px,batch,variant", [(px, b, v) for px, b in SIZES for v in NAMES],
                         ids=[f"{px}px-B{b}-{v}" for px, b in SIZES for v in NAMES])
def test_step(benchmark, measure, same_run, px, batch, variant):
    from bench.bench_step import variants

    device = bench_device()
    built = dict(variants(px, batch, device, SMOKE, ("auto",), ("off", "on")))
    name = variant if not variant.startswith("b_fast") else next(
        n for n in built if n.startswith("b_fast(") and n.endswith(f"graph={_graph(variant)})"))
    step, xs, _, extra = built[name]()
    first = first_call_s(lambda: step(*xs))
    group = f"step {px}px B={batch}"
    t = measure(lambda: step(*xs), group=group, reps=STEP, kind="kernel", first_call_s=first, variant=name, **extra)
    if t is None:
        return
    vps = 2 * batch / (t.ms * 1e-3)
    same_run[(group, variant)] = vps
    info = {"views_per_s": vps}
    for base, key in (("a_reference", "b_over_a"), ("c_backbone_floor", "b_over_c")):
        if variant.startswith("b_fast") and (group, base) in same_run:
            info[key] = vps / same_run[(group, base)]
    benchmark.extra_info.update(info)
    torch._dynamo.reset()
