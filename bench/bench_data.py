"""Data-path throughput, all paths in the same run: images/s, each image giving two augmented views.

    python -m bench.bench_data                  # on a GPU (DALI if importable: see bench/RESULTS.md)
    python -m bench.bench_data --tiny           # smoke run on the CPU

Paths: the device-resident CIFAR loader (32 px, real CIFAR-10 arrays when cached, else random
uint8); for ImageNet-style JPEGs (500x375 photos-like images of 50-110 KB that the benchmark
writes once to --jpeg-dir) the product's DALI pipeline (full METHOD.md augmentations, blur and
solarisation included), the torchvision nvJPEG path (GPU decode + GPU augmentation), and a
torchvision CPU DataLoader with one worker per core (PIL transforms) as the baseline.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import RowSink, bench_device, env_info, header, markdown_table
from vssl_fast.data.augment import view_specs


def make_jpegs(root: Path, n: int, size=(500, 375), classes: int = 8, seed: int = 0) -> Path:
    """Photo-like JPEGs: a smooth random field plus noise, quality 85 (about 50-110 KB at 500x375)."""
    from PIL import Image

    train = root / "train"
    if train.is_dir() and sum(1 for _ in train.rglob("*.jpg")) >= n:
        return train
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = train / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)
        base = np.asarray(Image.fromarray(small).resize(size, Image.BICUBIC)).astype(np.float32)
        img = np.clip(base + rng.normal(0, rng.uniform(10, 25), base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=85)
        (d / f"{i:06d}.jpg").write_bytes(buf.getvalue())
    return train


def _time_loader(make, steps, batch):
    ld = make()
    it = iter(ld)
    next(it)  # warm-up (pipeline build, workers, first decode)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = 0
    for _ in range(steps):
        try:
            v1, v2, y = next(it)
        except StopIteration:
            it = iter(ld)
            v1, v2, y = next(it)
        done += v1.shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    it.close()  # shut the loader's workers down before the next path starts
    return done / dt


def run(tiny: bool, jpeg_dir: Path, device, emit=None) -> list[dict]:
    """Every path's img/s; the CPU DataLoader baseline is measured before the paths compared with
    it, so each row goes to ``emit`` complete as soon as it is measured."""
    from vssl_fast.data.folder import dali_available
    from vssl_fast.data.folder_torchvision import NvjpegTwoViewLoader, TorchvisionTwoViewLoader
    from vssl_fast.data.loader import DeviceTwoViewLoader

    rows = []

    def add(**row):
        rows.append(row)
        if emit is not None:
            emit(row)

    cores = os.cpu_count() or 1
    # --- GPU-resident CIFAR
    n, bs, steps = (512, 64, 3) if tiny else (50_000, 512, 50)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    specs = view_specs("cifar10")
    ips = _time_loader(lambda: DeviceTwoViewLoader(x, y, bs, specs, 0, out_dtype=torch.bfloat16 if device.type == "cuda"
                                                   else torch.float32), steps, bs)
    add(path="cifar_device", crop=32, batch=bs, img_per_s=ips, note=f"on {device.type}")
    # --- ImageNet-style JPEGs
    nj, bsj, stj = (32, 8, 2) if tiny else (4096, 256, 12)
    t0 = time.perf_counter()
    train = make_jpegs(jpeg_dir, nj)
    sz = sum(p.stat().st_size for p in train.rglob("*.jpg")) / nj / 1024
    crop = 64 if tiny else 224
    ispecs = view_specs("imagenet", "asymmetric", crop)
    mk = lambda: TorchvisionTwoViewLoader(train, ispecs, bsj, 0, 0, 1, device, cores, False, torch.float32)  # noqa: E731
    base = _time_loader(mk, stj, bsj)
    add(path="torchvision_cpu_baseline", crop=crop, batch=bsj, img_per_s=base, x_cpu_baseline=1.0,
        note=f"torchvision PIL decode and augmentation in {cores} workers; {nj} JPEGs of {sz:.0f} KB made in "
             f"{time.perf_counter() - t0:.0f} s")
    ok, why = dali_available()
    if ok:
        from vssl_fast.data.folder_dali import DaliTwoViewLoader

        workers = min(4, cores) if device.type == "cuda" else 0  # the trainer's default reader processes
        made = []  # the loader timed, for its own account of the pipeline it built
        mk = lambda: made.append(DaliTwoViewLoader(train, ispecs, bsj, 0, 0, 1, device, False,  # noqa: E731
                                                   torch.float32, workers=workers)) or made[-1]
        ips = _time_loader(mk, stj, bsj)
        add(path="dali" if made[-1].device_id is not None else "dali_cpu_only", crop=crop, batch=bsj, img_per_s=ips,
            x_cpu_baseline=ips / base, note=f"{made[-1].describe()}; {sz:.0f} KB JPEGs")
    else:
        add(path="dali", crop=crop, batch=bsj, img_per_s=None, note=f"not measured: {why}")
    made = []
    mk = lambda: made.append(NvjpegTwoViewLoader(train, ispecs, bsj, 0, 0, 1, device, min(cores, 8), False,  # noqa: E731
                                                 torch.float32)) or made[-1]
    ips = _time_loader(mk, stj, bsj)
    add(path="torchvision_nvjpeg" if made[-1].device.type == "cuda" else "torchvision_decode_jpeg_cpu", crop=crop,
        batch=bsj, img_per_s=ips, x_cpu_baseline=ips / base, note=made[-1].describe())
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--jpeg-dir", default=".cache/bench_jpegs")
    ap.add_argument("--out", default="bench/results/data.jsonl")
    a = ap.parse_args(argv)
    env = env_info()
    sink = RowSink("data", a.out, env)
    rows = run(a.tiny, Path(a.jpeg_dir), bench_device(), emit=sink.emit)
    print(header("data paths", env))
    print(markdown_table(rows, ["path", "crop", "batch", "img_per_s", "x_cpu_baseline", "note"]))
    return rows


if __name__ == "__main__":
    main()
