"""Evaluation protocol: the kNN bank subset, feature dtypes, results fields, the evaluate commands end to end."""

import json
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from helpers_train import run_train, tiny_args

from vssl_fast import checkpoint as ckpt
from vssl_fast import evaluate
from vssl_fast.config import ConfigError, load_config
from vssl_fast.data import build_data, stratified_subset
from vssl_fast.data.augment import MEANS_STDS

CPU = torch.device("cpu")


def _cfg(data, cache, *extra):
    return load_config(["--preset=smoke", f"--data.path={data}", f"--data.cache_dir={cache}", "--data.train_subset=0",
                        "--data.val_subset=0", "--train.batch_size=8", *extra])


# ----------------------------------------------------------------------------- the kNN bank
def test_stratified_subset_is_proportional_fixed_and_sorted():
    labels = np.repeat(np.arange(5), [40, 30, 20, 8, 2])  # stored class by class, unequal classes
    idx = stratified_subset(labels, 24, seed=3)
    # quotas 9.6, 7.2, 4.8, 1.92, 0.48: floors 9, 7, 4, 1, 0, and the 3 left go to the largest remainders
    assert np.bincount(labels[idx], minlength=5).tolist() == [10, 7, 5, 2, 0]
    assert idx.tolist() == sorted(set(idx.tolist()))
    assert np.array_equal(idx, stratified_subset(labels, 24, seed=3))
    other = stratified_subset(labels, 24, seed=4)
    assert not np.array_equal(idx, other) and np.bincount(labels[other], minlength=5).tolist() == [10, 7, 5, 2, 0]
    assert np.array_equal(stratified_subset(labels, 500, seed=3), np.arange(100))
    with pytest.raises(ValueError, match="n must be >= 1"):
        stratified_subset(labels, 0, seed=3)


def test_bank_subset_of_real_cifar_jpegs_holds_every_class(cifar_tiny_tar, tmp_path):
    cfg = _cfg(cifar_tiny_tar, tmp_path / "c", "--eval.knn_train_subset=50")
    data = build_data(cfg, CPU)
    # the archive is stored class by class: the old prefix bank held three classes of ten
    assert len(set(data.train.labels[:50].tolist())) == 3
    xs, ys = zip(*data.bank)
    assert torch.bincount(torch.cat(ys), minlength=10).tolist() == [5] * 10
    again = torch.cat([x for x, _ in build_data(cfg, CPU).bank])
    assert torch.equal(torch.cat(xs), again)  # a fixed sample: the same bank in every run
    assert sum(len(y) for _, y in data.val) == 100  # validation untouched


@pytest.fixture(scope="module")
def jpeg_folder(cifar_tiny_tar, tmp_path_factory):
    """<root>/{train,test}/<class>/*.jpg with 4 train and 2 test real CIFAR JPEGs per class (40 + 20)."""
    d = tmp_path_factory.mktemp("folder")
    with tarfile.open(cifar_tiny_tar) as t:
        t.extractall(d, filter="data")
    root = next(p.parent for p in d.rglob("train") if p.is_dir())
    for split, keep in (("train", 4), ("test", 2)):
        for cls in (root / split).iterdir():
            for f in sorted(cls.iterdir())[keep:]:
                f.unlink()
    return root


def test_bank_subset_of_an_image_folder_holds_every_class(jpeg_folder, tmp_path):
    cfg = _cfg(jpeg_folder, tmp_path / "c", "--data.dataset=imagefolder", "--data.loader=torchvision",
               "--data.workers=1", "--eval.knn_train_subset=30")
    data = build_data(cfg, CPU)
    assert data.bank.num_samples == 30 and data.val.num_samples == 20
    ys = torch.cat([y for _, y in data.bank])
    assert torch.bincount(ys, minlength=10).tolist() == [3] * 10
    # solo-learn's torchvision validation transform: transforms.Resize(256), i.e. bilinear
    from torchvision.transforms import InterpolationMode

    assert data.val.ds.transform.transforms[0].interpolation == InterpolationMode.BILINEAR


@pytest.mark.parametrize("bad", ["--eval.feature_dtype=fp16", "--eval.knn_train_subset=-1"])
def test_eval_config_rejects_bad_values(bad, tmp_path):
    with pytest.raises(ConfigError, match=bad[2:].split("=")[0]):
        _cfg(tmp_path, tmp_path, bad)


# ----------------------------------------------------------------------------- feature dtypes
def test_bf16_loader_images_give_fp32_features_without_autocast():
    """On CUDA the CIFAR loaders hand bf16 images; extraction without autocast fed them to fp32 weights and
    crashed. Reproduced on the CPU with the same dtypes: the images are now cast to the weights' dtype."""
    from vssl_fast.evaluate import extract_features
    from vssl_fast.models import build_backbone

    torch.manual_seed(0)
    bb = build_backbone("resnet18", True).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g).bfloat16(), torch.arange(8)
    with pytest.raises(RuntimeError):  # the crash: bf16 input, fp32 weights, no autocast
        bb(x)
    f, labels = extract_features(bb, [(x, y)], CPU, None)
    assert f.dtype == torch.float32 and torch.equal(labels, y)
    with torch.no_grad():
        assert torch.equal(f, bb(x.float()))
    fb, _ = extract_features(bb, [(x, y)], CPU, torch.bfloat16)  # eval.feature_dtype=bf16: autocast
    assert fb.dtype == torch.float32 and not torch.equal(fb, f)
    assert torch.nn.functional.cosine_similarity(fb, f).min() > 0.99


# ----------------------------------------------------------------------------- a checkpoint made by the trainer
@pytest.fixture(scope="module")
def tiny_run(cifar_tiny_tar, tmp_path_factory):
    d = tmp_path_factory.mktemp("evalrun")
    r = run_train(tiny_args(cifar_tiny_tar, d / "run", d / "cache", steps=2, eval__knn_train_subset=50))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return d / "run", d / "cache"


def test_results_json_records_the_evaluation_protocol(tiny_run):
    res = json.loads((tiny_run[0] / "results.json").read_text())
    assert res["knn_bank_size"] == 50 and res["val_size"] == 100
    assert res["eval_feature_dtype"] == "fp32" and res["eval_network"] == "student backbone"


# fp32 (the default) runs in tests/train/test_train.py; bf16 on the CPU is slow, hence 40 validation images
@pytest.mark.parametrize("feature_dtype,network", [("bf16", "student"), ("fp32", "teacher")])
def test_knn_command_end_to_end(tiny_run, cifar_tiny_tar, tmp_path, feature_dtype, network):
    """The command with the trainer's dtype rules; bf16 on the CPU runs the CUDA configuration (bf16 images
    from the CIFAR loader, bf16 autocast), which crashed before."""
    run, cache = tiny_run
    out = tmp_path / "knn.json"
    rc = evaluate.main(["knn", "--ckpt", str(ckpt.find_latest(run / "checkpoints")), "--out", str(out),
                        "--network", network, f"--data.path={cifar_tiny_tar}", f"--data.cache_dir={cache}",
                        f"--eval.feature_dtype={feature_dtype}", "--data.val_subset=40"])
    res = json.loads(out.read_text())
    assert rc == 0 and res["knn_bank_size"] == 50 and res["val_size"] == 40
    assert res["eval_feature_dtype"] == feature_dtype and res["eval_network"] == f"{network} backbone"
    assert 0 <= res["knn_k20_t0.07_top1"] <= res["knn_k20_t0.07_top5"] <= 100


def _linear(monkeypatch, tiny_run, out, batch_size, *overrides):
    """Run ``evaluate linear`` for one epoch; returns (results, the validation loader it used)."""
    seen = {}
    real = evaluate.linear_eval

    def spy(backbone, batches, val_loader, *a, **kw):
        seen["val"] = val_loader
        return real(backbone, batches, val_loader, *a, **kw)

    monkeypatch.setattr(evaluate, "linear_eval", spy)
    rc = evaluate.main(["linear", "--ckpt", str(ckpt.find_latest(tiny_run[0] / "checkpoints")), "--epochs", "1",
                        "--batch-size", str(batch_size), "--out", str(out), f"--data.cache_dir={tiny_run[1]}", *overrides])
    res = json.loads(out.read_text())
    assert rc == 0 and res["eval_feature_dtype"] == "fp32" and res["eval_network"] == "student backbone"
    assert 0 <= res["linear_top1"] <= res["linear_top5"] <= 100
    return res, seen["val"]


def test_linear_command_validates_with_its_training_statistics(tiny_run, cifar_tiny_tar, tmp_path, monkeypatch):
    res, val = _linear(monkeypatch, tiny_run, tmp_path / "lin.json", 32, f"--data.path={cifar_tiny_tar}",
                       "--data.train_subset=64", "--data.val_subset=40")
    assert res["val_size"] == 40
    # the probe validates with the statistics it trains with: the dataset's (CIFAR-100's on cifar100)
    assert (val.mean, val.std) == MEANS_STDS["cifar10"] and val.out_dtype == torch.float32


def test_linear_command_on_an_image_folder(tiny_run, jpeg_folder, tmp_path, monkeypatch):
    """The folder branch (ImageNet-100's): the CIFAR checkpoint's backbone on CIFAR JPEGs as a class-folder tree."""
    from torchvision.transforms import InterpolationMode

    res, val = _linear(monkeypatch, tiny_run, tmp_path / "lin.json", 8, f"--data.path={jpeg_folder}",
                       "--data.dataset=imagefolder", "--data.loader=torchvision", "--data.workers=1")
    assert res["val_size"] == 20
    # solo-learn's DALI linear pipeline: validation resize bicubic
    assert val.ds.transform.transforms[0].interpolation == InterpolationMode.BICUBIC


# ----------------------------------------------------------------------------- several processes
def test_linear_batches_of_two_ranks_are_the_one_process_batches(cifar_tiny_tar, jpeg_folder, tmp_path):
    """Each rank's slice of every global batch holds the pixels and labels one process gives in those rows
    (array and folder paths), so a DDP head trains on what one process trains on."""
    data = build_data(_cfg(cifar_tiny_tar, tmp_path / "c"), CPU)
    mean, std = MEANS_STDS["cifar10"]
    one = list(evaluate.array_linear_batches(data.train.images, data.train.labels, 16, 32, mean, std, 5)(1))
    ranks = [list(evaluate.array_linear_batches(data.train.images, data.train.labels, 16, 32, mean, std, 5, r, 2)(1))
             for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 200 // 16
    for (x, y), (x0, y0), (x1, y1) in zip(one, *ranks):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    fone = list(evaluate.folder_linear_batches(jpeg_folder / "train", 8, 16, 0, 5, CPU)(0))
    franks = [list(evaluate.folder_linear_batches(jpeg_folder / "train", 8, 16, 1, 5, CPU, r, 2)(0)) for r in (0, 1)]
    assert len(fone) == len(franks[0]) == 40 // 8
    for (x, y), (x0, y0), (x1, y1) in zip(fone, *franks):  # workers=1 vs in-process: seeded per sample
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    with pytest.raises(ValueError, match="must split evenly over 3 processes"):
        evaluate.array_linear_batches(data.train.images, data.train.labels, 16, 32, mean, std, 5, 0, 3)


def test_evaluate_under_torchrun_matches_one_process(tiny_run, cifar_tiny_tar, tmp_path):
    """torchrun -m vssl_fast.evaluate used one process's work on every rank (no distributed init). Both runs on the
    CPU (gloo), also on a GPU machine, whose one card cannot host two ranks."""
    import sys

    from helpers_train import REPO, env

    run, cache = tiny_run
    ck = str(ckpt.find_latest(run / "checkpoints"))
    common = ["--ckpt", ck, f"--data.path={cifar_tiny_tar}", f"--data.cache_dir={cache}", "--data.val_subset=40"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for command, extra, key in (("knn", [], "knn_k20_t0.07_top1"),
                                ("linear", ["--epochs", "2", "--batch-size", "32", "--data.train_subset=96"], "linear_top1")):
        res = {}
        for n, launcher in ((1, [sys.executable]), (2, torchrun)):
            out = tmp_path / f"{command}{n}.json"
            r = subprocess.run(launcher + ["-m", "vssl_fast.evaluate", command, *common, *extra, "--out", str(out)],
                               cwd=REPO, env=env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            assert r.stdout.count(f'"{key}"') == 1  # printed once, by rank 0
            res[n] = json.loads(out.read_text())
        one, two = res[1], res[2]
        assert (one["world_size"], two["world_size"]) == (1, 2) and one["val_size"] == two["val_size"] == 40
        for k, v in one.items():
            if k == "linear_last_loss":  # DDP averages the two halves' gradients: round-off only
                assert two[k] == pytest.approx(v, rel=1e-4, abs=1e-5)
            elif k.endswith(("_top1", "_top5")):
                assert two[k] == v, f"{command} {k}: one process {v}, two processes {two[k]}"
            elif k not in ("world_size",):
                assert two[k] == v, k
