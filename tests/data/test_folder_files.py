"""The listing and the file check of class-folder trees: link cycles, files with two names, images too large to
open, and trees whose classes are not the dataset's."""

import logging
import os

import numpy as np
import pytest
import torch

from vssl_fast.data.folder_files import BadFiles, SkippingImageFolder, validate_folder


@pytest.fixture
def tree(tmp_path):
    """4 classes of 40 JPEGs each (160), train and val."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, n in (("train", 40), ("val", 3)):
        for c in ("cat", "dog", "fox", "owl"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(root / split / c / f"{i:02d}.jpg")
    return root


def test_a_folder_link_cycle_lists_each_file_once_and_is_a_bad_entry(tree, tmp_path, caplog):
    """`ln -s . train/cat/self` made the listing (and torchvision's ImageFolder) walk cat again at every level
    until the path was too long: 1,760 images in 4 classes, cat 93% of them. Each real file once now; the
    link is a bad entry, counted and logged once, and `scan` lists it."""
    from vssl_fast.data.tools import scan_tree

    os.symlink(".", tree / "train" / "cat" / "self")
    caplog.set_level(logging.WARNING, logger="vssl_fast")
    bad = BadFiles(max_fraction=0.1)
    s = validate_folder(tree / "train", tmp_path / "cache", bad)
    assert len(s) == 160 and np.bincount(s.labels).tolist() == [40] * 4
    assert list(bad.files) == [str(tree / "train" / "cat" / "self")] and "a link cycle" in bad.files[str(
        tree / "train" / "cat" / "self")][1]
    assert caplog.text.count("cat/self") == 1
    assert len(SkippingImageFolder(tree / "train", None)) == 160  # the evaluation loaders' listing too
    found = scan_tree(tree / "train")
    assert [(os.path.basename(p), why.split(":")[0]) for p, why in found] == [("self", "a link cycle")]


def test_a_link_to_another_class_or_file_is_listed_once(tree, tmp_path):
    """A folder link to another class folder, and a second name of a file: each real file in one class only."""
    os.symlink(tree / "train" / "dog", tree / "train" / "cat" / "dogs")
    os.symlink(tree / "train" / "fox" / "00.jpg", tree / "train" / "owl" / "zz_fox.jpg")
    bad = BadFiles(max_fraction=0.1)
    s = validate_folder(tree / "train", tmp_path / "cache", bad)
    assert len(s) == 160 and np.bincount(s.labels).tolist() == [40] * 4
    whys = {os.path.basename(p): why for p, (_, why) in bad.files.items()}
    assert whys["dogs"].startswith("a second way to a folder") and str(tree / "train" / "dog") in whys["dogs"]
    assert whys["zz_fox.jpg"].startswith("the same file as")


def _huge_header_jpeg(path, h=14000, w=14000):
    """A JPEG whose frame header says h x w (a 14000x14000 photo as its header reads; the data is a small image's)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    path.write_bytes(bytes(data))


def test_an_image_too_large_to_open_is_a_bad_file_and_scan_lists_it(tree, tmp_path, capsys, caplog):
    """A 14000x14000 JPEG in a training folder crashed both loaders and `scan` with PIL's DecompressionBombError
    (exit 1). It is a bad file now: counted, one log line; `scan` lists it and exits 4 without a traceback."""
    from vssl_fast import faults
    from vssl_fast.data.__main__ import main

    _huge_header_jpeg(tree / "train" / "cat" / "zz_huge.jpg")
    caplog.set_level(logging.WARNING, logger="vssl_fast")
    bad = BadFiles(max_fraction=0.1)
    s = validate_folder(tree / "train", tmp_path / "cache", bad)
    assert len(s) == 160 and len(bad) == 1
    (why,) = [w for _, w in bad.files.values()]
    assert why.startswith("too large") and caplog.text.count("zz_huge.jpg") == 1
    assert faults.run(main, ["scan", str(tree / "train")]) == 4  # the data exit code, one line
    out, err = capsys.readouterr()
    assert "zz_huge.jpg" in out and out.startswith("too large") and "Traceback" not in err
    assert "1 bad files" in err


def test_data_max_image_pixels_is_the_limit(tree, tmp_path):
    """Images above data.max_image_pixels are bad files on every path (the check leaves them out), and the limit
    is part of the check's cache key: another limit checks the tree again."""
    from vssl_fast.data.tools import quick_check

    big = tree / "train" / "dog" / "00.jpg"  # 12 x 16 = 192 pixels
    assert quick_check(big, max_pixels=192) == (None, (12, 16))
    why, _ = quick_check(big, max_pixels=191)
    assert why.startswith("too large: 16x12 = 192 pixels, more than data.max_image_pixels=191")
    bad = BadFiles(max_fraction=1.0)
    assert len(validate_folder(tree / "train", tmp_path / "cache", bad, max_pixels=191)) == 0 and len(bad) == 160
    assert len(validate_folder(tree / "train", tmp_path / "cache", BadFiles(), max_pixels=192)) == 160


def _cfg(root, tmp_path, *extra):
    from vssl_fast.config import load_config

    return load_config(["--preset", "imagenet100", f"--data.path={root}", "--data.crop_size=16", "--train.batch_size=4",
                        "--data.workers=1", f"--data.cache_dir={tmp_path / 'cache'}", "--data.loader=torchvision",
                        *extra])


def test_a_tree_with_fewer_classes_than_the_dataset_says_so(tree, tmp_path, caplog):
    """The imagenet100 preset expects 100 classes (data.num_classes): a tree of 4 says so in one log line; 0
    turns the check off."""
    from vssl_fast.data.folder import build_folder_data

    caplog.set_level(logging.WARNING, logger="vssl_fast")
    bundle = build_folder_data(_cfg(tree, tmp_path), torch.device("cpu"))
    assert bundle.num_classes == 4
    (line,) = [r.getMessage() for r in caplog.records if "classes under" in r.getMessage()]
    assert "4 classes under" in line and "fewer than the 100 the dataset has (data.num_classes=100)" in line
    caplog.clear()
    build_folder_data(_cfg(tree, tmp_path, "--data.num_classes=0"), torch.device("cpu"))
    assert "classes under" not in caplog.text


def test_splits_with_different_classes_are_a_data_error(tree, tmp_path, caplog):
    """Labels are the sorted class folders' indices: a class missing from val shifts every later label. One line,
    exit 4 (a DataError); a class folder without a readable image is named in the log."""
    import shutil

    from vssl_fast import faults
    from vssl_fast.data.folder import build_folder_data
    from vssl_fast.data.folder_files import BadDataError

    shutil.rmtree(tree / "val" / "dog")
    with pytest.raises(BadDataError) as e:
        build_folder_data(_cfg(tree, tmp_path), torch.device("cpu"))
    code, line = faults.classify(e.value)
    assert code == 4 and "\n" not in line and "only in train: ['dog']" in line
    (tree / "val" / "dog").mkdir()
    caplog.set_level(logging.WARNING, logger="vssl_fast")
    build_folder_data(_cfg(tree, tmp_path), torch.device("cpu"))
    assert "1 classes under" in caplog.text and "hold no readable image: dog" in caplog.text


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_a_batch_larger_than_an_image_folder_is_a_config_error(loader, tree, tmp_path):
    """As for CIFAR: train.batch_size named (exit 2), not data.path (exit 4)."""
    from vssl_fast.config import ConfigError
    from vssl_fast.data import reading_data
    from vssl_fast.data.folder import build_folder_data

    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is an optional extra")
    cfg = _cfg(tree, tmp_path, "--train.batch_size=1000", f"--data.loader={loader}")
    with pytest.raises(ConfigError, match=r"^train.batch_size: 160 readable training images under .* cannot fill one"):
        with reading_data(cfg.data):
            build_folder_data(cfg, torch.device("cpu"))
