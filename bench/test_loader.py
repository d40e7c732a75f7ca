"""Loaders, per batch (``bench.bench_data``'s paths): warm-up batches apart (pipeline build, workers,
the prefetch queue filling), one batch per round, the loader closed (workers joined) at the end.

Anywhere: the device-resident CIFAR loader's host time per batch (random uint8 CIFAR-size data;
on a CPU the augmentation runs on the host). GPU cases: the JPEG-folder paths (the torchvision
CPU DataLoader baseline, DALI when importable, the torchvision nvJPEG path) on the benchmark's
photo-like JPEGs, with img/s and the ratio to the same run's CPU baseline in extra_info.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bench.bench_data import Batches, dali_loader, make_jpegs
from bench.common import bench_device
from bench.conftest import CUDA, GPU_ONLY, SMOKE
from bench.timing import LOADER

JPEGS = Path(os.environ.get("VSSL_BENCH_JPEGS", "/tmp/vssl_bench_jpegs"))


def _time(benchmark, measure, loader, group: str, **extra):
    from bench.timing import Reps

    spe = len(loader) if hasattr(loader, "__len__") else 0  # whole epochs, as bench_data.time_loader
    reps = Reps(warmup=max(LOADER.warmup, spe), min_reps=max(LOADER.min_reps, 2 * spe), min_time_s=LOADER.min_time_s,
                max_reps=max(LOADER.max_reps, 2 * spe))
    b = Batches(loader)
    size = []

    def one():
        size.append(next(b)[0].shape[0])

    try:
        t = measure(one, group=group, reps=reps, kind="wall", **extra)
    finally:
        left = b.close()
    if t is not None:  # images over the timed wall time (bench_data.rate_row: bursty loaders)
        benchmark.extra_info.update(img_per_s=size[-1] / (t.mean_ms * 1e-3), batch=size[-1], children_left=left)
    return t, size[-1] if size else None


def test_cifar_device_loader(benchmark, measure):
    from vssl_fast.data.augment import view_specs
    from vssl_fast.data.loader import DeviceTwoViewLoader

    device = bench_device()
    n, bs = (50_000, 512) if CUDA else (4096, 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    chunk = 16 if CUDA else 1  # data.aug_chunk=auto
    ld = DeviceTwoViewLoader(x, y, bs, view_specs("cifar10"), 0, out_dtype=torch.bfloat16 if CUDA else torch.float32,
                             chunk=chunk)
    _time(benchmark, measure, ld, "loader per batch", path="cifar_device", chunk=chunk)


@GPU_ONLY
@pytest.mark.parametrize("path", ["torchvision_cpu_baseline", "dali", "torchvision_nvjpeg"])
def test_jpeg_folder_loader(benchmark, measure, same_run, path):
    from vssl_fast.data import folder, folder_torchvision
    from vssl_fast.data.augment import view_specs

    n, bs, crop = (32, 8, 64) if SMOKE else (4096, 256, 224)
    train = make_jpegs(JPEGS, n)
    device, cores = bench_device(), os.cpu_count() or 1
    specs = view_specs("imagenet", "asymmetric", crop)
    if path == "torchvision_cpu_baseline":
        ld = folder_torchvision.TorchvisionTwoViewLoader(train, specs, bs, 0, 0, 1, device, cores, False, torch.float32)
    elif path == "dali":
        ok, why = folder.dali_available()
        if not ok:
            pytest.skip(f"DALI: {why}")
        ld = dali_loader(train, specs, bs, device)  # as bench_data times it
    else:
        ld = folder_torchvision.NvjpegTwoViewLoader(train, specs, bs, 0, 0, 1, device, min(cores, 8), False, torch.float32)
    if path == "dali" and ld.device_id is None:
        path = "dali_cpu_only"  # what ran: DALI's CPU pipeline (no CUDA device), not the GPU one
    benchmark.extra_info["pipeline"] = ld.describe() if hasattr(ld, "describe") else f"torchvision PIL, {cores} workers"
    t, _ = _time(benchmark, measure, ld, "jpeg folder loader per batch", path=path)
    if t is None:
        return
    same_run[("jpeg", path)] = t
    base = same_run.get(("jpeg", "torchvision_cpu_baseline"))
    if base is not None:
        benchmark.extra_info["x_cpu_baseline"] = base.mean_ms / t.mean_ms  # wall-time rates, as bench_data
