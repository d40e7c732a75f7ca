"""Reading CIFAR-style data once into uint8 arrays cached on disk.

Sources, any of:
- torchvision's CIFAR format (``cifar-10-batches-py`` / ``cifar-100-python``), downloaded by
  torchvision when ``download`` is set and the network allows;
- a class-folder JPEG tree ``<root>/{train,test}/<class>/*.jpg``, as a folder or as a tar
  archive (``.tar``, ``.tar.gz``), such as ``../shared/data/cifar10-jpeg.tar.gz``.

The decoded arrays (N, H, W, 3 uint8, labels int64, class names) are saved as one ``.npz`` in
the cache directory, keyed by the source's path, size and modification time: decoding happens
once per source.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ArrayDataset", "resolve_data_path", "load_cifar_arrays", "DataNotFound", "IMAGE_EXTS"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test"}


class DataNotFound(FileNotFoundError):
    """No data where the config points; the message says how to point at data."""


@dataclass
class ArrayDataset:
    train_x: np.ndarray  # (N, H, W, 3) uint8
    train_y: np.ndarray  # (N,) int64
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def resolve_data_path(path: str, dataset: str) -> Path:
    """The configured path, or for 'auto': $VSSL_DATA, then the shared CIFAR-10 JPEG tar beside the repo."""
    if path != "auto":
        p = Path(path).expanduser()
        if not p.exists():
            raise DataNotFound(
                f"data.path={path!r} does not exist. Point --data.path at a CIFAR folder (torchvision format), "
                "a class-folder JPEG tree or its tar archive, or set VSSL_DATA."
            )
        return p
    candidates = []
    if os.environ.get("VSSL_DATA"):
        candidates.append(Path(os.environ["VSSL_DATA"]).expanduser())
    here = Path(__file__).resolve().parents[2]
    for base in (Path.cwd(), here):
        candidates += [base / "../shared/data/cifar10-jpeg.tar.gz", base / "shared/data/cifar10-jpeg.tar.gz"]
    for c in candidates:
        if c.exists():
            if dataset == "cifar100" and "cifar10-" in c.name:
                continue
            return c.resolve()
    raise DataNotFound(
        f"no data found for dataset={dataset!r}: looked at $VSSL_DATA and ../shared/data/cifar10-jpeg.tar.gz. "
        "Pass --data.path=/path/to/cifar10-jpeg.tar.gz (or a class-folder JPEG tree, or a torchvision CIFAR "
        "folder; add --data.download=true to let torchvision download CIFAR when the network allows), "
        "or set VSSL_DATA."
    )


def _cache_file(src: Path, cache_dir: str, tag: str) -> Path:
    st = src.stat()
    key = f"{src.resolve()}|{st.st_size}|{int(st.st_mtime)}|{tag}|v1"
    h = hashlib.sha1(key.encode()).hexdigest()[:16]
    d = Path(cache_dir).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{src.name}-{tag}-{h}.npz"


def _decode(data: bytes, name: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _split_and_class(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """('train'|'test', class) from a path's components ``.../<split>/<class>/<file>``."""
    if len(parts) < 3:
        return None
    split = _SPLIT_ALIASES.get(parts[-3].lower())
    return (split, parts[-2]) if split else None


def _read_jpeg_tree(src: Path) -> ArrayDataset:
    items: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "test": []}
    bad = []
    if src.is_dir():
        for root, _, files in os.walk(src):
            for f in sorted(files):
                if not f.lower().endswith(IMAGE_EXTS):
                    continue
                p = Path(root) / f
                sc = _split_and_class(p.relative_to(src).parts)
                if sc is None:
                    continue
                try:
                    items[sc[0]].append((sc[1], _decode(p.read_bytes(), str(p))))
                except Exception:  # noqa: BLE001 - counted and reported below
                    bad.append(str(p))
    else:
        with tarfile.open(src) as tf:
            for m in tf:
                if not m.isfile() or not m.name.lower().endswith(IMAGE_EXTS):
                    continue
                sc = _split_and_class(tuple(Path(m.name).parts))
                if sc is None:
                    continue
                try:
                    items[sc[0]].append((sc[1], _decode(tf.extractfile(m).read(), m.name)))
                except Exception:  # noqa: BLE001
                    bad.append(f"{src}:{m.name}")
    if bad:
        raise ValueError(f"{len(bad)} unreadable images in {src}, e.g. {bad[:3]}; run `python -m vssl_fast.data scan {src}`")
    if not items["train"] or not items["test"]:
        raise DataNotFound(f"{src}: expected <root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg, "
                           f"found {len(items['train'])} train and {len(items['test'])} test images")
    classes = sorted({c for split in items.values() for c, _ in split})
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for split in ("train", "test"):
        shapes = {im.shape for _, im in items[split]}
        if len(shapes) != 1:
            raise ValueError(f"{src}: {split} images differ in size ({sorted(shapes)[:3]}...); the array path needs one size")
        out.append(np.stack([im for _, im in items[split]]))
        out.append(np.array([index[c] for c, _ in items[split]], dtype=np.int64))
    return ArrayDataset(out[0], out[1], out[2], out[3], classes)


def _read_torchvision(src: Path, dataset: str, download: bool) -> ArrayDataset:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    tr = cls(str(src), train=True, download=download)
    te = cls(str(src), train=False, download=download)
    return ArrayDataset(np.asarray(tr.data), np.asarray(tr.targets, dtype=np.int64), np.asarray(te.data),
                        np.asarray(te.targets, dtype=np.int64), list(tr.classes))


def load_cifar_arrays(path: str, dataset: str, cache_dir: str, download: bool = False) -> ArrayDataset:
    """Decode once and cache; later calls read the cached uint8 arrays."""
    if path == "auto" and download:
        src = Path(cache_dir).expanduser() / "torchvision"
        src.mkdir(parents=True, exist_ok=True)
    else:
        src = resolve_data_path(path, dataset)
    is_tv = src.is_dir() and any((src / n).exists() for n in ("cifar-10-batches-py", "cifar-100-python"))
    if (path == "auto" and download) or is_tv:
        return _read_torchvision(src, dataset, download)
    cache = _cache_file(src, cache_dir, dataset)
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return ArrayDataset(z["train_x"], z["train_y"], z["test_x"], z["test_y"], [str(c) for c in z["classes"]])
    ds = _read_jpeg_tree(src)
    tmp = cache.with_name(f".{cache.stem}.{os.getpid()}.tmp.npz")  # ranks may decode at once: each its own temp
    np.savez(tmp, train_x=ds.train_x, train_y=ds.train_y, test_x=ds.test_x, test_y=ds.test_y, classes=np.array(ds.classes))
    os.replace(tmp, cache)
    return ds
