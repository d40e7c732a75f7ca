"""Image-folder pipelines on real JPEGs: DALI's CPU-only mode and the torchvision fallback."""

import tarfile

import numpy as np
import pytest
import torch

from vssl_fast.data.augment import view_specs


@pytest.fixture(scope="module")
def jpeg_tree(cifar_tiny_tar, tmp_path_factory):
    """CIFAR JPEGs (32x32) plus larger JPEGs the test makes (320x240 and 200x300), class-folder layout."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tree")
    with tarfile.open(cifar_tiny_tar) as tf:
        tf.extractall(root, filter="data")
    tree = root / "cifar10-jpeg"
    (tree / "val").mkdir()
    for split in ("train", "test"):
        for k, cls in enumerate(sorted(p.name for p in (tree / split).iterdir())[:3]):
            rng = np.random.default_rng(k)
            for i, (w, h) in enumerate([(320, 240), (200, 300)]):
                yy, xx = np.mgrid[0:h, 0:w]
                img = np.stack([(xx * (k + 1)) % 256, (yy * 2) % 256, rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
                Image.fromarray(img).save(tree / split / cls / f"big_{i}.jpg", quality=90)
    for p in (tree / "test").iterdir():
        p.rename(tree / "val" / p.name)
    (tree / "test").rmdir()
    return tree


def _bounds(spec):
    lo = min((0 - m) / s for m, s in zip(spec.mean, spec.std))
    hi = max((1 - m) / s for m, s in zip(spec.mean, spec.std))
    return lo - 1e-3, hi + 1e-3


@pytest.mark.parametrize("crop", [32, 64])
def test_dali_cpu_pipeline_on_real_jpegs(jpeg_tree, crop):
    pytest.importorskip("nvidia.dali", reason="DALI is the optional 'dali' extra")
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    from vssl_fast.data.folder import make_dali_pipeline

    specs = view_specs("imagenet", "asymmetric", crop)
    pipe = make_dali_pipeline(str(jpeg_tree / "train"), specs, 16, seed=0, device_id=None, num_threads=2, shuffle=False)
    pipe.build()
    assert pipe.epoch_size("Reader") == 200 + 6
    it = DALIGenericIterator([pipe], ["v1", "v2", "y"], reader_name="Reader", last_batch_policy=LastBatchPolicy.DROP)
    labels = []
    lo, hi = _bounds(specs[0])
    for b in it:
        v1, v2, y = b[0]["v1"], b[0]["v2"], b[0]["y"]
        assert v1.shape == v2.shape == (16, 3, crop, crop) and v1.dtype == torch.float32
        assert v1.min() >= lo and v1.max() <= hi and v2.min() >= lo and v2.max() <= hi
        assert not torch.equal(v1, v2)
        labels.append(y.reshape(-1))
    labels = torch.cat(labels)
    assert len(labels) == (206 // 16) * 16
    # unshuffled, the reader walks classes in sorted order: labels are non-decreasing and span the classes
    assert torch.equal(labels, labels.sort().values) and labels.min() == 0 and labels.max() == 9


def test_dali_trainer_loader_shards_and_resumes(jpeg_tree):
    pytest.importorskip("nvidia.dali", reason="DALI is the optional 'dali' extra")
    from vssl_fast.data.folder import DaliTwoViewLoader

    specs = view_specs("imagenet", "asymmetric", 32)
    mk = lambda rank: DaliTwoViewLoader(jpeg_tree / "train", specs, 8, 1, rank, 2, torch.device("cpu"), False,  # noqa: E731
                                        torch.float32)
    a, b = mk(0), mk(1)
    assert len(a) == 206 // 16
    ya = torch.cat([y for _, _, y in a])
    yb = torch.cat([y for _, _, y in b])
    assert len(ya) == len(yb) == len(a) * 8
    c = mk(0)
    it = iter(c)
    first = [next(it) for _ in range(3)]
    st = c.state_dict()
    nxt = next(it)
    d = mk(0)
    d.load_state_dict(st)
    again = next(iter(d))
    assert torch.equal(nxt[2], again[2]) and torch.equal(nxt[0], again[0])
    del first


def test_torchvision_fallback_loader_and_eval(jpeg_tree):
    from vssl_fast.data.folder import FolderEvalLoader, TorchvisionTwoViewLoader

    specs = view_specs("imagenet", "asymmetric", 32)
    ld = TorchvisionTwoViewLoader(jpeg_tree / "train", specs, 8, 0, 0, 1, torch.device("cpu"), 0, False, torch.float32)
    v1, v2, y = next(iter(ld))
    assert v1.shape == v2.shape == (8, 3, 32, 32) and y.shape == (8,)
    ev = FolderEvalLoader(jpeg_tree / "val", 16, 0, 1, torch.device("cpu"), 0, crop=24, resize=28)
    x, yv = next(iter(ev))
    assert x.shape == (16, 3, 24, 24)
    assert sum(len(b[1]) for b in ev) == 100 + 6


def test_torchvision_path_skips_bad_files_and_fails_after_a_run(tmp_path, caplog):
    from PIL import Image

    from vssl_fast.data.folder import MAX_BAD_IN_A_ROW, SkippingImageFolder, TwoViewTransform

    specs = view_specs("imagenet", "asymmetric", 16)
    good = tmp_path / "ok" / "a"
    good.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(good / f"{i}.jpg")
    (good / "9_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    ds = SkippingImageFolder(tmp_path / "ok", TwoViewTransform(specs))
    outs = [ds[i] for i in range(len(ds))]
    assert len(outs) == 5 and ds.bad == {str(good / "9_bad.jpg")}
    assert "skipping unreadable image" in caplog.text
    bad = tmp_path / "bad" / "a"
    bad.mkdir(parents=True)
    for i in range(MAX_BAD_IN_A_ROW + 1):
        (bad / f"{i:03d}.jpg").write_bytes(b"")
    ds = SkippingImageFolder(tmp_path / "bad", TwoViewTransform(specs))
    with pytest.raises(RuntimeError, match="unreadable images in a row"):
        ds[0]


def test_build_data_says_which_path_runs(jpeg_tree, monkeypatch, caplog):
    from vssl_fast.config import load_config
    from vssl_fast.data import folder
    from vssl_fast.data.folder import build_folder_data

    cfg = load_config(["--preset", "imagenet100", f"--data.path={jpeg_tree}", "--data.crop_size=32",
                       "--train.batch_size=8", "--data.workers=1"])
    monkeypatch.setattr(folder, "dali_available", lambda: (False, "nvidia.dali is not importable (test)"))
    bundle = build_folder_data(cfg, torch.device("cpu"))
    assert "torchvision ImageFolder" in bundle.describe and "not DALI: nvidia.dali is not importable" in bundle.describe
    assert bundle.num_classes == 10


def test_nvjpeg_style_loader_decodes_batches_on_the_device(jpeg_tree, tmp_path):
    """The GPU torchvision path, run with decode_jpeg on the CPU: shapes, labels, bad files skipped."""
    import shutil

    from vssl_fast.data.folder import NvjpegTwoViewLoader

    tree = tmp_path / "t"
    shutil.copytree(jpeg_tree / "train", tree)
    (tree / "airplane" / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    specs = view_specs("imagenet", "asymmetric", 32)
    ld = NvjpegTwoViewLoader(tree, specs, 16, 0, 0, 1, torch.device("cpu"), 0, False, torch.float32)
    n = 0
    for v1, v2, y in ld:
        assert v1.shape[1:] == (3, 32, 32) and v1.shape == v2.shape and len(y) == v1.shape[0] <= 16
        n += len(y)
    assert n >= (207 // 16) * 16 - 1 and len(ld.bad) <= 1
