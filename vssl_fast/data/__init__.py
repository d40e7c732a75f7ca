"""Data: sources (decode once, cache), device-side augmentations, loaders."""

from __future__ import annotations

import contextlib
import logging
import pickle
import tarfile
import zipfile
import zlib

import numpy as np
import torch

from vssl_fast.config import device_formats
from vssl_fast.data.augment import MEANS_STDS, view_specs
from vssl_fast.data.loader import DeviceEvalLoader, DeviceTwoViewLoader
from vssl_fast.data.sources import DataNotFound, load_cifar_arrays, resolve_data_path
from vssl_fast.faults import DataError, one_line

__all__ = ["build_data", "reading_data", "DataNotFound", "resolve_data_path", "DataBundle", "stratified_subset",
           "BANK_SEED", "eval_input_dtype"]

log = logging.getLogger("vssl_fast")


class DataBundle:
    def __init__(self, train, val, bank, num_classes, describe):
        self.train, self.val, self.bank, self.num_classes, self.describe = train, val, bank, num_classes, describe


BANK_SEED = 2  # the kNN bank subset is the same in every run (train_subset uses 0, val_subset 1)


def stratified_subset(labels, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a fixed random sample of ``n`` items with each class in proportion to its share.

    Per class ``floor(n * share)`` items, plus one more for the classes with the largest remainders
    (ties broken at random), drawn without replacement by a generator seeded with ``seed``. A prefix
    would not do: datasets stored class by class would give a one-class sample.
    """
    labels = np.asarray(labels)
    if n < 1:
        raise ValueError(f"stratified_subset: n must be >= 1, got {n}")
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / len(labels)
    take = np.floor(quota).astype(np.int64)
    rest = n - int(take.sum())
    order = np.lexsort((rng.random(len(classes)), -(quota - take)))  # largest remainder first, random ties
    take[order[:rest]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def eval_input_dtype(cfg) -> torch.dtype:
    """Images handed to feature extraction: bf16 only when ``eval.feature_dtype=bf16``, else fp32."""
    return torch.bfloat16 if cfg.eval.feature_dtype == "bf16" else torch.float32


def _to_device_uint8(x: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous().to(device)


@contextlib.contextmanager
def reading_data(data_cfg):
    """Turn a failure to find or read the configured data into one DataError line naming data.path (here, not
    in ``vssl_fast.faults``: faults imports nothing from the data package, so there is no import circle).

    A ConfigError (a ValueError) raised while building the data, e.g. a batch larger than the data,
    stays a config error (exit 2, the key named)."""
    from vssl_fast.config import ConfigError

    try:
        yield
    except ConfigError:
        raise
    except FileNotFoundError as e:
        msg = one_line(e, 2000)
        raise DataError(msg if "data.path" in msg else f"data.path={data_cfg.path!r}: {msg}") from e
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, zlib.error, pickle.UnpicklingError, ValueError) as e:
        where = f"data.path={data_cfg.path!r}"
        if data_cfg.path == "auto":
            with contextlib.suppress(Exception):
                where += f" (resolved to {resolve_data_path(data_cfg.path, data_cfg.dataset)})"
        raise DataError(f"{where} cannot be read as data.dataset={data_cfg.dataset!r}: {type(e).__name__}: "
                        f"{one_line(e)}") from e


def build_data(cfg, device: torch.device, rank: int = 0, world: int = 1) -> DataBundle:
    """The training loader (two views), the validation loader and the kNN memory-bank loader."""
    d = cfg.data
    if d.dataset in ("cifar10", "cifar100"):
        arr = load_cifar_arrays(d.path, d.dataset, d.cache_dir, d.download)
        tx, ty, vx, vy = arr.train_x, arr.train_y, arr.test_x, arr.test_y
        # subsets are a fixed random sample (files come class by class, so a prefix would be one class)
        for key, want, have in (("train_subset", d.train_subset, len(tx)), ("val_subset", d.val_subset, len(vx))):
            if want > have:
                log.warning("data.%s=%d but the data holds %d images: using all %d", key, want, have, have)
        if d.train_subset:
            keep = np.sort(np.random.default_rng(0).permutation(len(tx))[: d.train_subset])
            tx, ty = tx[keep], ty[keep]
        if d.val_subset:
            keep = np.sort(np.random.default_rng(1).permutation(len(vx))[: d.val_subset])
            vx, vy = vx[keep], vy[keep]
        _, dt, cl = device_formats(cfg, device)
        train_x, val_x = _to_device_uint8(tx, device), _to_device_uint8(vx, device)
        train_y, val_y = torch.from_numpy(ty).to(device), torch.from_numpy(vy).to(device)
        specs = view_specs(d.dataset, d.augmentations, d.crop_size)
        chunk = d.aug_chunk or (16 if device.type == "cuda" else 1)  # auto: launches, not pixels, cost on a GPU
        train = DeviceTwoViewLoader(train_x, train_y, cfg.train.batch_size, specs, cfg.train.seed, rank, world, cl, dt,
                                    chunk=chunk)
        mean, std = MEANS_STDS["cifar_val"]
        ebs = max(cfg.train.batch_size, 256)
        edt = eval_input_dtype(cfg)
        val = DeviceEvalLoader(val_x, val_y, ebs, mean, std, rank, world, cl, edt)
        bx, by = (train_x, train_y)
        if cfg.eval.knn_train_subset:
            keep = torch.from_numpy(stratified_subset(ty, cfg.eval.knn_train_subset, BANK_SEED)).to(device)
            bx, by = bx.index_select(0, keep), by.index_select(0, keep)
        bank = DeviceEvalLoader(bx, by, ebs, mean, std, rank, world, cl, edt)
        desc = (f"device-resident {d.dataset} ({len(tx)} train / {len(vx)} val images of {tx.shape[1]}x{tx.shape[2]} "
                f"on {device}), two views augmented on {device}, {chunk} steps per augmentation call")
        return DataBundle(train, val, bank, arr.num_classes, desc)
    from vssl_fast.data.folder import build_folder_data

    return build_folder_data(cfg, device, rank, world)
