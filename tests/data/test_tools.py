"""scan finds exactly the planted bad files; the ImageNet-100 builder checks classes and counts."""

import numpy as np
import pytest
from PIL import Image

from vssl_fast.data.tools import build_imagenet100, imagenet100_classes, quick_check, scan_tree


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
    # bad files are a data finding: exit 4 (README), not 1, which every command keeps for a bug
    assert r.returncode == 4 and "empty" in r.stdout and "1 bad files" in r.stderr and "Traceback" not in r.stderr


def _jpeg_bytes(seed=0) -> bytes:
    import io

    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(b, format="JPEG")
    return b.getvalue()


def _fake_imagenet(root, per_train=3, per_val=1, drop=None):
    data = _jpeg_bytes()
    for split, n in (("train", per_train), ("val", per_val)):
        for c in imagenet100_classes() + ["n99999999"]:  # plus a class outside the subset
            if c == drop:
                continue
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / c / f"{c}_{i}.JPEG").write_bytes(data)


def test_quick_check_finds_empty_truncated_and_non_images(tmp_path):
    data = _jpeg_bytes(1)
    cases = {"good.JPEG": data, "empty.JPEG": b"", "half.JPEG": data[: len(data) // 2], "text.JPEG": b"hello, text"}
    for name, b in cases.items():
        (tmp_path / name).write_bytes(b)
    got = {name: quick_check(tmp_path / name) for name in cases}
    assert got["good.JPEG"] == (None, (12, 16))
    assert got["empty.JPEG"][0] == "empty" and got["text.JPEG"][0] == "not an image"
    assert got["half.JPEG"][0].startswith("truncated")
    (tmp_path / "pad.JPEG").write_bytes(data + b"\0" * 100)  # padding after the end marker is a valid JPEG
    assert quick_check(tmp_path / "pad.JPEG")[0] is None


def test_imagenet100_builder(tmp_path):
    assert len(imagenet100_classes()) == 100 and len(set(imagenet100_classes())) == 100
    _fake_imagenet(tmp_path / "in1k")
    counts = build_imagenet100(tmp_path / "in1k", tmp_path / "in100", expect_train=300, expect_val=100)
    assert counts == {"train": 300, "val": 100, "bad": []}
    link = next((tmp_path / "in100" / "train" / imagenet100_classes()[0]).iterdir())
    assert link.is_symlink() and not (tmp_path / "in100" / "train" / "n99999999").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in100", "in1k"]  # no temporary folder left
    with pytest.raises(RuntimeError, match=r"holds 300 images in the 100 classes, expected 126,689.*--expect-train 300"):
        build_imagenet100(tmp_path / "in1k", tmp_path / "in100b")
    assert not (tmp_path / "in100b").exists() and not (tmp_path / ".in100b.partial").exists()
    with pytest.raises(RuntimeError, match="already exists and is not empty"):
        build_imagenet100(tmp_path / "in1k", tmp_path / "in100", expect_train=300, expect_val=100)


def test_imagenet100_builder_checks_val_before_writing_anything(tmp_path):
    _fake_imagenet(tmp_path / "in1k")
    with pytest.raises(RuntimeError, match=r"val holds 100 images in the 100 classes, expected 99"):
        build_imagenet100(tmp_path / "in1k", tmp_path / "out", expect_train=300, expect_val=99)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in1k"]


def test_imagenet100_builder_reports_and_leaves_out_bad_files(tmp_path):
    import subprocess
    import sys

    _fake_imagenet(tmp_path / "in1k")
    c0, c1 = imagenet100_classes()[:2]
    (tmp_path / "in1k" / "train" / c0 / f"{c0}_0.JPEG").write_bytes(b"")
    data = (tmp_path / "in1k" / "val" / c1 / f"{c1}_0.JPEG").read_bytes()
    (tmp_path / "in1k" / "val" / c1 / f"{c1}_0.JPEG").write_bytes(data[:40])
    r = subprocess.run([sys.executable, "-m", "vssl_fast.data", "imagenet100", "--src", str(tmp_path / "in1k"),
                        "--dst", str(tmp_path / "in100"), "--expect-train", "300", "--expect-val", "100"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "299 train and 99 val images" in r.stdout and "2 bad files left out" in r.stdout
    assert f"{c0}_0.JPEG (empty)" in r.stderr and f"{c1}_0.JPEG (truncated" in r.stderr
    assert not (tmp_path / "in100" / "train" / c0 / f"{c0}_0.JPEG").exists()
    assert len(list((tmp_path / "in100" / "val").iterdir())) == 100  # every class folder, even one left empty


def test_imagenet100_builder_missing_class(tmp_path):
    _fake_imagenet(tmp_path / "in1k", drop=imagenet100_classes()[5])
    with pytest.raises(FileNotFoundError, match=r"1 of the 100 classes are missing"):
        build_imagenet100(tmp_path / "in1k", tmp_path / "out", expect_train=297, expect_val=99)
    assert not (tmp_path / "out").exists()
