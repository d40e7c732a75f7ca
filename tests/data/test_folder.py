"""Image-folder pipelines on real JPEGs: DALI's CPU-only mode and the torchvision fallback."""

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import garbled_jpeg

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


@pytest.fixture(scope="module")
def small_tree(jpeg_tree, tmp_path_factory):
    """3 classes of 6 real CIFAR JPEGs plus 2 larger ones each (24 train images), val 2 per class: small enough
    for several epochs through every loader."""
    import shutil

    root = tmp_path_factory.mktemp("small")
    for split, n in (("train", 6), ("val", 2)):
        for cls in sorted(p.name for p in (jpeg_tree / split).iterdir())[:3]:
            (root / split / cls).mkdir(parents=True)
            files = sorted((jpeg_tree / split / cls).iterdir())
            small = [f for f in files if not f.name.startswith("big")][:n]
            for f in small + [f for f in files if f.name.startswith("big")][: n // 3]:
                shutil.copy(f, root / split / cls / f.name)
    return root


def _dali():
    pytest.importorskip("nvidia.dali", reason="DALI is the optional 'dali' extra")


@pytest.mark.parametrize("crop", [32, 64])
def test_dali_cpu_pipeline_on_real_jpegs(jpeg_tree, tmp_path, crop):
    _dali()
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from vssl_fast.data.folder_dali import DaliBatchSource, make_dali_pipeline
    from vssl_fast.data.folder_files import validate_folder

    specs = view_specs("imagenet", "asymmetric", crop)
    samples = validate_folder(jpeg_tree / "train", tmp_path)
    assert len(samples) == samples.num_files == 200 + 6
    src = DaliBatchSource(samples, specs, seed=0, rank=0, world=1, batch_size=16, steps=len(samples) // 16)
    pipe = make_dali_pipeline(src, specs, 16, device_id=None, num_threads=2)
    pipe.build()
    lo, hi = _bounds(specs[0])
    labels = []
    for step, b in enumerate(DALIGenericIterator([pipe], ["v1", "v2", "y"])):
        v1, v2, y = b[0]["v1"], b[0]["v2"], b[0]["y"]
        assert v1.shape == v2.shape == (16, 3, crop, crop) and v1.dtype == torch.float32
        assert v1.min() >= lo and v1.max() <= hi and v2.min() >= lo and v2.max() <= hi
        assert not torch.equal(v1, v2)
        assert torch.equal(y.reshape(-1).long(), torch.from_numpy(src.batch(0, step)[1]).reshape(-1).long())
        labels.append(y.reshape(-1))
    labels = torch.cat(labels)
    assert len(labels) == (206 // 16) * 16 and set(labels.tolist()) == set(range(10))


def test_dali_crop_box_is_the_source_s_and_rows_come_first(tmp_path):
    """The crop box DaliBatchSource draws (top, left, height, width, in pixels) reaches the crop as rows first."""
    _dali()
    import io

    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    from PIL import Image

    from vssl_fast.data.augment import ViewSpec
    from vssl_fast.data.folder_dali import N_VIEW_PARAMS, make_dali_pipeline

    H, W = 40, 60
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0], img[..., 1] = np.arange(W)[None, :] * 4, np.arange(H)[:, None] * 6  # red = 4x, green = 6y
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    spec = ViewSpec(crop_size=8, jitter_p=0, gray_p=0, blur_p=0, solarize_p=0, flip_p=0, mean=(0, 0, 0), std=(1, 1, 1))

    def src(info):
        if info.iteration >= 1:
            raise StopIteration
        p = np.zeros((1, 2, N_VIEW_PARAMS), np.float32)
        p[0, :, :4] = [20, 0, 20, 15]  # rows 20..39, columns 0..14
        return [np.frombuffer(buf.getvalue(), np.uint8)], np.zeros((1, 1), np.int32), p

    pipe = make_dali_pipeline(src, (spec, spec), 1, None, 1)
    pipe.build()
    v = next(DALIGenericIterator([pipe], ["v1", "v2", "y"]))[0]["v1"][0] * 255
    assert 0 <= v[0].min() and v[0].max() <= 4 * 14 + 4  # x in 0..14
    assert 6 * 19 <= v[1].min() and v[1].max() <= 6 * 39 + 1  # y in 20..39


def _make_loader(kind, tree, bs=4, seed=1, rank=0, world=1, **kw):
    from vssl_fast.data.folder_dali import DaliTwoViewLoader
    from vssl_fast.data.folder_torchvision import NvjpegTwoViewLoader, TorchvisionTwoViewLoader

    specs = view_specs("imagenet", "asymmetric", 24)
    cpu = torch.device("cpu")
    if kind == "dali":
        _dali()
        return DaliTwoViewLoader(tree, specs, bs, seed, rank, world, cpu, False, torch.float32, **kw)
    cls = {"torchvision": TorchvisionTwoViewLoader, "nvjpeg": NvjpegTwoViewLoader}[kind]
    return cls(tree, specs, bs, seed, rank, world, cpu, kw.pop("workers", 0), False, torch.float32, **kw)


def _device_loader():
    from vssl_fast.data.loader import DeviceTwoViewLoader

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (26, 3, 16, 16), dtype=torch.uint8, generator=g)
    return DeviceTwoViewLoader(x, torch.arange(26), 4, view_specs("cifar10", crop_size=16), 1)


@pytest.mark.parametrize("kind", ["device", "dali", "torchvision", "nvjpeg"])
def test_every_loader_gives_steps_per_epoch_batches_in_every_epoch(small_tree, tmp_path, kind):
    """3 epochs through each loader: exactly len(loader) batches each, and the epoch counter follows."""
    ld = _device_loader() if kind == "device" else _make_loader(kind, small_tree / "train", cache_dir=tmp_path)
    assert len(ld) == 6
    counts, labels = [], []
    for _ in range(3):
        ys = [y for _, _, y in ld]
        counts.append(len(ys))
        labels.append(torch.cat(ys).tolist())
    assert counts == [6, 6, 6] and (ld.epoch, ld.step) == (3, 0)
    assert labels[0] != labels[1]  # epochs reshuffle


def _collect(ld, epochs_to):
    out = []
    while ld.epoch < epochs_to:
        for b in ld:
            out.append(b)
    return out


def _same(a, b):
    assert len(a) == len(b)
    for k, (x, y) in enumerate(zip(a, b)):
        assert all(torch.equal(u, v) for u, v in zip(x, y)), f"batch {k} differs"


@pytest.mark.parametrize("kind", ["dali", "torchvision", "nvjpeg"])
def test_resume_is_exact_mid_epoch_and_across_the_epoch_boundary(small_tree, tmp_path, kind):
    """A loader restored from state_dict() at any (epoch, step) gives the batches, views included, of an
    uninterrupted one: mid-epoch, at an epoch's end (the checkpoint before the epoch-end evaluation) and
    in the next epoch."""
    full = _make_loader(kind, small_tree / "train", cache_dir=tmp_path)
    states, batches = [], []
    while full.epoch < 2:
        for b in full:
            batches.append(b)
            states.append(full.state_dict())
    assert len(batches) == 12
    for k in (2, 5, 7):  # states[5] is (0, 6): every batch of epoch 0 out, the epoch not yet closed
        again = _make_loader(kind, small_tree / "train", cache_dir=tmp_path)
        again.load_state_dict(states[k])
        _same(batches[k + 1:], _collect(again, 2))
    if kind == "torchvision":  # worker processes do not change the views
        _same(batches[:6], list(_make_loader(kind, small_tree / "train", cache_dir=tmp_path, workers=2)))


def test_dali_resume_far_into_a_run_costs_no_replay(small_tree, tmp_path, monkeypatch):
    """Resuming at epoch 3000 builds the pipeline there: the source is asked for the batches from that
    position on, never for the 18,000 before it (counted, not timed: replaying them took minutes)."""
    _dali()
    from vssl_fast.data.folder_dali import DaliBatchSource

    asked = []
    batch = DaliBatchSource.batch
    monkeypatch.setattr(DaliBatchSource, "batch", lambda self, epoch, step: asked.append((epoch, step)) or batch(
        self, epoch, step))
    ld = _make_loader("dali", small_tree / "train", cache_dir=tmp_path)
    ld.load_state_dict({"epoch": 3000, "step": 4, "seed": 1, "world": 1})
    got = list(ld)
    assert len(got) == 2 and (ld.epoch, ld.step) == (3001, 0)
    assert asked[:2] == [(3000, 4), (3000, 5)] and all(e >= 3000 for e, _ in asked) and len(asked) <= 2 + 6
    src_labels = ld.samples.labels[np.concatenate([
        __import__("vssl_fast.data.loader", fromlist=["x"]).epoch_indices(24, 1, 3000, 6, 1, 4, 0)[s].numpy()
        for s in (4, 5)])]
    assert torch.cat([y for _, _, y in got]).tolist() == src_labels.tolist()


@pytest.mark.parametrize("kind", ["dali", "torchvision"])
def test_ranks_read_disjoint_shards_with_their_own_augmentations(small_tree, tmp_path, kind):
    r0, r1 = (_make_loader(kind, small_tree / "train", bs=4, rank=r, world=2, cache_dir=tmp_path) for r in (0, 1))
    assert len(r0) == len(r1) == 24 // 8
    from vssl_fast.data.loader import epoch_indices

    idx = [epoch_indices(24, 1, 0, 3, 2, 4, r).reshape(-1).tolist() for r in (0, 1)]
    assert not set(idx[0]) & set(idx[1])
    b0, b1 = list(r0), list(r1)
    labels = r0.samples.labels
    assert torch.cat([y for _, _, y in b0]).tolist() == labels[idx[0]].tolist()
    assert torch.cat([y for _, _, y in b1]).tolist() == labels[idx[1]].tolist()
    assert not torch.equal(b0[0][0], b1[0][0])


def test_dali_crop_boxes_follow_torchvision_s_rules():
    """Boxes inside the image; area share within scale and aspect within ratio, up to rounding, or the
    centred fallback; the same draws give the same boxes."""
    from vssl_fast.data.augment import rrc_boxes

    rng = np.random.default_rng(0)
    H = rng.integers(8, 600, 2000).astype(np.float64)
    W = np.where(rng.random(2000) < 0.1, H * 5, rng.integers(8, 600, 2000)).astype(np.float64)  # some very wide
    top, left, h, w = rrc_boxes(H, W, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(1))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    assert (h >= 1).all() and (w >= 1).all()
    fallback = (top == (H - h) // 2) & (left == (W - w) // 2) & ((h == H) | (w == W))
    area, aspect = h * w / (H * W), w / h
    tol = 2.5 / np.minimum(h, w)  # rounding each side to whole pixels
    ok = (area >= 0.08 - 2 * tol) & (area <= 1 + 1e-9) & (aspect >= 0.75 - tol) & (aspect <= 4 / 3 + tol)
    assert (ok | fallback).all() and fallback.any()
    assert ((aspect[fallback] >= 0.75 - tol[fallback]) & (aspect[fallback] <= 4 / 3 + tol[fallback])).all()
    again = rrc_boxes(H, W, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip((top, left, h, w), again))


def test_dali_and_torchvision_read_the_same_samples_in_the_same_order(small_tree, tmp_path):
    a = torch.cat([y for _, _, y in _make_loader("dali", small_tree / "train", cache_dir=tmp_path)])
    b = torch.cat([y for _, _, y in _make_loader("torchvision", small_tree / "train", cache_dir=tmp_path)])
    assert torch.equal(a, b)


def test_dali_reader_processes_give_the_same_batches(small_tree, tmp_path):
    """DALI's parallel external source (spawned worker processes, the GPU default) equals the serial one."""
    serial = list(_make_loader("dali", small_tree / "train", cache_dir=tmp_path))
    parallel = _make_loader("dali", small_tree / "train", cache_dir=tmp_path, workers=2)
    _same(serial, list(parallel))
    parallel.close()


def test_torchvision_fallback_loader_and_eval(jpeg_tree, tmp_path):
    from vssl_fast.data.folder_eval import FolderEvalLoader
    from vssl_fast.data.folder_torchvision import TorchvisionTwoViewLoader

    specs = view_specs("imagenet", "asymmetric", 32)
    ld = TorchvisionTwoViewLoader(jpeg_tree / "train", specs, 8, 0, 0, 1, torch.device("cpu"), 0, False, torch.float32,
                                  cache_dir=tmp_path)
    v1, v2, y = next(iter(ld))
    assert v1.shape == v2.shape == (8, 3, 32, 32) and y.shape == (8,)
    ev = FolderEvalLoader(jpeg_tree / "val", 16, 0, 1, torch.device("cpu"), 0, crop=24, resize=28)
    x, yv = next(iter(ev))
    assert x.shape == (16, 3, 24, 24)
    assert sum(len(b[1]) for b in ev) == 100 + 6


@pytest.fixture
def bad_tree(small_tree, tmp_path):
    """small_tree's train split plus an empty, a truncated and a non-image JPEG (24 good files, 3 bad)."""
    import shutil

    tree = tmp_path / "bad"
    shutil.copytree(small_tree / "train", tree)
    cls = sorted(p.name for p in tree.iterdir())
    big = (tree / cls[0] / "big_0.jpg").read_bytes()
    (tree / cls[0] / "zz_empty.jpg").write_bytes(b"")
    (tree / cls[1] / "zz_truncated.jpg").write_bytes(big[: len(big) // 2])
    (tree / cls[2] / "zz_text.jpg").write_bytes(b"hello, I am not a JPEG")
    return tree


@pytest.mark.parametrize("kind", ["dali", "torchvision", "nvjpeg"])
def test_bad_files_are_skipped_counted_and_logged_once_on_every_path(bad_tree, tmp_path, caplog, kind):
    from vssl_fast.data.folder_files import BadFiles

    bad = BadFiles(max_fraction=0.2)
    ld = _make_loader(kind, bad_tree, bad=bad, cache_dir=tmp_path / "cache")
    assert len(ld) == 24 // 4 and len(ld.samples) == 24 and ld.samples.num_files == 27
    counts = [len(list(ld)) for _ in range(2)]
    assert counts == [6, 6]
    assert sorted(Path(p).name for p in bad.files) == ["zz_empty.jpg", "zz_text.jpg", "zz_truncated.jpg"]
    assert bad.count("train") == 3 and bad.global_count() == 3
    for name in ("zz_empty.jpg", "zz_text.jpg", "zz_truncated.jpg"):
        assert caplog.text.count(name) == 1, name
    assert "zz_empty.jpg (empty)" in caplog.text and "zz_truncated.jpg (truncated" in caplog.text
    # evaluation loaders on a checked tree leave the bad files out too, without a word
    from vssl_fast.data.folder_files import SkippingImageFolder

    assert len(SkippingImageFolder(bad_tree, None)) == 24


def test_the_file_check_is_cached_and_redone_when_the_tree_changes(bad_tree, tmp_path, monkeypatch):
    from vssl_fast.data import folder_files, tools
    from vssl_fast.data.folder_files import validate_folder

    first = validate_folder(bad_tree, tmp_path / "cache")
    monkeypatch.setattr(folder_files, "_VALIDATED", {})  # a new process: only the disk cache is left
    monkeypatch.setattr(tools, "quick_check", lambda p: pytest.fail(f"checked {p} again"))
    again = validate_folder(bad_tree, tmp_path / "cache")
    assert again.paths == first.paths and np.array_equal(again.sizes, first.sizes)
    assert list(again.sizes[again.paths.index(str(bad_tree / "airplane" / "big_0.jpg"))]) == [240, 320]
    monkeypatch.undo()
    (bad_tree / "airplane" / "zz_empty.jpg").unlink()
    assert validate_folder(bad_tree, tmp_path / "cache").num_files == 26


def test_too_many_bad_files_fail_the_run_with_one_line_naming_scan(bad_tree, tmp_path):
    from vssl_fast.data.folder_files import BadDataError, BadFiles

    with pytest.raises(BadDataError) as e:
        _make_loader("torchvision", bad_tree, bad=BadFiles(max_fraction=0.1), cache_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and f"python -m vssl_fast.data scan {bad_tree}" in msg
    assert "3 of 27 image files" in msg and "data.max_bad_fraction=0.1" in msg
    _make_loader("torchvision", bad_tree, bad=BadFiles(max_fraction=0.12), cache_dir=tmp_path)  # 3/27 = 0.111


def test_too_many_bad_files_exit_4_under_train_py_s_policy(tmp_path):
    from vssl_fast import faults
    from vssl_fast.data.folder_files import BadDataError

    e = BadDataError("3 of 27 image files in /x are bad; list them with `python -m vssl_fast.data scan /x`")
    assert faults.classify(e) == (4, str(e))


def test_torchvision_path_skips_files_only_a_decode_finds(bad_tree, tmp_path, caplog):
    """A file that passes the check but does not decode: skipped where it is met (the next file takes its
    place), counted once in the main process whatever the workers, and counted towards the limit."""
    from vssl_fast.data.folder_files import BadDataError, BadFiles, SkippingImageFolder
    from vssl_fast.data.folder_torchvision import TwoViewTransform

    (bad_tree / "bird" / "zz_garbled.jpg").write_bytes(garbled_jpeg())
    bad = BadFiles(max_fraction=0.2)
    ld = _make_loader("torchvision", bad_tree, bad=bad, cache_dir=tmp_path, workers=2)
    assert len(ld.samples) == 25 and len(bad) == 3
    for _ in range(2):
        assert len(list(ld)) == 6
    assert len(bad) == 4 and "zz_garbled.jpg" in "".join(bad.files)
    assert caplog.text.count("zz_garbled.jpg") == 1  # the main process logs; the workers' logs go nowhere here
    with pytest.raises(BadDataError, match="4 of 28 image files"):
        strict = _make_loader("torchvision", bad_tree, bad=BadFiles(max_fraction=0.12), cache_dir=tmp_path)
        for _ in range(2):
            list(strict)
    empty = tmp_path / "allbad" / "a"
    empty.mkdir(parents=True)
    (empty / "x.jpg").write_bytes(garbled_jpeg())
    with pytest.raises(RuntimeError, match="no readable image"):
        SkippingImageFolder(tmp_path / "allbad", TwoViewTransform(view_specs("imagenet", "asymmetric", 16)))[0]


def test_dali_names_scan_when_a_file_fails_during_the_run(small_tree, tmp_path):
    """A file that breaks after the check (here emptied mid-run) stops DALI with one line naming scan."""
    import shutil

    from vssl_fast.data.folder_files import BadDataError

    tree = tmp_path / "t"
    shutil.copytree(small_tree / "train", tree)
    ld = _make_loader("dali", tree, cache_dir=tmp_path / "cache")
    for f in tree.rglob("*.jpg"):
        f.write_bytes(b"")
    with pytest.raises(BadDataError, match=r"DALI failed on batch 0 of epoch 0 .*python -m vssl_fast.data scan"):
        list(ld)


def test_build_data_says_which_path_runs(jpeg_tree, tmp_path, monkeypatch, caplog):
    from vssl_fast.config import load_config
    from vssl_fast.data import folder
    from vssl_fast.data.folder import build_folder_data

    cfg = load_config(["--preset", "imagenet100", f"--data.path={jpeg_tree}", "--data.crop_size=32",
                       "--train.batch_size=8", "--data.workers=1", f"--data.cache_dir={tmp_path}"])
    monkeypatch.setattr(folder, "dali_available", lambda: (False, "nvidia.dali is not importable (test)"))
    bundle = build_folder_data(cfg, torch.device("cpu"))
    assert "torchvision ImageFolder" in bundle.describe and "not DALI: nvidia.dali is not importable" in bundle.describe
    assert bundle.num_classes == 10 and len(bundle.bad_files) == 0
    assert "data path" not in caplog.text  # the trainer logs the description, once


def test_folder_data_evaluates_at_the_configured_crop_and_builds_no_dali_pipeline(small_tree, tmp_path, monkeypatch):
    """Validation and the kNN bank at data.crop_size (resize in proportion), min(4, cores) evaluation workers
    by default; the DALI training pipeline is built on the first training batch, never for evaluation."""
    _dali()
    import os

    from vssl_fast.config import load_config
    from vssl_fast.data.folder import build_folder_data
    from vssl_fast.data.folder_dali import DaliTwoViewLoader

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cfg = load_config(["--preset", "imagenet100", f"--data.path={small_tree}", "--data.crop_size=40",
                       "--train.batch_size=4", f"--data.cache_dir={tmp_path}", "--data.loader=dali"])
    bundle = build_folder_data(cfg, torch.device("cpu"))
    assert isinstance(bundle.train, DaliTwoViewLoader) and bundle.train.pipe is None and len(bundle.train) == 6
    x, _ = next(iter(bundle.val))
    assert x.shape[1:] == (3, 40, 40) and bundle.val.dl.num_workers == 2 and bundle.bank.dl.num_workers == 2
    assert sum(len(b[1]) for b in bundle.bank) == 24
    assert "24 training images in 3 classes, 0 bad files" in bundle.describe and bundle.train.pipe is None


def test_nvjpeg_style_loader_decodes_batches_on_the_device(jpeg_tree, tmp_path):
    """The GPU torchvision path, run with decode_jpeg on the CPU: shapes, labels, bad files skipped."""
    import shutil

    from vssl_fast.data.folder_torchvision import NvjpegTwoViewLoader

    tree = tmp_path / "t"
    shutil.copytree(jpeg_tree / "train", tree)
    (tree / "airplane" / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    specs = view_specs("imagenet", "asymmetric", 32)
    ld = NvjpegTwoViewLoader(tree, specs, 16, 0, 0, 1, torch.device("cpu"), 0, False, torch.float32, cache_dir=tmp_path)
    n = 0
    for v1, v2, y in ld:
        assert v1.shape[1:] == (3, 32, 32) and v1.shape == v2.shape and len(y) == v1.shape[0] <= 16
        n += len(y)
    assert n == (206 // 16) * 16 and len(ld.bad) == 1
