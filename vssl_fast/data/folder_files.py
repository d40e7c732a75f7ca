"""Class-folder trees of images: listing, the one check per tree, bad-file accounting, positional state.

Layout: ``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*.JPEG`` (or ``test``).

Bad files: ``validate_folder`` checks every file once per tree before training (``tools.quick_check``:
empty, not an image, truncated; no decoding; cached in ``data.cache_dir`` by the tree's names,
sizes and modification times). Bad files are left out, logged once each with the file name and
counted (``BadFiles``, in the metrics and results.json); more than ``data.max_bad_fraction`` of
a split fails the run with one line naming ``python -m vssl_fast.data scan``. ``SkippingImageFolder``
(the PIL path and evaluation) skips a file that passes the check but fails to decode where it is met.

Every training loader (``folder_dali``, ``folder_torchvision``) is a ``PositionalLoader``: it yields
exactly ``steps_per_epoch`` batches per epoch, in one order: the ``epoch_indices`` of
``vssl_fast.data.loader`` (a permutation per (seed, epoch), global batches cut into rank slices,
the same as the CIFAR loader's), and draws every random number from generators seeded by
(seed, rank, epoch, position). A loader's state is (epoch, step); ``load_state_dict`` puts it
anywhere in a run at once, and the batches from there equal an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vssl_fast.data.loader import full_batches
from vssl_fast.faults import DataError

log = logging.getLogger("vssl_fast")

__all__ = ["BadFiles", "BadDataError", "FolderSamples", "validate_folder", "split_dir", "default_workers",
           "SkippingImageFolder", "PositionalLoader", "samples_of", "seeded", "MAX_BAD_FRACTION"]

MAX_BAD_FRACTION = 0.01  # the default of data.max_bad_fraction


def split_dir(root: Path, names=("train",)) -> Path:
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


def _list_tree(root: Path) -> tuple[list[str], list[tuple[str, int]], str, list[tuple[str, str]]]:
    """Classes, (relative path, label) of every image file (ImageFolder's rules and order), a key of the listing
    (names, sizes, modification times) that changes whenever a file does, and the entries left out: folder
    links to a folder already listed (link cycles: ``tools.walk_tree``) and second names of a file already
    listed, so that each real file is listed once."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from vssl_fast.data.tools import walk_tree

    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root}: no class folders; expected {root}/<class>/*.jpg")
    claimed: dict = {}
    for c in classes:  # every class folder is its own, whatever links inside the others point at
        with contextlib.suppress(OSError):
            st = os.stat(root / c)
            claimed.setdefault((st.st_dev, st.st_ino), str(root / c))
    files, problems, seen, h = [], [], {}, hashlib.sha1()
    for label, c in enumerate(classes):
        folders, loops = walk_tree(root / c, claimed)
        problems += loops
        for dirpath, names in folders:
            for name in names:
                if not name.lower().endswith(IMG_EXTENSIONS):
                    continue
                p = os.path.join(dirpath, name)
                rel = os.path.relpath(p, root)
                try:
                    st = os.stat(p)
                except OSError:
                    h.update(f"{rel}|missing\n".encode())
                    files.append((rel, label))
                    continue
                first = seen.setdefault((st.st_dev, st.st_ino), p)
                if first != p:
                    problems.append((p, f"the same file as {first}, which is listed once"))
                    continue
                h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
                files.append((rel, label))
    for p, why in problems:
        h.update(f"{os.path.relpath(p, root)}|{why}\n".encode())
    return classes, files, h.hexdigest()[:20], problems


def validate_folder(root, cache_dir: str | None = "~/.cache/vssl_fast", bad: BadFiles | None = None,
                    split: str = "train", max_pixels: int | None = None) -> FolderSamples:
    """Check every image file of a class-folder tree once (``tools.quick_check``: size, header, end
    marker, no decoding; images of more than ``max_pixels`` pixels, ``data.max_image_pixels``, are bad too),
    register the bad ones in ``bad`` with the entries the listing left out (link cycles, second names of a
    file) and return the readable ones with their sizes.

    The results are cached in ``cache_dir`` (keyed by the folder, every file's name, size and
    modification time, and the pixel limit), so a tree is checked again only when it changes; threads
    check files in parallel.
    """
    from concurrent.futures import ThreadPoolExecutor

    from vssl_fast.data.tools import MAX_IMAGE_PIXELS, quick_check

    max_pixels = int(max_pixels or MAX_IMAGE_PIXELS)
    root = Path(root).expanduser().absolute()  # not resolved: paths as ImageFolder(root) spells them (_KNOWN_BAD)
    classes, files, key, left_out = _list_tree(root)
    memo = (str(root), key, max_pixels)
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
            checked = list(ex.map(lambda f: quick_check(root / f[0], max_pixels), files, chunksize=256))
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
    bad.splits[split] = (str(root), len(files) + len(left_out))
    for p, why in left_out:
        bad.add(split, p, why, shared=True)
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


def samples_of(train_dir, cache_dir, bad: BadFiles) -> FolderSamples:
    return train_dir if isinstance(train_dir, FolderSamples) else validate_folder(train_dir, cache_dir, bad, "train")


class PositionalLoader:
    """Epoch/step state shared by the image-folder training loaders: the order is ``epoch_indices`` and
    every random draw is a function of (seed, rank, epoch, position), so ``load_state_dict`` is instant."""

    def _init_position(self, samples: FolderSamples, batch_size, seed, rank, world):
        self.samples, self.batch_size, self.seed, self.rank, self.world = samples, batch_size, seed, rank, world
        # a batch larger than the data: a config error naming train.batch_size (exit 2), as for CIFAR
        self.steps_per_epoch = full_batches(len(samples), world, batch_size,
                                            f"{len(samples)} readable training images under {samples.root}")
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



@contextlib.contextmanager
def seeded(seed: int | None):
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
        else:  # ImageFolder's listing, without its link cycles (each real file once)
            root = Path(root).expanduser().absolute()
            classes, files, _, _ = _list_tree(root)
            keep = [(p, y) for p, y in ((str(root / rel), label) for rel, label in files) if p not in _KNOWN_BAD]
            self.inner = _Samples(root, classes, keep)
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
            with seeded(seed):
                return self.transform(img), y, skipped
        raise RuntimeError(f"no readable image in {self.inner.root}: all {n} files failed to open; "
                           f"run `python -m vssl_fast.data scan {self.inner.root}`")

    def __getitem__(self, i):
        out, y, _ = self.load(i)
        return (*out, y) if isinstance(out, tuple) else (out, y)


