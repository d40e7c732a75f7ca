"""Reading CIFAR-style data once into uint8 arrays cached on disk.

Sources, any of:
- torchvision's CIFAR format (``cifar-10-batches-py`` / ``cifar-100-python``), downloaded by
  torchvision when ``download`` is set and the network allows;
- a class-folder JPEG tree ``<root>/{train,test}/<class>/*.jpg``, as a folder or as a tar
  archive (``.tar``, ``.tar.gz``), such as ``../shared/data/cifar10-jpeg.tar.gz``.

The decoded arrays (N, H, W, 3 uint8, labels int64, class names) are saved as one ``.npz`` in
the cache directory, keyed by what they were decoded from: for an archive its path, size and
modification and change times; for a folder the path, size and times of every image file under
it, so a file added, removed or rewritten anywhere in the tree means a new decode. Decoding
happens once per state of the source.

A tree or archive is refused (``DataError``, exit 4, the file named) when it ends early (a ``.tar``
cut short, even at a member boundary, where ``tarfile`` itself reads on as if it had ended; a
``.tar.gz`` whose stream stops) or holds fewer classes than the dataset has (CIFAR-10: 10, in
each split): either way the run would train and report on a different problem than the one named.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vssl_fast.faults import DataError

__all__ = ["ArrayDataset", "resolve_data_path", "load_cifar_arrays", "DataNotFound", "IMAGE_EXTS"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
_CACHE_VERSION = "v2"  # v1 keyed a folder by its own size and mtime only (issue 26)


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


def _tree_files(src: Path) -> list[tuple[Path, str, str]]:
    """(path, split, class) of every image file of a class-folder tree, in a fixed order (what is decoded)."""
    out = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for f in sorted(files):
            if not f.lower().endswith(IMAGE_EXTS):
                continue
            p = Path(root) / f
            sc = _split_and_class(p.relative_to(src).parts)
            if sc is not None:
                out.append((p, *sc))
    return out


def _stat_key(p: Path) -> str:
    st = p.stat()
    return f"{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def source_key(src: Path, files: list[tuple[Path, str, str]] | None = None) -> str:
    """A digest of what the arrays are decoded from: an archive's (or each image file's) path, size and times.

    The change time is in the key too: a rewrite that restores the size and the modification time
    (``touch -r``, ``rsync -t``, a same-size overwrite within the clock's tick) still changes it.
    """
    h = hashlib.sha1(f"{src.resolve()}|{_CACHE_VERSION}\n".encode())
    if not src.is_dir():
        h.update(_stat_key(src).encode())
        return h.hexdigest()[:16]
    for p, _, _ in files if files is not None else _tree_files(src):
        try:
            h.update(f"{p.relative_to(src)}|{_stat_key(p)}\n".encode())
        except OSError:  # a dangling link: decoding names it
            h.update(f"{p.relative_to(src)}|missing\n".encode())
    return h.hexdigest()[:16]


def _cache_file(src: Path, cache_dir: str, tag: str, files=None) -> Path:
    d = Path(cache_dir).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{src.name}-{tag}-{source_key(src, files)}.npz"


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


def _check_tar_end(tf: tarfile.TarFile, src: Path, members: int) -> None:
    """DataError unless the archive goes on to its end-of-archive marker (a zero block) after the last member.

    ``tarfile`` stops quietly where a header is missing or cut short, so an archive cut at (or just
    after) a member boundary reads as a smaller, complete one. The check re-reads one block; for a
    compressed archive that means decompressing it again (once per decode of the source).
    """
    tf.fileobj.seek(tf.offset)
    block = tf.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        what = "ends" if len(block) < tarfile.BLOCKSIZE else "holds something that is not a tar header"
        raise DataError(f"{src} is truncated or corrupt: it {what} at byte {tf.offset} of its tar stream, after "
                        f"{members} members, where the end-of-archive marker should be; copy or download it again")


def _read_jpeg_tree(src: Path, files: list[tuple[Path, str, str]] | None = None) -> ArrayDataset:
    items: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "test": []}
    bad = []
    if src.is_dir():
        for p, split, cls in files if files is not None else _tree_files(src):
            try:
                items[split].append((cls, _decode(p.read_bytes(), str(p))))
            except Exception:  # noqa: BLE001 - counted and reported below
                bad.append(str(p))
    else:
        n = 0
        try:
            with tarfile.open(src) as tf:
                for m in tf:
                    n += 1
                    if not m.isfile() or not m.name.lower().endswith(IMAGE_EXTS):
                        continue
                    sc = _split_and_class(tuple(Path(m.name).parts))
                    if sc is None:
                        continue
                    data = tf.extractfile(m).read()  # outside the try below: an archive cut here is not a bad image
                    try:
                        items[sc[0]].append((sc[1], _decode(data, m.name)))
                    except Exception:  # noqa: BLE001
                        bad.append(f"{src}:{m.name}")
                _check_tar_end(tf, src, n)
        except (tarfile.ReadError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            if n == 0:  # not an archive at all: the caller names data.path and the reason
                raise
            raise DataError(f"{src} is truncated or corrupt after {n} members ({type(e).__name__}: {e}); copy or "
                            "download it again") from e
    if bad:
        raise ValueError(f"{len(bad)} unreadable images in {src}, e.g. {bad[:3]}; run `python -m vssl_fast.data scan {src}`")
    if not items["train"] or not items["test"]:
        raise DataNotFound(f"{src}: expected <root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg, "
                           f"found {len(items['train'])} train and {len(items['test'])} test images")
    classes = sorted({c for split in items.values() for c, _ in split})
    for split in ("train", "test"):
        lacking = sorted(set(classes) - {c for c, _ in items[split]})
        if lacking:
            raise DataError(f"{src}: {split} has no images of {len(lacking)} of the {len(classes)} classes "
                            f"({', '.join(lacking[:5])}); a partial or truncated copy?")
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


def _check_classes(ds: ArrayDataset, src: Path, dataset: str) -> None:
    """DataError when a class-folder source holds fewer (or more) classes than ``dataset`` has.

    An error, not a warning: with classes missing every accuracy the run reports (online probe, kNN,
    linear) is on an easier problem than the one named, under a name that says otherwise, and a
    warning scrolls away in a long run's log. A deliberate subset of classes trains as
    ``data.dataset=imagefolder`` (any class count, ``train/`` and ``val/`` or ``test/``).
    """
    want = NUM_CLASSES.get(dataset)
    if want is not None and ds.num_classes != want:
        raise DataError(f"{src} holds {ds.num_classes} classes ({', '.join(ds.classes[:5])}"
                        f"{', ...' if ds.num_classes > 5 else ''}); data.dataset={dataset!r} has {want}: a partial or "
                        "truncated copy? (a deliberate subset of classes trains as data.dataset=imagefolder)")


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
    files = _tree_files(src) if src.is_dir() else None  # listed once: the cache key and the decode agree
    cache = _cache_file(src, cache_dir, dataset, files)
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        ds = ArrayDataset(z["train_x"], z["train_y"], z["test_x"], z["test_y"], [str(c) for c in z["classes"]])
        _check_classes(ds, src, dataset)
        return ds
    ds = _read_jpeg_tree(src, files)
    _check_classes(ds, src, dataset)
    tmp = cache.with_name(f".{cache.stem}.{os.getpid()}.tmp.npz")  # ranks may decode at once: each its own temp
    np.savez(tmp, train_x=ds.train_x, train_y=ds.train_y, test_x=ds.test_x, test_y=ds.test_y, classes=np.array(ds.classes))
    os.replace(tmp, cache)
    return ds
