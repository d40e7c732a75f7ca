"""Launch-bound regressions fail here: ops dispatched and Triton kernels launched per training step
(the fast step in its GPU configuration: channels-last, bf16 autocast, fused losses, FusedLARS, EMA,
BatchNorm restore) and per loader batch, counted at a tiny size (``bench/bench_dispatch.py``).

At CIFAR size every dispatched op is a kernel the host issues one by one on a GPU (issue 12), so
the counts are the cost. Bounds are the counts recorded on 2026-11-27 (torch 2.14.1, CPU) plus 2%
for op decompositions that differ between torch versions; a change that lowers a count should
lower its bound here and record the figure in bench/RESULTS.md.
"""

import torch

from bench.bench_dispatch import count_loader, count_optimizers, count_step

# the loader per batch at data.aug_chunk=16 (the CUDA default), averaged over one chunk; 1,597 at chunk=1.
# Issue 13 (plans cached, norms reduced in one launch, LAMB's clip in-kernel): step 1,415 -> 1,407 ATen
# ops and 15 -> 13 Triton launches, counted in one run against the previous commit.
RECORDED = {"step_aten": 1407, "step_triton": 13, "loader_aten": 104}
# Per call over the ImageNet-100 model's 86 tensors (2 parameter groups, one dtype): LAMB 5 launches per
# group (norm sweep, both reductions, moments, update reduction, update), LARS 3 (norm sweep, reductions,
# update); ATen ops: the optimizer's profiling hook (2) and the skip flag's reshape. Before issue 13:
# LAMB 12 launches + 23 ATen ops (allocations, the clip as 7 tensor ops), LARS 8 + 11.
RECORDED_OPTIM = {"FusedLAMB.step": (10, 3), "FusedLARS.step": (6, 3), "ema_update_": (1, 1), "restore_where_": (1, 1)}


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


def test_multi_tensor_calls_launch_and_dispatch_budget():
    res = count_optimizers(torch.device("cuda" if torch.cuda.is_available() else "cpu"), reps=3)
    assert set(res) == set(RECORDED_OPTIM)
    for name, (launches, aten) in RECORDED_OPTIM.items():
        got = res[name]
        assert got["triton_launches"] == launches, f"{name}: {got['triton_launches']} Triton launches, recorded {launches}"
        assert got["aten_ops"] <= aten, f"{name}: {got['aten_ops']} ATen ops per call ({got['ops']}), recorded {aten}"
