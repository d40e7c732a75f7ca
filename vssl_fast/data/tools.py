"""Dataset tools: ``scan`` a tree for bad image files, build the ImageNet-100 subset as links.

    python -m vssl_fast.data scan DIR                      # exit 1 and a list when bad files exist
    python -m vssl_fast.data imagenet100 --src /data/imagenet --dst data/imagenet100 [--copy] \
        [--expect-train 126689 --expect-val 5000]

The ImageNet-100 class list (``imagenet100_classes.txt``, 100 WordNet ids) is the CMC split that
solo-learn uses. ``imagenet100`` expects ``SRC/train/<wnid>/*`` and ``SRC/val/<wnid>/*`` (the
usual val-by-class layout). Before writing anything it checks the 100 classes and the image
counts (by default full ImageNet's: 126,689 train, 5,000 val; other sources pass their own
``--expect-train/--expect-val``) and checks every file cheaply (``quick_check``); it then builds
``DST/{train,val}/<wnid>`` as folders of symbolic links (or copies) in a temporary folder beside
DST and renames it into place, so a failure leaves nothing half-built. Bad files are listed and
left out of the subset.

``quick_check`` (the size, the format header and the end-of-image marker, no decoding) is also
what the image-folder loaders run once per tree before training (``vssl_fast.data.folder_files``);
``scan`` decodes every file and so also finds damage in the middle of a file.
"""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

from vssl_fast.data.sources import IMAGE_EXTS
from vssl_fast.faults import DataError, RunDirError

__all__ = ["scan_tree", "quick_check", "walk_tree", "imagenet100_classes", "build_imagenet100", "IN100_TRAIN_IMAGES",
           "IN100_VAL_IMAGES", "MAX_IMAGE_PIXELS", "set_max_image_pixels"]

IN100_TRAIN_IMAGES = 126_689
IN100_VAL_IMAGES = 5_000
MAX_IMAGE_PIXELS = 89_478_485  # PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS): data.max_image_pixels' default


def _too_large(w: int, h: int, max_pixels: int) -> str | None:
    if w * h > max_pixels:
        return (f"too large: {w}x{h} = {w * h:,} pixels, more than data.max_image_pixels={max_pixels:,} (PIL and "
                "the loaders refuse such images as decompression bombs; raise the setting to use it)")
    return None


def set_max_image_pixels(max_pixels: int) -> None:
    """PIL's decompression-bomb limit (process-wide, inherited by forked workers) at ``data.max_image_pixels``.
    PIL refuses twice as many pixels and warns above the limit; the warning is silenced, since the file check
    makes every image above the limit a bad file, named once in the log."""
    import warnings

    from PIL import Image

    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # idempotent: one filter


def _open_header(f, max_pixels: int):
    """PIL's Image.open under the limit ``max_pixels`` (the callers' size check decides)."""
    from PIL import Image

    set_max_image_pixels(max_pixels)
    return Image.open(f)


def walk_tree(top, claimed: dict | None = None) -> tuple[list[tuple[str, list[str]]], list[tuple[str, str]]]:
    """Every folder under ``top`` with its file names, links followed and each real folder listed once:
    ([(folder, sorted file names)] sorted by folder, as ``sorted(os.walk(top, followlinks=True))`` lists them,
    [(link, why)] for each folder link that leads to a folder already listed, which is left out). A link
    cycle (``ln -s . cat/self``) is one of these: os.walk and torchvision's ImageFolder follow it until the
    path is too long, listing the files above it again at every level. ``claimed`` (real folder -> the path
    that listed it) is shared across calls for the class folders of one tree."""
    claimed = {} if claimed is None else claimed
    out, problems = [], []

    def visit(d: str) -> None:
        try:
            st = os.stat(d)
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:  # unreadable: os.walk skips it too
            return
        key = (st.st_dev, st.st_ino)
        if claimed.setdefault(key, d) != d:
            first = claimed[key]
            why = "a link cycle" if (d + os.sep).startswith(first + os.sep) else "a second way to a folder"
            problems.append((d, f"{why}: the folder {first} is listed once, this link is left out"))
            return
        files, dirs = [], []
        for e in entries:
            try:
                (dirs if e.is_dir() else files).append(e.name)
            except OSError:
                files.append(e.name)
        out.append((d, files))
        for name in dirs:
            visit(os.path.join(d, name))

    visit(str(top))
    out.sort(key=lambda x: x[0])
    return out, problems


def _problem(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """Why a file is not a readable image (too large included), or None when it is."""
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
        with _open_header(path, max_pixels) as im:
            fmt = im.format
            if why := _too_large(*im.size, max_pixels):
                return why
            im.load()  # decodes every byte: truncated data raises here
    except Image.DecompressionBombError as e:
        return f"too large ({e})"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError) as e:
        return f"truncated or corrupt ({e})"
    if fmt == "JPEG" and head[:2] == b"\xff\xd8" and tail != b"\xff\xd9":
        return "truncated (JPEG without end-of-image marker)"
    return None


_TAIL = 4096  # bytes read from a file's end to find its end marker (JPEG allows trailing padding after EOI)


def quick_check(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[str | None, tuple[int, int] | None]:
    """(problem, None) for a bad file, (None, (height, width)) for a good one, without decoding.

    Checks the size (empty), the header (PIL identifies the format and reads the image size: not an
    image otherwise) and the end marker (JPEG's EOI in the last 4 KiB; PNG's IEND): a truncated
    file fails. Entropy-coded JPEG data cannot contain 0xFFD9, so a truncated JPEG does not pass
    by chance. Damage inside the data passes; ``scan`` (a full decode) finds that too.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        size = os.stat(path).st_size
    except OSError as e:
        return f"unreadable ({e.strerror})", None
    if size == 0:
        return "empty", None
    try:
        with open(path, "rb") as f:
            try:
                with _open_header(f, max_pixels) as im:  # parses the header only
                    fmt, (w, h) = im.format, im.size
            except Image.DecompressionBombError as e:
                return f"too large ({e})", None
            except UnidentifiedImageError:
                return "not an image", None
            except (OSError, SyntaxError, ValueError) as e:
                return f"truncated or corrupt header ({e})", None
            f.seek(max(0, size - _TAIL))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({e.strerror})", None
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        return "truncated (JPEG without end-of-image marker)", None
    if fmt == "PNG" and b"IEND" not in tail:
        return "truncated (PNG without IEND chunk)", None
    if w < 1 or h < 1:
        return f"empty image ({w}x{h})", None
    if why := _too_large(w, h, max_pixels):
        return why, None
    return None, (h, w)


def scan_tree(root: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> list[tuple[str, str]]:
    """(path, problem) for every file under root that is empty, unreadable, truncated, not an image or larger than
    ``max_pixels``, and for every folder link that leads to a folder already listed (a link cycle, say).

    Links are followed as the loaders follow them (``walk_tree``). Files with image extensions are
    decoded; files with other extensions are listed as non-images (DALI's file reader would hand them
    to the decoder too).
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"scan: {root} does not exist")
    folders, bad = walk_tree(root)
    for dirpath, files in folders:
        for f in files:
            p = Path(dirpath) / f
            if f.startswith("."):
                continue
            if not f.lower().endswith(IMAGE_EXTS):
                bad.append((str(p), "not an image (extension)"))
                continue
            why = _problem(p, max_pixels)
            if why:
                bad.append((str(p), why))
    return sorted(bad)


def imagenet100_classes() -> list[str]:
    text = resources.files("vssl_fast.data").joinpath("imagenet100_classes.txt").read_text()
    return [w for w in text.split() if w]


def build_imagenet100(src: str | Path, dst: str | Path, copy: bool = False, expect_train: int = IN100_TRAIN_IMAGES,
                      expect_val: int = IN100_VAL_IMAGES, log=print) -> dict:
    """Build DST/{train,val}/<wnid> from SRC; returns {"train": n, "val": n, "bad": [(path, problem), ...]}.

    ``train``/``val`` count the images linked (bad files excluded). Every check (classes, counts
    of image files against ``expect_*``, DST free) runs before anything is written; the tree is
    built in ``.DST.partial`` and renamed to DST at the end, and removed on any failure.
    """
    src, dst = Path(src), Path(dst)
    classes = imagenet100_classes()
    if len(classes) != 100:
        raise RuntimeError(f"the shipped class list has {len(classes)} classes, expected 100")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise RunDirError(f"imagenet100: {dst} already exists and is not empty; remove it or pick another --dst")
    plan: dict[str, list[tuple[str, Path]]] = {}
    bad: list[tuple[str, str]] = []
    for split, expect in (("train", expect_train), ("val", expect_val)):
        sdir = src / split
        if not sdir.is_dir():
            raise FileNotFoundError(f"imagenet100: {sdir} is missing; expected {src}/train/<wnid>/ and {src}/val/<wnid>/")
        missing = [c for c in classes if not (sdir / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"imagenet100: {len(missing)} of the 100 classes are missing under {sdir}, "
                                    f"e.g. {missing[:5]}")
        files = [(c, f) for c in classes for f in sorted((sdir / c).iterdir())
                 if not f.name.startswith(".") and f.name.lower().endswith(IMAGE_EXTS)]
        if len(files) != expect:
            raise DataError(f"imagenet100: {sdir} holds {len(files):,} images in the 100 classes, expected {expect:,} "
                            f"(full ImageNet-1k has {IN100_TRAIN_IMAGES:,} train / {IN100_VAL_IMAGES:,} val; for "
                            f"another source pass --expect-{split} {len(files)})")
        keep = []
        for c, f in files:
            why, _ = quick_check(f)
            if why:
                bad.append((str(f), why))
            else:
                keep.append((c, f))
        plan[split] = keep
    for path, why in bad:
        log(f"bad file, left out: {path} ({why})")
    tmp = dst.with_name(f".{dst.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # the leftover of an earlier build that was killed
    try:
        for split, keep in plan.items():
            for c in classes:
                (tmp / split / c).mkdir(parents=True, exist_ok=True)
            for c, f in keep:
                target = tmp / split / c / f.name
                if copy:
                    shutil.copy2(f, target)
                else:
                    target.symlink_to(f.resolve())
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"train": len(plan["train"]), "val": len(plan["val"]), "bad": bad}
