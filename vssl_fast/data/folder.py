"""ImageNet-100 and any class-folder tree of JPEGs: NVIDIA DALI, or torchvision when DALI is missing.

``build_folder_data`` checks both splits once (``folder_files.validate_folder``: bad files left out
and counted), picks the training loader and says which runs and why:

- ``folder_dali.DaliTwoViewLoader``: ``data.loader=dali``, or ``auto`` when ``nvidia.dali`` imports
  (GPU "mixed" decode on a CUDA device, DALI's CPU-only mode otherwise);
- ``folder_torchvision.NvjpegTwoViewLoader`` on a CUDA device without DALI (nvJPEG decode, GPU
  augmentation), ``folder_torchvision.TorchvisionTwoViewLoader`` on the CPU (PIL in workers).

Validation and the kNN bank (``folder_eval.FolderEvalLoader``): resize 256 (bilinear, as solo-learn's
torchvision validation transform), centre crop 224, at ``data.crop_size`` 224 (other crops resize in
proportion: 32 -> 37); ``data.workers`` workers, else min(4, cores); ``eval.knn_train_subset`` draws
the bank as a fixed stratified random sample of the train folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vssl_fast.config import device_formats
from vssl_fast.data.augment import view_specs
from vssl_fast.data.folder_dali import DaliTwoViewLoader
from vssl_fast.data.folder_eval import FolderEvalLoader
from vssl_fast.data.folder_files import BadDataError, BadFiles, FolderSamples, default_workers, split_dir, validate_folder
from vssl_fast.data.folder_torchvision import NvjpegTwoViewLoader, TorchvisionTwoViewLoader
from vssl_fast.data.tools import set_max_image_pixels

log = logging.getLogger("vssl_fast")

__all__ = ["build_folder_data", "dali_available", "check_classes"]


def dali_available() -> tuple[bool, str]:
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "no DALI"
        return False, f"nvidia.dali is not importable ({type(e).__name__}: {e}); install the 'dali' extra"
    return True, "nvidia.dali is installed"


def check_classes(train: FolderSamples, val: FolderSamples, expected: int = 0, rank: int = 0) -> None:
    """Both splits must hold the same class folders (labels are the sorted folders' indices: a class missing from
    one split would shift every later label), and a tree with other than ``expected`` classes (``data.num_classes``:
    100 for ImageNet-100) says so in the log; classes without a readable image are named too."""
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))
        only_v = sorted(set(val.classes) - set(train.classes))
        raise BadDataError(f"{train.root} and {val.root} hold different classes ({len(train.classes)} and "
                           f"{len(val.classes)}; only in train: {only_t[:5]}, only in val: {only_v[:5]}): labels would "
                           "not match; give both splits the same class folders")
    if rank != 0:
        return
    if expected and len(train.classes) != expected:
        fewer = len(train.classes) < expected
        log.warning("data: %d classes under %s, %s the %d the dataset has (data.num_classes=%d): %s",
                    len(train.classes), train.root, "fewer than" if fewer else "more than", expected, expected,
                    "this run trains and evaluates on part of it" if fewer else "is data.path the dataset meant?")
    for s in (train, val):
        empty = sorted(set(s.classes) - {s.classes[int(y)] for y in np.unique(s.labels)})
        if empty:
            log.warning("data: %d classes under %s hold no readable image: %s", len(empty), s.root,
                        ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""))


def build_folder_data(cfg, device, rank: int = 0, world: int = 1):
    """The training loader (two views), the validation loader and the kNN bank of a class-folder tree."""
    from vssl_fast.data import DataBundle

    d = cfg.data
    root = Path(d.path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.path={d.path!r} is not a folder; for ImageNet-100 build it with "
                                "`python -m vssl_fast.data imagenet100 --src /path/to/imagenet --dst data/imagenet100`")
    train_dir, val_dir = split_dir(root, ("train",)), split_dir(root, ("val", "test"))
    specs = view_specs("imagenet", d.augmentations, d.crop_size)
    bad = BadFiles(d.max_bad_fraction, rank)
    set_max_image_pixels(d.max_image_pixels)  # PIL's own limit, for the loaders' workers
    # once per tree (cached): bad files left out
    train_s = validate_folder(train_dir, d.cache_dir, bad, "train", max_pixels=d.max_image_pixels)
    val_s = validate_folder(val_dir, d.cache_dir, bad, "val", max_pixels=d.max_image_pixels)
    check_classes(train_s, val_s, d.num_classes, rank)
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
                                  workers=dw, bad=bad, threads=d.dali_threads,
                                  hw_decoder_load=d.dali_hw_decoder_load)  # the pipeline is built on the first batch
        desc = f"{train.describe()}, on {train_dir}: {why}"
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
