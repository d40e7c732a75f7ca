"""python -m vssl_fast.data {scan DIR | imagenet100 --src SRC --dst DST [--copy]}"""

import argparse
import sys

from vssl_fast.data.tools import build_imagenet100, scan_tree


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vssl_fast.data")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scan", help="list unreadable, truncated, empty and non-image files")
    s.add_argument("root")
    b = sub.add_parser("imagenet100", help="build the ImageNet-100 subset as a tree of links")
    b.add_argument("--src", required=True)
    b.add_argument("--dst", required=True)
    b.add_argument("--copy", action="store_true", help="copy files instead of linking")
    a = ap.parse_args(argv)
    if a.cmd == "scan":
        bad = scan_tree(a.root)
        for path, why in bad:
            print(f"{why}\t{path}")
        print(f"{len(bad)} bad files under {a.root}", file=sys.stderr)
        return 1 if bad else 0
    try:
        counts = build_imagenet100(a.src, a.dst, a.copy)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"ImageNet-100 at {a.dst}: {counts['train']:,} train and {counts['val']:,} val images in 100 classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
