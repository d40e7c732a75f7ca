"""python -m vssl_fast.data {scan DIR [--max-image-pixels N] | imagenet100 --src SRC --dst DST [--copy]
                                [--expect-train N --expect-val N]}

Failures end as train.py's do (``vssl_fast.faults``): one line and an exit code. ``scan`` exits 0
when every file reads, 4 (data) after listing the bad ones, 4 for a missing DIR; the builder exits
4 for a source that is missing or does not match (classes, counts), 3 when --dst already holds
something, 7 when it cannot write.
"""

import argparse
import sys

from vssl_fast import faults
from vssl_fast.data.tools import IN100_TRAIN_IMAGES, IN100_VAL_IMAGES, MAX_IMAGE_PIXELS, build_imagenet100, scan_tree


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vssl_fast.data")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scan", help="list unreadable, truncated, empty, too large and non-image files, and link cycles")
    s.add_argument("root")
    s.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help=f"larger images are bad, as for training (data.max_image_pixels; default {MAX_IMAGE_PIXELS:,})")
    b = sub.add_parser("imagenet100", help="build the ImageNet-100 subset as a tree of links")
    b.add_argument("--src", required=True)
    b.add_argument("--dst", required=True)
    b.add_argument("--copy", action="store_true", help="copy files instead of linking")
    b.add_argument("--expect-train", type=int, default=IN100_TRAIN_IMAGES,
                   help=f"image files expected in the 100 train classes (default {IN100_TRAIN_IMAGES}: full ImageNet)")
    b.add_argument("--expect-val", type=int, default=IN100_VAL_IMAGES,
                   help=f"image files expected in the 100 val classes (default {IN100_VAL_IMAGES})")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "scan":
            bad = scan_tree(a.root, a.max_image_pixels)
        else:
            counts = build_imagenet100(a.src, a.dst, a.copy, a.expect_train, a.expect_val,
                                       log=lambda m: print(m, file=sys.stderr))
    except FileNotFoundError as e:  # a missing tree, split or class: the data's fault (exit 4)
        raise faults.DataError(faults.one_line(e, 2000)) from e
    if a.cmd == "scan":
        for path, why in bad:
            print(f"{why}\t{path}")
        if bad:
            raise faults.DataError(f"{len(bad)} bad files under {a.root} (listed on stdout, one per line)")
        print(f"0 bad files under {a.root}", file=sys.stderr)
        return 0
    nb = len(counts["bad"])
    print(f"ImageNet-100 at {a.dst}: {counts['train']:,} train and {counts['val']:,} val images in 100 classes"
          + (f"; {nb} bad files left out (listed above)" if nb else ""))
    return 0


if __name__ == "__main__":
    sys.exit(faults.run(main, sys.argv[1:]))
