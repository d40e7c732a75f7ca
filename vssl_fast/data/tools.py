"""Dataset tools: ``scan`` a tree for bad image files, build the ImageNet-100 subset as links.

    python -m vssl_fast.data scan DIR                      # exit 1 and a list when bad files exist
    python -m vssl_fast.data imagenet100 --src /data/imagenet --dst data/imagenet100 [--copy]

The ImageNet-100 class list (``imagenet100_classes.txt``, 100 WordNet ids) is the CMC split that
solo-learn uses. ``imagenet100`` expects ``SRC/train/<wnid>/*`` and ``SRC/val/<wnid>/*`` (the
usual val-by-class layout), creates ``DST/{train,val}/<wnid>`` as folders of symbolic links (or
copies) and checks the class count (100) and the image counts (126,689 train, 5,000 val),
failing with a message that says what differs.
"""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

from vssl_fast.data.sources import IMAGE_EXTS

__all__ = ["scan_tree", "imagenet100_classes", "build_imagenet100", "IN100_TRAIN_IMAGES", "IN100_VAL_IMAGES"]

IN100_TRAIN_IMAGES = 126_689
IN100_VAL_IMAGES = 5_000


def _problem(path: Path) -> str | None:
    """Why a file is not a readable image, or None when it is."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = path.stat().st_size
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if size == 0:
        return "empty"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 2))
            tail = f.read(2)
    except OSError as e:
        return f"unreadable ({e.strerror})"
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.load()  # decodes every byte: truncated data raises here
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError) as e:
        return f"truncated or corrupt ({e})"
    if fmt == "JPEG" and head[:2] == b"\xff\xd8" and tail != b"\xff\xd9":
        return "truncated (JPEG without end-of-image marker)"
    return None


def scan_tree(root: str | Path) -> list[tuple[str, str]]:
    """(path, problem) for every file under root that is empty, unreadable, truncated or not an image.

    Files with image extensions are decoded; files with other extensions are listed as non-images
    (DALI's file reader would hand them to the decoder too).
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"scan: {root} does not exist")
    bad = []
    for dirpath, _, files in os.walk(root):
        for f in sorted(files):
            p = Path(dirpath) / f
            if f.startswith("."):
                continue
            if not f.lower().endswith(IMAGE_EXTS):
                bad.append((str(p), "not an image (extension)"))
                continue
            why = _problem(p)
            if why:
                bad.append((str(p), why))
    return sorted(bad)


def imagenet100_classes() -> list[str]:
    text = resources.files("vssl_fast.data").joinpath("imagenet100_classes.txt").read_text()
    return [w for w in text.split() if w]


def _count(d: Path) -> int:
    return sum(1 for p in d.iterdir() if p.is_file() or p.is_symlink())


def build_imagenet100(src: str | Path, dst: str | Path, copy: bool = False, expect_train: int = IN100_TRAIN_IMAGES,
                      expect_val: int = IN100_VAL_IMAGES) -> dict:
    src, dst = Path(src), Path(dst)
    classes = imagenet100_classes()
    if len(classes) != 100:
        raise RuntimeError(f"the shipped class list has {len(classes)} classes, expected 100")
    counts = {}
    for split, expect in (("train", expect_train), ("val", expect_val)):
        sdir = src / split
        if not sdir.is_dir():
            raise FileNotFoundError(f"imagenet100: {sdir} is missing; expected {src}/train/<wnid>/ and {src}/val/<wnid>/")
        missing = [c for c in classes if not (sdir / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"imagenet100: {len(missing)} of the 100 classes are missing under {sdir}, "
                                    f"e.g. {missing[:5]}")
        n = 0
        for c in classes:
            out = dst / split / c
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted((sdir / c).iterdir()):
                target = out / f.name
                if target.exists() or target.is_symlink():
                    n += 1
                    continue
                if copy:
                    shutil.copy2(f, target)
                else:
                    target.symlink_to(f.resolve())
                n += 1
        got_classes = sum(1 for p in (dst / split).iterdir() if p.is_dir())
        if got_classes != 100:
            raise RuntimeError(f"imagenet100: {dst / split} has {got_classes} class folders, expected 100")
        if n != expect:
            raise RuntimeError(f"imagenet100: {split} has {n} images, expected {expect:,} "
                               f"(is {src} the full ImageNet-1k {split} split?)")
        counts[split] = n
    return counts
