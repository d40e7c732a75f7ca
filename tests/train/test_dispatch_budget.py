"""Launch-bound regressions fail here: ops dispatched and Triton kernels launched per training step
(the fast step in its GPU configuration: channels-last, bf16 autocast, fused losses, FusedLARS, EMA,
BatchNorm restore) and per loader batch, counted at a tiny size (``bench/bench_dispatch.py``).

At CIFAR size every dispatched op is a kernel the host issues one by one on a GPU (issue 12), so
the counts are the cost. Bounds are the counts recorded on 2026-11-27 (torch 2.14.1, CPU) plus 2%
for op decompositions that differ between torch versions; a change that lowers a count should
lower its bound here and record the figure in bench/RESULTS.md.
"""

import torch

from bench.bench_dispatch import count_loader, count_step

# the loader per batch at data.aug_chunk=16 (the CUDA default), averaged over one chunk; 1,597 at chunk=1
RECORDED = {"step_aten": 1399, "step_triton": 15, "loader_aten": 104}


def _bound(key):
    return int(RECORDED[key] * 1.02)


def test_fast_step_dispatch_budget():
    res = count_step(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert res["optimizer"] == "FusedLARS" and res["channels_last"]
    assert res["aten_ops"] <= _bound("step_aten"), f"{res['aten_ops']} ATen ops per step; most frequent {res['top_ops']}"
    assert res["triton_launches"] <= _bound("step_triton"), f"{res['triton_launches']} Triton launches per step"
    assert res["triton_launches"] >= 10, "the fused kernels did not run (losses, LARS, EMA, restore)"


def test_loader_dispatch_budget():
    res = count_loader(torch.device("cuda" if torch.cuda.is_available() else "cpu"), chunk=16)
    assert res["aten_ops"] <= _bound("loader_aten"), f"{res['aten_ops']} ATen ops per batch; most frequent {res['top_ops']}"
