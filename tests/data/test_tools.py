"""scan finds exactly the planted bad files; the ImageNet-100 builder checks classes and counts."""

import numpy as np
import pytest
from PIL import Image

from vssl_fast.data.tools import build_imagenet100, imagenet100_classes, scan_tree


def test_scan_finds_exactly_the_planted_bad_files(tmp_path):
    d = tmp_path / "tree" / "cls"
    d.mkdir(parents=True)
    img = (np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)
    Image.fromarray(img).save(d / "good.jpg", quality=90)
    Image.fromarray(img).save(d / "good.png")
    data = (d / "good.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "notimage.jpg").write_bytes(b"hello, I am text")
    (d / "readme.txt").write_text("not an image")
    png = (d / "good.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) - 40])
    bad = dict(scan_tree(tmp_path / "tree"))
    names = {k.split("/")[-1]: v for k, v in bad.items()}
    assert set(names) == {"truncated.jpg", "empty.jpg", "notimage.jpg", "readme.txt", "truncated.png"}
    assert names["empty.jpg"] == "empty" and names["notimage.jpg"] == "not an image"
    assert names["truncated.jpg"].startswith("truncated")


def test_scan_command_exit_code(tmp_path):
    import subprocess
    import sys

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "vssl_fast.data", "scan", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and "empty" in r.stdout and "1 bad files" in r.stderr


def _fake_imagenet(root, per_train=3, per_val=1, drop=None):
    for split, n in (("train", per_train), ("val", per_val)):
        for c in imagenet100_classes() + ["n99999999"]:  # plus a class outside the subset
            if c == drop:
                continue
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / c / f"{c}_{i}.JPEG").write_bytes(b"x")


def test_imagenet100_builder(tmp_path):
    assert len(imagenet100_classes()) == 100 and len(set(imagenet100_classes())) == 100
    _fake_imagenet(tmp_path / "in1k")
    counts = build_imagenet100(tmp_path / "in1k", tmp_path / "in100", expect_train=300, expect_val=100)
    assert counts == {"train": 300, "val": 100}
    link = next((tmp_path / "in100" / "train" / imagenet100_classes()[0]).iterdir())
    assert link.is_symlink() and not (tmp_path / "in100" / "train" / "n99999999").exists()
    with pytest.raises(RuntimeError, match=r"train has 300 images, expected 126,689"):
        build_imagenet100(tmp_path / "in1k", tmp_path / "in100b")


def test_imagenet100_builder_missing_class(tmp_path):
    _fake_imagenet(tmp_path / "in1k", drop=imagenet100_classes()[5])
    with pytest.raises(FileNotFoundError, match=r"1 of the 100 classes are missing"):
        build_imagenet100(tmp_path / "in1k", tmp_path / "out", expect_train=297, expect_val=99)
