"""ImageNet-100 and any class-folder tree of JPEGs: NVIDIA DALI, or torchvision when DALI is missing.

Layout: ``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*.JPEG`` (or ``test``).

Every training loader yields exactly ``steps_per_epoch`` batches per epoch, in one order: the
``epoch_indices`` of ``vssl_fast.data.loader`` (a permutation per (seed, epoch), global batches cut
into rank slices, the same as the CIFAR loader's), and draws every random number from generators
seeded by (seed, rank, epoch, position). A loader's state is (epoch, step); ``load_state_dict``
puts it anywhere in a run at once, and the batches from there equal an uninterrupted run's.

Bad files: ``validate_folder`` checks every file once per tree before training (``tools.quick_check``:
empty, not an image, truncated; no decoding; cached in ``data.cache_dir`` by the tree's names,
sizes and modification times). Bad files are left out, logged once each with the file name and
counted (``BadFiles``, in the metrics and results.json); more than ``data.max_bad_fraction`` of
a split fails the run with one line naming ``python -m vssl_fast.data scan``.

DALI (``data.loader=dali``, or ``auto`` when ``nvidia.dali`` imports): a batch-mode external
source (``DaliBatchSource``; in ``data.workers`` spawned processes on a GPU) reads this rank's
files of the batch and draws both views' parameters; one decode per image ("mixed", i.e. nvJPEG
on the GPU; CPU decoding in DALI's CPU-only mode when there is no GPU), and both views cropped and
augmented inside the pipeline with the METHOD.md §3.4 settings: random resized crop (torchvision's
box, scale 0.08-1, ratio 3/4-4/3, cubic resize), colour twist with p 0.8 (brightness/contrast
0.6-1.4, saturation 0.8-1.2, hue +-36 deg; DALI applies them in a fixed order, torchvision in a
random one), grayscale p 0.2, Gaussian blur (23x23 window, sigma 0.1-2) and solarisation per view
as the table says, then flip + normalisation in CropMirrorNormalize. The output is NCHW float,
ready for channels-last bf16. The pipeline is built at the first batch, at the loader's position
(evaluation never builds it); a file that DALI still cannot decode stops the run with a line
naming ``scan``.

torchvision (no DALI): with a GPU, workers read the file bytes and ``torchvision.io.decode_jpeg``
decodes each batch with nvJPEG on the GPU, where both views are cropped and augmented
(``augment_list``); without one, worker processes produce both views with the PIL transforms
(PIL GaussianBlur and Solarize, as solo-learn's torchvision pipeline), torch's and Python's
generators seeded per sample. A file that passes the check but fails to decode is skipped where
it is met (the next file takes its place), counted in the main process, logged once.
The log says which path runs and why. Validation and the kNN bank: resize 256 (bilinear, as
solo-learn's torchvision validation transform), centre crop 224, at ``data.crop_size`` 224 (other
crops resize in proportion: 32 -> 37); ``data.workers`` workers, else min(4, cores);
``eval.knn_train_subset`` draws the bank as a fixed stratified random sample of the train folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vssl_fast.config import device_formats
from vssl_fast.data.augment import MEANS_STDS, ViewSpec, view_specs
from vssl_fast.faults import DataError

log = logging.getLogger("vssl_fast")

__all__ = ["build_folder_data", "dali_available", "make_dali_pipeline", "DaliBatchSource", "DaliTwoViewLoader",
           "TwoViewTransform", "SkippingImageFolder", "NvjpegTwoViewLoader", "TorchvisionTwoViewLoader", "FolderEvalLoader",
           "BadFiles", "BadDataError", "FolderSamples", "validate_folder", "default_workers", "MAX_BAD_FRACTION"]

MAX_BAD_FRACTION = 0.01  # the default of data.max_bad_fraction


def dali_available() -> tuple[bool, str]:
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "no DALI"
        return False, f"nvidia.dali is not importable ({type(e).__name__}: {e}); install the 'dali' extra"
    return True, "nvidia.dali is installed"


def _split_dir(root: Path, names=("train",)) -> Path:
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise FileNotFoundError(f"{root}: no {'/'.join(names)} folder; "
                            "expected <root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg")


def default_workers(configured: int, cap: int = 0) -> int:
    """``data.workers`` when set (> 0), else one per core, at most ``cap`` when given."""
    if configured > 0:
        return configured
    cores = os.cpu_count() or 1
    return min(cap, cores) if cap else cores


# ----------------------------------------------------------------------------- bad files
class BadDataError(DataError):  # train.py (vssl_fast.faults) prints its one line and exits 4
    """Too many bad image files, or a file DALI could not decode; the message names the folder and ``scan``."""


class BadFiles:
    """The bad image files of a run, by split: each logged once with its name and why, and counted.

    ``add`` raises ``BadDataError`` (one line naming ``python -m vssl_fast.data scan``) as soon as a
    split's share of bad files passes ``max_fraction`` (``data.max_bad_fraction``). Files found by the
    validation are found by every rank alike and logged by rank 0 only; files that fail later are
    found by the rank that reads them.
    """

    def __init__(self, max_fraction: float = MAX_BAD_FRACTION, rank: int = 0):
        self.max_fraction, self.rank = float(max_fraction), rank
        self.files: dict[str, tuple[str, str]] = {}  # path -> (split, why)
        self.shared: set[str] = set()  # found by the validation (the same on every rank)
        self.splits: dict[str, tuple[str, int]] = {}  # split -> (folder, image files in it)

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, path) -> bool:
        return str(path) in self.files

    def count(self, split: str | None = None) -> int:
        return sum(1 for s, _ in self.files.values() if split is None or s == split)

    def add(self, split: str, path: str, why: str, shared: bool = False) -> None:
        """Count and log a bad file; ``shared``: found by the validation (which judges the share once at its end)."""
        path = str(path)
        if path in self.files:
            return
        self.files[path] = (split, why)
        if shared:
            self.shared.add(path)
        if not shared or self.rank == 0:
            log.warning("bad image file, skipped: %s (%s)", path, why)
        if not shared:
            self.check(split)

    def check(self, split: str) -> None:
        if split not in self.splits:
            return
        folder, n = self.splits[split]
        k = self.count(split)
        if n and k / n > self.max_fraction:
            raise BadDataError(f"{k} of {n} image files in {folder} are bad ({100 * k / n:.3g}%, more than "
                               f"data.max_bad_fraction={self.max_fraction:g}); list them with "
                               f"`python -m vssl_fast.data scan {folder}` and remove or replace them")

    def global_count(self, group=None) -> int:
        """All ranks' bad files (a collective when a process group is up): the shared ones once, plus each
        rank's own."""
        import torch.distributed as dist

        own = sorted(set(self.files) - self.shared)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            lists = [None] * dist.get_world_size()
            dist.all_gather_object(lists, own, group=group)
            own = sorted({p for lst in lists for p in lst})
        return len(self.shared) + len(own)


@dataclass
class FolderSamples:
    """The readable images of a class-folder tree, in ImageFolder's order (classes sorted, files sorted)."""

    root: Path
    classes: list[str]
    paths: list[str]
    labels: np.ndarray  # int64 [n]
    sizes: np.ndarray  # int64 [n, 2]: (height, width) from each file's header
    num_files: int  # image files found, bad ones included

    def __len__(self) -> int:
        return len(self.paths)


_VALIDATED: dict[tuple[str, str], dict] = {}  # (folder, listing key) -> results: checked once per process
_KNOWN_BAD: dict[str, str] = {}  # path -> why, for SkippingImageFolder built on a validated tree


def _list_tree(root: Path) -> tuple[list[str], list[tuple[str, int]], str]:
    """Classes, (relative path, label) of every image file (ImageFolder's rules), and a key of the listing
    (names, sizes, modification times) that changes whenever a file does."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root}: no class folders; expected {root}/<class>/*.jpg")
    files, h = [], hashlib.sha1()
    for label, c in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(root / c, followlinks=True)):
            for name in sorted(names):
                if not name.lower().endswith(IMG_EXTENSIONS):
                    continue
                p = os.path.join(dirpath, name)
                rel = os.path.relpath(p, root)
                try:
                    st = os.stat(p)
                    h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
                except OSError:
                    h.update(f"{rel}|missing\n".encode())
                files.append((rel, label))
    return classes, files, h.hexdigest()[:20]


def validate_folder(root, cache_dir: str | None = "~/.cache/vssl_fast", bad: BadFiles | None = None,
                    split: str = "train") -> FolderSamples:
    """Check every image file of a class-folder tree once (``tools.quick_check``: size, header, end
    marker, no decoding), register the bad ones in ``bad`` and return the readable ones with their sizes.

    The results are cached in ``cache_dir`` (keyed by the folder and every file's name, size and
    modification time), so a tree is checked again only when it changes; threads check files in parallel.
    """
    from concurrent.futures import ThreadPoolExecutor

    from vssl_fast.data.tools import quick_check

    root = Path(root).expanduser().absolute()  # not resolved: paths as ImageFolder(root) spells them (_KNOWN_BAD)
    classes, files, key = _list_tree(root)
    memo = (str(root), key)
    res = _VALIDATED.get(memo)
    cache = None
    if res is None and cache_dir:
        cache = Path(cache_dir).expanduser() / f"folder-{root.name}-{hashlib.sha1(str(memo).encode()).hexdigest()[:16]}.json"
        try:
            res = json.loads(cache.read_text())["files"]
        except (OSError, ValueError, KeyError):
            res = None
    if res is None:
        t0 = time.time()
        with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as ex:
            checked = list(ex.map(lambda f: quick_check(root / f[0]), files, chunksize=256))
        res = {rel: (list(hw) if why is None else why) for (rel, _), (why, hw) in zip(files, checked)}
        log.info("checked %d image files under %s in %.1fs", len(files), root, time.time() - t0)
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")  # ranks may write at once: each its own
                tmp.write_text(json.dumps({"root": str(root), "files": res}))
                os.replace(tmp, cache)
            except OSError as e:
                log.warning("could not cache the file check of %s in %s (%s)", root, cache, e)
    _VALIDATED[memo] = res
    bad = bad if bad is not None else BadFiles(float("inf"))
    bad.splits[split] = (str(root), len(files))
    paths, labels, sizes = [], [], []
    for rel, label in files:
        r = res[rel]
        p = str(root / rel)
        if isinstance(r, str):
            _KNOWN_BAD[p] = r
            bad.add(split, p, r, shared=True)
        else:
            paths.append(p)
            labels.append(label)
            sizes.append(r)
    bad.check(split)
    return FolderSamples(root, classes, paths, np.asarray(labels, dtype=np.int64),
                         np.asarray(sizes, dtype=np.int64).reshape(-1, 2), len(files))


def _samples(train_dir, cache_dir, bad: BadFiles) -> FolderSamples:
    return train_dir if isinstance(train_dir, FolderSamples) else validate_folder(train_dir, cache_dir, bad, "train")


class _PositionalLoader:
    """Epoch/step state shared by the image-folder training loaders: the order is ``epoch_indices`` and
    every random draw is a function of (seed, rank, epoch, position), so ``load_state_dict`` is instant."""

    def _init_position(self, samples: FolderSamples, batch_size, seed, rank, world):
        self.samples, self.batch_size, self.seed, self.rank, self.world = samples, batch_size, seed, rank, world
        self.steps_per_epoch = len(samples) // (world * batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(samples)} readable training images under {samples.root} cannot fill one global "
                             f"batch of {world} x {batch_size}")
        self.epoch, self.step = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "world": self.world,
                "images": len(self.samples)}

    def load_state_dict(self, st: dict) -> None:
        if st.get("world", self.world) != self.world or st.get("seed", self.seed) != self.seed:
            raise ValueError(f"loader state was saved with world={st.get('world')} seed={st.get('seed')}, "
                             f"resuming with world={self.world} seed={self.seed}")
        if st.get("images", len(self.samples)) != len(self.samples):
            log.warning("the training folder %s had %d readable images when the checkpoint was written and has %d "
                        "now: the batches after this resume differ from an uninterrupted run's",
                        self.samples.root, st["images"], len(self.samples))
        self.epoch, self.step = int(st["epoch"]), int(st["step"])

    def _order(self, epoch: int) -> torch.Tensor:
        from vssl_fast.data.loader import epoch_indices

        return epoch_indices(len(self.samples), self.seed, epoch, self.steps_per_epoch, self.world, self.batch_size,
                             self.rank)

    def _finish_views(self, v1, v2, y):
        v1, v2 = (v.to(self.device, non_blocking=True).to(self.out_dtype) for v in (v1, v2))
        if self.channels_last:
            v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
        return v1, v2, y.reshape(-1).long().to(self.device, non_blocking=True)

    def __len__(self) -> int:
        return self.steps_per_epoch


# ----------------------------------------------------------------------------- DALI
N_VIEW_PARAMS = 14  # per view: roi (4), brightness, contrast, saturation, hue, 4 coins, blur sigma, flip


def _rrc_boxes(H: np.ndarray, W: np.ndarray, scale, ratio, rng: np.random.Generator, attempts: int = 10):
    """torchvision RandomResizedCrop.get_params per image (as ``augment.rrc_params``, in numpy, one size per
    image): the first of 10 valid draws, else the centre crop clipped to the ratio range."""
    n = len(H)
    u = rng.random((n, attempts, 4))
    area = (H * W)[:, None]
    target = area * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lr0 + u[..., 1] * (lr1 - lr0))
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    first = ok.argmax(1)
    r = np.arange(n)
    hh, ww = h[r, first], w[r, first]
    top = np.floor(u[r, first, 2] * (H - hh + 1))
    left = np.floor(u[r, first, 3] * (W - ww + 1))
    in_ratio = W / H
    fw = np.where(in_ratio > max(ratio), np.round(H * max(ratio)), W)
    fh = np.where(in_ratio < min(ratio), np.round(W / min(ratio)), H)
    has = ok.any(1)
    hh, ww = np.where(has, hh, fh), np.where(has, ww, fw)
    top, left = np.where(has, top, (H - fh) // 2), np.where(has, left, (W - fw) // 2)
    return top, left, hh, ww


def dali_view_params(spec: ViewSpec, hw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every random parameter of one view for a batch of images of sizes ``hw`` [n, 2], float32 [n, 14]:
    crop box (relative top, left, bottom, right), brightness, contrast, saturation, hue (degrees), the
    jitter, grayscale, blur and solarize coins, blur sigma, the flip coin."""
    H, W = hw[:, 0].astype(np.float64), hw[:, 1].astype(np.float64)
    n = len(H)
    top, left, h, w = _rrc_boxes(H, W, spec.scale, spec.ratio, rng)
    u = rng.random((n, 10))
    out = np.empty((n, N_VIEW_PARAMS), np.float32)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = top / H, left / W, (top + h) / H, (left + w) / W
    for k, amount in ((4, spec.brightness), (5, spec.contrast), (6, spec.saturation)):
        lo = max(0.0, 1 - amount)
        out[:, k] = lo + u[:, k - 4] * (1 + amount - lo)
    out[:, 7] = 360.0 * spec.hue * (2 * u[:, 3] - 1)  # DALI's hue is in degrees
    out[:, 8] = u[:, 4] < spec.jitter_p
    out[:, 9] = u[:, 5] < spec.gray_p
    out[:, 10] = u[:, 6] < spec.blur_p
    out[:, 11] = spec.blur_sigma[0] + u[:, 7] * (spec.blur_sigma[1] - spec.blur_sigma[0])
    out[:, 12] = u[:, 8] < spec.solarize_p
    out[:, 13] = u[:, 9] < spec.flip_p
    return out


class DaliBatchSource:
    """The DALI pipeline's external source: batch ``step`` of ``epoch`` for one rank, as the encoded files,
    their labels and every random parameter of both views [B, 2, 14].

    Everything is a function of the position: the order is ``epoch_indices`` and the parameters come
    from a generator seeded with (seed, rank, epoch, step). DALI counts its own epochs from 0 and
    iterations from 0 within each, from the position the pipeline was built at (``start``); an epoch
    ends (StopIteration) after ``steps`` batches. Picklable, for DALI's worker processes.
    """

    def __init__(self, samples: FolderSamples, specs, seed, rank, world, batch_size, steps, start=(0, 0)):
        self.paths, self.labels, self.sizes = list(samples.paths), samples.labels, samples.sizes
        self.specs, self.seed, self.rank, self.world = tuple(specs), seed, rank, world
        self.batch_size, self.steps, self.start = batch_size, steps, (int(start[0]), int(start[1]))
        self._epoch, self._idx = None, None

    def position(self, epoch_idx: int, iteration: int) -> tuple[int, int]:
        return self.start[0] + epoch_idx, iteration + (self.start[1] if epoch_idx == 0 else 0)

    def batch(self, epoch: int, step: int):
        from vssl_fast.data.loader import batch_seed, epoch_indices

        if self._epoch != epoch:
            self._idx = epoch_indices(len(self.paths), self.seed, epoch, self.steps, self.world, self.batch_size,
                                      self.rank).numpy()
            self._epoch = epoch
        idx = self._idx[step]
        files = [np.fromfile(self.paths[i], dtype=np.uint8) for i in idx]
        labels = self.labels[idx].astype(np.int32).reshape(-1, 1)
        rng = np.random.default_rng(batch_seed(self.seed, self.rank, epoch, step))
        params = np.stack([dali_view_params(s, self.sizes[idx], rng) for s in self.specs], axis=1)
        return files, labels, params

    def __call__(self, info):
        epoch, step = self.position(int(info.epoch_idx), int(info.iteration))
        if step >= self.steps:
            raise StopIteration
        return self.batch(epoch, step)


def make_dali_pipeline(source, specs: tuple[ViewSpec, ViewSpec], batch_size: int, device_id: int | None = None,
                       num_threads: int = 4, workers: int = 0):
    """The two-view DALI pipeline fed by ``source`` (a ``DaliBatchSource``); ``device_id=None`` builds the
    CPU-only variant. ``workers`` > 0 runs the source in that many worker processes (spawned)."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    gpu = device_id is not None

    def view(images, spec: ViewSpec, p):
        x = fn.resize(images, size=[spec.crop_size, spec.crop_size], roi_start=p[0:2], roi_end=p[2:4],
                      roi_relative=True, interp_type=types.INTERP_CUBIC, antialias=True)
        x = fn.cast(x, dtype=types.FLOAT)
        if spec.jitter_p > 0:
            tw = fn.color_twist(x, brightness=p[4], contrast=p[5], saturation=p[6], hue=p[7])
            x = p[8] * dmath.clamp(tw, 0.0, 255.0) + (1.0 - p[8]) * x
        if spec.gray_p > 0:
            r, g, b = (fn.slice(x, start=[k], shape=[1], axes=[2], out_of_bounds_policy="error") for k in range(3))
            gray = 0.2989 * r + 0.587 * g + 0.114 * b
            x = p[9] * fn.cat(gray, gray, gray, axis=2) + (1.0 - p[9]) * x
        if spec.blur_p > 0:
            bl = fn.gaussian_blur(x, window_size=spec.blur_kernel, sigma=p[11])
            x = p[10] * bl + (1.0 - p[10]) * x
        if spec.solarize_p > 0:
            hit = fn.cast(x >= 128.0, dtype=types.FLOAT) * p[12]
            x = hit * (255.0 - x) + (1.0 - hit) * x
        return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std],
                                        mirror=fn.cast(p[13], dtype=types.INT32))

    extra = dict(py_num_workers=workers, py_start_method="spawn") if workers > 0 else {}

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0, exec_dynamic=True,
                  **extra)
    def pipe():
        es = dict(parallel=True, prefetch_queue_depth=max(2, workers)) if workers > 0 else {}
        jpegs, labels, params = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                                   dtype=[types.UINT8, types.INT32, types.FLOAT], **es)
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                   adjust_orientation=False)  # as PIL/torchvision, and the header sizes used above
        return view(images, specs[0], params[0]), view(images, specs[1], params[1]), labels

    return pipe()


class DaliTwoViewLoader(_PositionalLoader):
    """(view1, view2, labels) from DALI, exactly ``steps_per_epoch`` batches per epoch, with the trainer's
    loader interface (epoch/step state).

    ``train_dir`` is a folder (checked once with ``validate_folder``) or its ``FolderSamples``. The
    pipeline is built on the first iteration, at the loader's position, so constructing the loader
    (e.g. for evaluation) costs no pipeline and a resume costs one pipeline build, not a replay.
    """

    def __init__(self, train_dir, specs, batch_size, seed, rank, world, device, channels_last, out_dtype, *,
                 workers: int = 0, bad: BadFiles | None = None, cache_dir: str | None = "~/.cache/vssl_fast"):
        self.bad = bad if bad is not None else BadFiles()
        self._init_position(_samples(train_dir, cache_dir, self.bad), batch_size, seed, rank, world)
        self.specs, self.device, self.channels_last, self.out_dtype = specs, device, channels_last, out_dtype
        self.workers = workers
        self.pipe, self.it, self._at = None, None, None  # _at: the position the pipeline yields next

    def _build(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.close()
        src = DaliBatchSource(self.samples, self.specs, self.seed, self.rank, self.world, self.batch_size,
                              self.steps_per_epoch, (self.epoch, self.step))
        dev_id = self.device.index if self.device.type == "cuda" else None
        self.pipe = make_dali_pipeline(src, self.specs, self.batch_size, dev_id,
                                       num_threads=max(2, min(8, os.cpu_count() or 2)), workers=self.workers)
        self.pipe.build()
        self.it = DALIGenericIterator([self.pipe], ["v1", "v2", "y"], auto_reset=True)
        self._at = (self.epoch, self.step)

    def close(self):
        """Release the pipeline (and its worker processes)."""
        self.it, self.pipe, self._at = None, None, None

    def _failure(self, e: Exception) -> BadDataError:
        """DALI's error (pages of it) as one line that names the batch, the folder and ``scan``."""
        text = str(e)
        lines = [x.strip() for x in text.split("encountered:", 1)[-1].splitlines() if x.strip()]
        return BadDataError(f"DALI failed on batch {self.step} of epoch {self.epoch} from {self.samples.root} "
                            f"({(lines[0] if lines else type(e).__name__)[:300]}): a file changed or is damaged "
                            f"inside; find it with `python -m vssl_fast.data scan {self.samples.root}` and remove "
                            "it, or train with --data.loader=torchvision, which skips such files")

    def __iter__(self):
        """The rest of the current epoch; afterwards the loader points at the next epoch's start."""
        if self.step >= self.steps_per_epoch:  # every batch is out (e.g. resumed from a checkpoint at an epoch's end)
            if self.it is not None and self._at == (self.epoch, self.step):
                for _ in self.it:  # take DALI's end of epoch, so that the next epoch starts afresh
                    raise RuntimeError(f"DALI gave more than {self.steps_per_epoch} batches in epoch {self.epoch}")
            self.epoch, self.step = self.epoch + 1, 0
            self._at = (self.epoch, 0) if self.it is not None else None
            return
        while True:
            try:
                if self._at != (self.epoch, self.step):
                    self._build()  # runs the first batch already
                b = next(self.it)  # after the epoch's last batch DALI ends the epoch (and resets itself)
            except StopIteration:
                break
            except RuntimeError as e:
                self.close()
                if "decode" not in str(e).lower():
                    raise
                raise self._failure(e) from e
            self.step += 1
            self._at = (self.epoch, self.step)
            yield self._finish_views(b[0]["v1"], b[0]["v2"], b[0]["y"])
        if self.step != self.steps_per_epoch:
            raise RuntimeError(f"DALI ended epoch {self.epoch} after {self.step} of {self.steps_per_epoch} batches")
        self.epoch, self.step = self.epoch + 1, 0
        self._at = (self.epoch, 0)


# ----------------------------------------------------------------------------- torchvision
@contextlib.contextmanager
def _seeded(seed: int | None):
    """torch's CPU generator and Python's ``random`` seeded for one sample, restored afterwards (the main
    process's streams are untouched when there are no workers)."""
    if seed is None:
        yield
        return
    st_torch, st_py = torch.random.default_generator.get_state(), random.getstate()
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.random.default_generator.set_state(st_torch)
        random.setstate(st_py)


class TwoViewTransform:
    """solo-learn's torchvision pipeline for a ViewSpec pair (PIL ops), returning two tensors."""

    def __init__(self, specs):
        from PIL import ImageFilter, ImageOps
        from torchvision import transforms as T

        def blur(img, s):
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*s.blur_sigma)))

        def make(s: ViewSpec):
            return T.Compose([
                T.RandomResizedCrop(s.crop_size, scale=s.scale, ratio=s.ratio, interpolation=T.InterpolationMode.BICUBIC),
                T.RandomApply([T.ColorJitter(s.brightness, s.contrast, s.saturation, s.hue)], p=s.jitter_p),
                T.RandomGrayscale(p=s.gray_p),
                T.RandomApply([T.Lambda(lambda im, s=s: blur(im, s))], p=s.blur_p),
                T.RandomApply([T.Lambda(ImageOps.solarize)], p=s.solarize_p),
                T.RandomHorizontalFlip(p=s.flip_p),
                T.ToTensor(),
                T.Normalize(s.mean, s.std),
            ])

        self.t1, self.t2 = make(specs[0]), make(specs[1])

    def __call__(self, img):
        return self.t1(img), self.t2(img)


class _Samples:
    """ImageFolder's attributes (root, classes, samples, targets) for a validated sample list."""

    def __init__(self, root, classes, samples):
        self.root, self.classes, self.samples = str(root), classes, samples
        self.targets = [y for _, y in samples]


class SkippingImageFolder(torch.utils.data.Dataset):
    """ImageFolder that skips unreadable files: the next readable file takes the place of a bad one.

    Files that ``validate_folder`` found bad are left out at construction (``samples`` given, or the
    tree validated before); a file that fails to open or decode later is skipped where it is met,
    logged once per process and reported to the caller by ``load``. Only a tree with no readable
    file at all is an error here; the share of bad files is judged by ``BadFiles``.
    """

    def __init__(self, root, transform, samples: FolderSamples | None = None):
        if samples is not None:
            self.inner = _Samples(samples.root, samples.classes,
                                  [(p, int(y)) for p, y in zip(samples.paths, samples.labels)])
        else:
            from torchvision.datasets import ImageFolder

            inner = ImageFolder(str(root))
            keep = [(p, y) for p, y in inner.samples if p not in _KNOWN_BAD]
            self.inner = _Samples(inner.root, inner.classes, keep) if len(keep) < len(inner.samples) else inner
        self.transform = transform
        self.bad: set[str] = set()

    def __len__(self):
        return len(self.inner.samples)

    def load(self, i: int, seed: int | None = None):
        """(transformed output, label, [(path, why) of files skipped on the way]); ``seed`` seeds the transform."""
        from PIL import Image

        n = len(self.inner.samples)
        skipped = []
        for k in range(n):
            path, y = self.inner.samples[(i + k) % n]
            try:
                with Image.open(path) as im:
                    img = im.convert("RGB")  # decodes every byte: truncated data raises here
            except Exception as e:  # noqa: BLE001 - a bad file: skip it, say so once
                skipped.append((path, f"{type(e).__name__}: {e}"))
                if path not in self.bad:
                    self.bad.add(path)
                    log.warning("bad image file, skipped: %s (%s)", path, e)
                continue
            with _seeded(seed):
                return self.transform(img), y, skipped
        raise RuntimeError(f"no readable image in {self.inner.root}: all {n} files failed to open; "
                           f"run `python -m vssl_fast.data scan {self.inner.root}`")

    def __getitem__(self, i):
        out, y, _ = self.load(i)
        return (*out, y) if isinstance(out, tuple) else (out, y)


class _EpochViews(torch.utils.data.Dataset):
    """The rest of one epoch for one rank: item j is sample ``idx[j]`` at position ``start + j``, its
    augmentation seeded with (seed, rank, epoch, position), whichever worker loads it. The last
    element lists the files skipped on the way ("path\\twhy" lines) for the main process to count."""

    def __init__(self, ds: SkippingImageFolder, idx: list[int], seed: int, rank: int, epoch: int, start: int):
        self.ds, self.idx, self.seed, self.rank, self.epoch, self.start = ds, idx, seed, rank, epoch, start

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, j):
        from vssl_fast.data.loader import batch_seed

        (v1, v2), y, skipped = self.ds.load(self.idx[j], batch_seed(self.seed, self.rank, self.epoch, self.start + j))
        return v1, v2, y, "\n".join(f"{p}\t{why}" for p, why in skipped)


class TorchvisionTwoViewLoader(_PositionalLoader):
    """Both views made by PIL transforms in DataLoader workers (the CPU path without DALI).

    Order: ``epoch_indices``; augmentation: torch's and Python's generators seeded per sample with
    (seed, rank, epoch, position), so a resume at any step gives the same views and the worker
    count does not change them."""

    def __init__(self, train_dir, specs, batch_size, seed, rank, world, device, workers, channels_last, out_dtype, *,
                 bad: BadFiles | None = None, cache_dir: str | None = "~/.cache/vssl_fast"):
        self.bad = bad if bad is not None else BadFiles()
        self._init_position(_samples(train_dir, cache_dir, self.bad), batch_size, seed, rank, world)
        self.ds = SkippingImageFolder(self.samples.root, TwoViewTransform(specs), samples=self.samples)
        self.device, self.workers, self.channels_last, self.out_dtype = device, workers, channels_last, out_dtype

    def _note(self, skipped) -> None:
        for lines in skipped:
            for line in filter(None, lines.split("\n")):
                path, why = line.split("\t", 1)
                self.bad.add("train", path, why)

    def __iter__(self):
        """The rest of the current epoch; afterwards the loader points at the next epoch's start."""
        idx = self._order(self.epoch)[self.step:].reshape(-1).tolist()
        views = _EpochViews(self.ds, idx, self.seed, self.rank, self.epoch, self.step * self.batch_size)
        dl = torch.utils.data.DataLoader(views, batch_size=self.batch_size, num_workers=self.workers, drop_last=True,
                                         pin_memory=self.device.type == "cuda",
                                         generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
        for v1, v2, y, skipped in dl:
            self._note(skipped)
            self.step += 1
            yield self._finish_views(v1, v2, y)
        self.epoch, self.step = self.epoch + 1, 0


class _BytesFolder(torch.utils.data.Dataset):
    """(encoded bytes, label, path) of samples ``idx``; decoding happens batched on the device."""

    def __init__(self, samples: FolderSamples, idx: list[int]):
        self.samples, self.idx = samples, idx

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, j):
        i = self.idx[j]
        path = self.samples.paths[i]
        with open(path, "rb") as f:
            return f.read(), int(self.samples.labels[i]), path  # plain bytes: pickled back, no shared-memory fds


def _collate_bytes(batch):
    return [b[0] for b in batch], torch.tensor([b[1] for b in batch]), [b[2] for b in batch]


class NvjpegTwoViewLoader(_PositionalLoader):
    """torchvision path with a GPU: workers read file bytes, ``decode_jpeg(device='cuda')`` decodes the
    batch with nvJPEG, and both views are cropped and augmented on the GPU (``augment_list``) with a
    generator seeded by (seed, rank, epoch, step). Files that fail to decode are skipped and counted
    (the batch is smaller); a batch that is all bad is an error."""

    def __init__(self, train_dir, specs, batch_size, seed, rank, world, device, workers, channels_last, out_dtype, *,
                 bad: BadFiles | None = None, cache_dir: str | None = "~/.cache/vssl_fast"):
        self.bad = bad if bad is not None else BadFiles()
        self._init_position(_samples(train_dir, cache_dir, self.bad), batch_size, seed, rank, world)
        self.specs, self.device, self.workers, self.channels_last, self.out_dtype = (specs, device, workers,
                                                                                    channels_last, out_dtype)

    def _decode(self, raw, paths):
        from torchvision.io import ImageReadMode, decode_jpeg

        datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in raw]
        try:
            return decode_jpeg(datas, device=self.device, mode=ImageReadMode.RGB), list(range(len(datas)))
        except RuntimeError:  # find the bad ones one by one
            imgs, keep = [], []
            for k, (d, p) in enumerate(zip(datas, paths)):
                try:
                    imgs.append(decode_jpeg(d, device=self.device, mode=ImageReadMode.RGB))
                    keep.append(k)
                except RuntimeError as e:
                    self.bad.add("train", p, f"undecodable: {e}")
            if not imgs:
                raise BadDataError(f"a whole batch of {len(datas)} images failed to decode, e.g. {paths[:3]}; run "
                                   f"`python -m vssl_fast.data scan {self.samples.root}`") from None
            return imgs, keep

    def __iter__(self):
        """The rest of the current epoch; afterwards the loader points at the next epoch's start."""
        from vssl_fast.data.augment import augment_list
        from vssl_fast.data.loader import batch_seed

        idx = self._order(self.epoch)[self.step:].reshape(-1).tolist()
        dl = torch.utils.data.DataLoader(_BytesFolder(self.samples, idx), batch_size=self.batch_size,
                                         num_workers=self.workers, drop_last=True, collate_fn=_collate_bytes,
                                         generator=torch.Generator().manual_seed(0))
        for datas, y, paths in dl:
            imgs, keep = self._decode(datas, paths)
            g = torch.Generator(device=self.device).manual_seed(batch_seed(self.seed, self.rank, self.epoch, self.step))
            v1, v2 = (augment_list(imgs, s, g).to(self.out_dtype) for s in self.specs)
            if self.channels_last:
                v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
            self.step += 1
            yield v1, v2, y[keep].to(self.device, non_blocking=True)
        self.epoch, self.step = self.epoch + 1, 0


class FolderEvalLoader:
    """Resize 256 (shorter side) + centre crop 224 + normalise: solo-learn's torchvision validation transform
    (``transforms.Resize(256)``, bilinear with antialiasing; its DALI linear-eval pipeline resizes bicubically,
    ``interpolation="bicubic"``). ``subset`` > 0: a fixed stratified random sample of that many images."""

    def __init__(self, root, batch_size, rank, world, device, workers, crop=224, resize=256, interpolation="bilinear",
                 subset: int = 0):
        from torchvision import transforms as T

        from vssl_fast.data import BANK_SEED, stratified_subset

        modes = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
        if interpolation not in modes:
            raise ValueError(f"FolderEvalLoader: interpolation must be one of {sorted(modes)}, got {interpolation!r}")
        mean, std = MEANS_STDS["imagenet"]
        tf = T.Compose([T.Resize(resize, interpolation=modes[interpolation]), T.CenterCrop(crop), T.ToTensor(),
                        T.Normalize(mean, std)])
        self.root = Path(root)
        self.ds = SkippingImageFolder(root, tf)
        keep = stratified_subset(self.ds.inner.targets, subset, BANK_SEED) if subset else range(len(self.ds))
        idx = [int(i) for i in keep[rank::world]]
        self.num_samples = len(keep)  # over all ranks
        self.dl = torch.utils.data.DataLoader(torch.utils.data.Subset(self.ds, idx), batch_size=batch_size,
                                              num_workers=workers, shuffle=False)
        self.device = device

    def __iter__(self):
        for x, y in self.dl:
            yield x.to(self.device, non_blocking=True), y.to(self.device)

    def __len__(self):
        return len(self.dl)


def build_folder_data(cfg, device, rank: int = 0, world: int = 1):
    from vssl_fast.data import DataBundle

    d = cfg.data
    root = Path(d.path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.path={d.path!r} is not a folder; for ImageNet-100 build it with "
                                "`python -m vssl_fast.data imagenet100 --src /path/to/imagenet --dst data/imagenet100`")
    train_dir, val_dir = _split_dir(root, ("train",)), _split_dir(root, ("val", "test"))
    specs = view_specs("imagenet", d.augmentations, d.crop_size)
    bad = BadFiles(d.max_bad_fraction, rank)
    train_s = validate_folder(train_dir, d.cache_dir, bad, "train")  # once per tree (cached): bad files left out
    validate_folder(val_dir, d.cache_dir, bad, "val")
    workers = default_workers(d.workers)
    _, dt, cl = device_formats(cfg, device)
    ok, why = dali_available()
    use_dali = d.loader == "dali" or (d.loader == "auto" and ok)
    if d.loader == "dali" and not ok:
        raise RuntimeError(f"data.loader=dali but {why}")
    if use_dali:
        # the Python reader processes of the pipeline's external source; none on a CPU (serial, in this process)
        dw = default_workers(d.workers, cap=4) if device.type == "cuda" else d.workers
        train = DaliTwoViewLoader(train_s, specs, cfg.train.batch_size, cfg.train.seed, rank, world, device, cl, dt,
                                  workers=dw, bad=bad)  # the pipeline is built on the first batch
        desc = (f"DALI ({'GPU mixed decode' if device.type == 'cuda' else 'CPU-only'}, {dw} reader processes) on "
                f"{train_dir}: {why}")
    else:
        reason = "data.loader=torchvision" if d.loader == "torchvision" else why
        cls = NvjpegTwoViewLoader if device.type == "cuda" else TorchvisionTwoViewLoader
        train = cls(train_s, specs, cfg.train.batch_size, cfg.train.seed, rank, world, device, workers, cl, dt, bad=bad)
        how = "nvJPEG decode + GPU augmentation" if device.type == "cuda" else "PIL decode + augmentation in workers"
        desc = f"torchvision ImageFolder, {how}, {workers} workers, on {train_dir} (not DALI: {reason})"
    desc += f"; {len(train_s):,} training images in {len(train_s.classes)} classes, {len(bad)} bad files left out"
    ebs = max(cfg.train.batch_size, 128)
    ew = default_workers(d.workers, cap=4)  # evaluation: data.workers, else min(4, cores)
    crop, resize = d.crop_size, round(d.crop_size * 256 / 224)  # 224 -> 256 as solo-learn; other crops in proportion
    val = FolderEvalLoader(val_dir, ebs, rank, world, device, ew, crop=crop, resize=resize)
    bank = FolderEvalLoader(train_dir, ebs, rank, world, device, ew, crop=crop, resize=resize,
                            subset=cfg.eval.knn_train_subset)
    bundle = DataBundle(train, val, bank, len(train_s.classes), desc)
    bundle.bad_files = bad  # the trainer counts them in its metrics and results.json
    return bundle
