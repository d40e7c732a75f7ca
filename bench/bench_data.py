"""Data-path throughput, all paths in the same run: images/s, each image giving two augmented views.

    python -m bench.bench_data                  # on a GPU (DALI if importable: see bench/RESULTS.md)
    python -m bench.bench_data --tiny           # smoke run on the CPU
    python -m bench.bench_data --dali-threads 4,8 --dali-hw-load 0.65,0.9   # and DALI's settings swept

With ``--dali-threads`` / ``--dali-hw-load`` the DALI pipeline is also timed at every pair of the
grid, after the other paths, with the product's defaults (``data.dali_threads``,
``data.dali_hw_decoder_load``) timed first and again last; a ``dali_settings`` row names the pair to
make the defaults, or keeps them (``choose_dali_settings``: the rule and what it rests on).

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
from bench.timing import LOADER, TINY, Reps, Timing, time_ms, wall_clock
from vssl_fast.data.augment import view_specs


def _jpeg(args) -> None:
    """One photo-like JPEG: a smooth random field plus noise, quality 85; a pure function of (seed, i)."""
    from PIL import Image

    path, i, size, seed = args
    rng = np.random.default_rng([seed, i])
    small = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize(size, Image.BICUBIC)).astype(np.float32)
    img = np.clip(base + rng.normal(0, rng.uniform(10, 25), base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=85)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)  # a cut run never leaves half a JPEG under its final name


def make_jpegs(root: Path, n: int, size=(500, 375), classes: int = 8, seed: int = 0, procs: int | None = None) -> Path:
    """``n`` photo-like JPEGs (about 50-110 KB at 500x375) in ``classes`` folders under ``root/train``,
    made in parallel (one process per core) and only those missing: the data and e2e benchmarks
    share one folder, so the images are made once per machine."""
    train = root / "train"
    todo = []
    for i in range(n):
        d = train / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        if not (d / f"{i:06d}.jpg").exists():
            todo.append((d / f"{i:06d}.jpg", i, size, seed))
    procs = procs or min(len(todo), os.cpu_count() or 1)
    if procs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            pool.map(_jpeg, todo, chunksize=max(1, len(todo) // (4 * procs)))
    else:
        for job in todo:
            _jpeg(job)
    return train


class Batches:
    """Endless batches of a loader (a new epoch when one ends); ``close`` ends its iterator and the
    loader (pipeline, worker processes) so nothing of it runs during the next path's timing."""

    def __init__(self, loader):
        self.loader, self.it = loader, None

    def __next__(self):
        for _ in range(2):
            if self.it is None:
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.it = None
        raise RuntimeError(f"{type(self.loader).__name__} yields no batch")

    def close(self) -> int:
        """Close; returns how many child processes are still alive afterwards (0 when all shut down)."""
        import gc
        import multiprocessing

        if self.it is not None and hasattr(self.it, "close"):
            self.it.close()  # a generator: its DataLoader iterator (and workers) go with it
        self.it = None
        if hasattr(self.loader, "close"):
            self.loader.close()
        self.loader = None
        gc.collect()
        for p in multiprocessing.active_children():
            p.join(timeout=30)  # a worker that ignores its shutdown is counted, not waited for forever
        return len(multiprocessing.active_children())


def time_loader(make, reps: Reps, clock=None) -> tuple[Timing, int, int]:
    """(per-batch timing, images per batch, child processes left after closing) of the loader ``make()``
    builds. Warm-up batches (pipeline build, workers starting, first decodes, the prefetch queue
    filling) are counted apart: at least one whole epoch of a loader that says its length. The timed
    batches then span at least two whole epochs, and the rate is images over the timed wall time (the
    mean batch, ``rate_row``): a multi-worker loader delivers in bursts (one long wait, then a batch
    from every worker at once), so its median batch would measure the queue, not the production, and
    epoch ends (workers restarted) belong to the cost."""
    loader = make()
    spe = len(loader) if hasattr(loader, "__len__") else 0
    if spe:
        reps = Reps(warmup=max(reps.warmup, spe), min_reps=max(reps.min_reps, 2 * spe), min_time_s=reps.min_time_s,
                    max_reps=max(reps.max_reps, 2 * spe))
    b = Batches(loader)
    size = []

    def one():
        v1, _, _ = next(b)
        size.append(v1.shape[0])

    try:
        t = time_ms(one, reps, clock=clock or wall_clock())
    finally:
        left = b.close()
    return t, size[-1], left


def rate_row(t: Timing, batch: int) -> dict:
    """Images per second over the timed wall time (the mean batch: see ``time_loader``), and from the
    median batch beside it (far above the mean when a loader delivers in bursts)."""
    return dict(img_per_s=batch / (t.mean_ms * 1e-3), img_per_s_median=batch / (t.ms * 1e-3) if t.ms > 0 else None,
                batch_p20_ms=t.p20,
                batch_p80_ms=t.p80, batches=t.samples, warmup_batches=t.warmup, timed_s=t.timed_s, timer=t.timer)


def dali_loader(train, specs, batch: int, device, **settings):
    """The product's DALI loader as the benchmarks time it: the trainer's default reader processes
    (min(4, cores) on a card, none on a CPU), ``settings`` (threads, hw_decoder_load) passed on."""
    from vssl_fast.data.folder_dali import DaliTwoViewLoader

    workers = min(4, os.cpu_count() or 1) if device.type == "cuda" else 0
    return DaliTwoViewLoader(train, specs, batch, 0, 0, 1, device, False, torch.float32, workers=workers, **settings)


def dali_grid(threads: str, hw_load: str) -> list[tuple[int, float]]:
    """The sweep's (data.dali_threads, data.dali_hw_decoder_load) pairs from two comma lists ('' = the
    default alone); threads 0 is auto, resolved as the product resolves it."""
    from vssl_fast.config import DataConfig
    from vssl_fast.data.folder_dali import dali_threads

    d = DataConfig()
    try:
        ts = [int(v) for v in threads.split(",")] if threads else [d.dali_threads]
        hs = [float(v) for v in hw_load.split(",")] if hw_load else [d.dali_hw_decoder_load]
    except ValueError as e:
        raise SystemExit(f"bench_data: --dali-threads takes integers and --dali-hw-load numbers, comma-separated: {e}") from None
    bad = [t for t in ts if t < 0] + [h for h in hs if not 0.0 <= h <= 1.0]
    if bad:
        raise SystemExit(f"bench_data: threads must be >= 0 (0 = auto) and hw_decoder_load in [0, 1]; got {bad}")
    return sorted({(dali_threads(t), h) for t in ts for h in hs})


def choose_dali_settings(default: tuple[int, float], rates: dict[tuple[int, float], float],
                         default_rates: list[float], min_gain: float = 0.03, auto_threads: int | None = None) -> dict:
    """The defaults the sweep supports. ``rates``: images/s per (threads, hw_decoder_load) pair;
    ``default_rates``: the default pair timed before and after the others (its drift over the sweep).
    A pair replaces the defaults only when its rate beats the default's best by more than both
    ``min_gain`` and that drift; otherwise the defaults stay ('keep the defaults'). A thread count
    equal to the auto rule's here (``auto_threads``) is reported as 0, auto: a fixed count would lose
    the per-rank share of the node's cores (the sweep runs one rank)."""
    from vssl_fast.data.folder_dali import dali_threads

    auto = dali_threads(0) if auto_threads is None else auto_threads
    as_setting = lambda pair: {"data.dali_threads": 0 if pair[0] == auto else pair[0],  # noqa: E731
                               "data.dali_hw_decoder_load": pair[1]}
    base = max(default_rates)
    drift = (max(default_rates) - min(default_rates)) / base if len(default_rates) > 1 else None
    best = max(rates, key=rates.get)
    margin = max(min_gain, drift or 0.0)
    won = best != default and rates[best] > base * (1 + margin)
    return dict(choice=as_setting(best) if won else "keep the defaults", fastest=as_setting(best),
                x_default=rates[best] / base, default=as_setting(default), auto_threads=auto,
                default_drift=drift, needed_gain=margin,
                rule=f"the fastest pair, only when it beats the defaults' best rate by more than "
                     f"max({min_gain:.0%}, the defaults' drift between their first and last timing); one rank, "
                     f"data.dali_threads 0 = auto ({auto} threads here)",
                rests_on={f"{t} threads, hw {h:g}": round(r, 1) for (t, h), r in sorted(rates.items())}
                | {"defaults, each timing": [round(r, 1) for r in default_rates]})


def run(tiny: bool, jpeg_dir: Path, device, emit=None, reps: Reps | None = None,
        dali_sweep: list[tuple[int, float]] | None = None) -> list[dict]:
    """Every path's img/s; the CPU DataLoader baseline is measured before the paths compared with
    it, so each row goes to ``emit`` complete as soon as it is measured. Each path: 8 warm-up
    batches, then at least 40 batches and 3 s (``bench.timing.LOADER``), its loader closed (workers
    joined) before the next path is built. ``dali_sweep`` (``dali_grid``): DALI's settings timed last."""
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
    n, bs = (512, 64) if tiny else (50_000, 512)
    reps = reps or (TINY if tiny else LOADER)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    specs = view_specs("cifar10")
    t, got, left = time_loader(lambda: DeviceTwoViewLoader(x, y, bs, specs, 0, out_dtype=torch.bfloat16 if device.type == "cuda"
                                                           else torch.float32), reps)
    add(path="cifar_device", crop=32, batch=got, **rate_row(t, got), children_left=left, note=f"on {device.type}")
    # --- ImageNet-style JPEGs
    nj, bsj = (32, 8) if tiny else (4096, 256)
    t0 = time.perf_counter()
    train = make_jpegs(jpeg_dir, nj)
    made_s = time.perf_counter() - t0
    files = list(train.rglob("*.jpg"))
    nj, sz = len(files), sum(p.stat().st_size for p in files) / len(files) / 1024
    crop = 64 if tiny else 224
    ispecs = view_specs("imagenet", "asymmetric", crop)
    mk = lambda: TorchvisionTwoViewLoader(train, ispecs, bsj, 0, 0, 1, device, cores, False, torch.float32)  # noqa: E731
    t, got, left = time_loader(mk, reps)
    base = rate_row(t, got)["img_per_s"]
    add(path="torchvision_cpu_baseline", crop=crop, batch=got, **rate_row(t, got), x_cpu_baseline=1.0, children_left=left,
        note=f"torchvision PIL decode and augmentation in {cores} workers; {nj} JPEGs of {sz:.0f} KB (made or found "
             f"in {made_s:.0f} s)")
    ok, why = dali_available()
    if ok:
        made = []  # the loader timed, for its own account of the pipeline it built
        mk = lambda: made.append(dali_loader(train, ispecs, bsj, device)) or made[-1]  # noqa: E731
        t, got, left = time_loader(mk, reps)
        r = rate_row(t, got)
        add(path="dali" if made[-1].device_id is not None else "dali_cpu_only", crop=crop, batch=got, **r,
            x_cpu_baseline=r["img_per_s"] / base, children_left=left, note=f"{made[-1].describe()}; {sz:.0f} KB JPEGs")
    else:
        add(path="dali", crop=crop, batch=bsj, img_per_s=None, note=f"not measured: {why}")
    made = []
    mk = lambda: made.append(NvjpegTwoViewLoader(train, ispecs, bsj, 0, 0, 1, device, min(cores, 8), False,  # noqa: E731
                                                 torch.float32)) or made[-1]
    t, got, left = time_loader(mk, reps)
    r = rate_row(t, got)
    add(path="torchvision_nvjpeg" if made[-1].device.type == "cuda" else "torchvision_decode_jpeg_cpu", crop=crop,
        batch=got, **r, x_cpu_baseline=r["img_per_s"] / base, children_left=left, note=made[-1].describe())
    if ok and dali_sweep:
        sweep_dali(train, ispecs, bsj, device, reps, dali_sweep, base, crop, sz, add)
    return rows


def sweep_dali(train, ispecs, bsj, device, reps, grid, base, crop, sz, add) -> None:
    """DALI's pipeline at each (threads, hw_decoder_load) pair of ``grid``: the product's defaults first
    and last (their drift over the sweep), every row emitted as it ends, then the ``dali_settings``
    row (``choose_dali_settings``), each to ``add``."""
    from vssl_fast.config import DataConfig
    from vssl_fast.data.folder_dali import dali_threads

    d = DataConfig()
    default = (dali_threads(d.dali_threads), d.dali_hw_decoder_load)
    order = [default] + [g for g in grid if g != default] + [default]
    rates, default_rates, pfx = {}, [], "dali"
    for threads, hw in order:
        made = []

        def mk(made=made, threads=threads, hw=hw):
            made.append(dali_loader(train, ispecs, bsj, device, threads=threads, hw_decoder_load=hw))
            return made[-1]

        t, got, left = time_loader(mk, reps)
        r = rate_row(t, got)
        pfx = "dali" if made[-1].device_id is not None else "dali_cpu_only"
        add(path=f"{pfx}_sweep", crop=crop, batch=got, dali_threads=threads, hw_decoder_load=hw, **r,
            x_cpu_baseline=r["img_per_s"] / base, children_left=left,
            note=f"{made[-1].describe()}; {sz:.0f} KB JPEGs" + ("; the defaults" if (threads, hw) == default else ""))
        if (threads, hw) == default:
            default_rates.append(r["img_per_s"])
        else:
            rates[(threads, hw)] = r["img_per_s"]
    rates[default] = max(default_rates)
    add(path=f"{pfx}_settings", crop=crop, batch=bsj, **choose_dali_settings(default, rates, default_rates))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--jpeg-dir", default=".cache/bench_jpegs")
    ap.add_argument("--out", default="bench/results/data.jsonl")
    ap.add_argument("--require-dali", action="store_true", help="fail when the DALI path cannot be measured")
    ap.add_argument("--make-jpegs-only", action="store_true", help="make the benchmark JPEGs (every core) and stop")
    ap.add_argument("--dali-threads", default="", help="sweep data.dali_threads over these, e.g. 4,8 (0 = auto)")
    ap.add_argument("--dali-hw-load", default="", help="sweep data.dali_hw_decoder_load over these, e.g. 0.65,0.9")
    a = ap.parse_args(argv)
    sweep = dali_grid(a.dali_threads, a.dali_hw_load) if (a.dali_threads or a.dali_hw_load) else None
    if a.make_jpegs_only:
        t0 = time.perf_counter()
        n = 64 if a.tiny else 4096  # bench_e2e --tiny uses 64, bench_data --tiny the first 32
        make_jpegs(Path(a.jpeg_dir), n)
        print(f"{n} JPEGs in {a.jpeg_dir}/train ({time.perf_counter() - t0:.1f} s)")
        return []
    env = env_info()
    sink = RowSink("data", a.out, env)
    rows = run(a.tiny, Path(a.jpeg_dir), bench_device(), emit=sink.emit, dali_sweep=sweep)
    print(header("data paths", env))
    timed = [r for r in rows if not r["path"].endswith("_settings")]
    print(markdown_table(timed, ["path", "crop", "batch", "img_per_s", "batch_p20_ms", "batch_p80_ms", "batches",
                                "x_cpu_baseline", "children_left"] + (["dali_threads", "hw_decoder_load"] if sweep else [])
                         + ["note"]))
    for r in rows:
        if r["path"].endswith("_settings"):
            print(f"DALI settings: {r['choice']} (fastest {r['fastest']}, x{r['x_default']:.3f} the defaults; "
                  f"needed > x{1 + r['needed_gain']:.3f}; rests on {r['rests_on']})")
    missing = [r for r in timed if r.get("img_per_s") is None]
    if a.require_dali and missing:
        raise SystemExit(f"bench_data: {missing[0]['path']} not measured ({missing[0]['note']}); --require-dali makes "
                         "that a failure (bring DALI with bench/gpu_check's dali stage)")
    return rows


if __name__ == "__main__":
    main()
