"""Reading CIFAR once into cached uint8 arrays: tar, folder, torchvision format; clear errors."""

import pickle
import tarfile

import numpy as np
import pytest

from vssl_fast.data import sources as S


def test_tar_and_folder_agree_and_cache_is_reused(cifar_tiny_tar, tmp_path, monkeypatch):
    a = S.load_cifar_arrays(str(cifar_tiny_tar), "cifar10", str(tmp_path / "c1"))
    assert a.train_x.shape == (200, 32, 32, 3) and a.test_x.shape == (100, 32, 32, 3) and a.train_x.dtype == np.uint8
    assert a.classes[:3] == ["airplane", "automobile", "bird"] and np.bincount(a.train_y).tolist() == [20] * 10
    with tarfile.open(cifar_tiny_tar) as tf:
        tf.extractall(tmp_path / "tree", filter="data")
    b = S.load_cifar_arrays(str(tmp_path / "tree"), "cifar10", str(tmp_path / "c2"))
    order_a = np.lexsort((a.train_x.reshape(200, -1).sum(1), a.train_y))
    order_b = np.lexsort((b.train_x.reshape(200, -1).sum(1), b.train_y))
    assert np.array_equal(a.train_x[order_a], b.train_x[order_b]) and a.classes == b.classes
    # a second load reads the cache: decoding is never called again
    monkeypatch.setattr(S, "_decode", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded twice")))
    c = S.load_cifar_arrays(str(cifar_tiny_tar), "cifar10", str(tmp_path / "c1"))
    assert np.array_equal(c.train_x, a.train_x)


def test_torchvision_cifar_format(tmp_path, monkeypatch):
    import torchvision

    root = tmp_path / "tv" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": list(range(4))}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    # the files are ours, not the real ones: skip torchvision's md5 check of the official archive
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    ds = S.load_cifar_arrays(str(tmp_path / "tv"), "cifar10", str(tmp_path / "cache"))
    assert ds.train_x.shape == (20, 32, 32, 3) and ds.test_x.shape == (4, 32, 32, 3) and ds.classes[0] == "c0"


def test_missing_data_says_how_to_point_at_it(tmp_path, monkeypatch):
    with pytest.raises(S.DataNotFound, match="does not exist.*--data.path"):
        S.load_cifar_arrays(str(tmp_path / "nope.tar.gz"), "cifar10", str(tmp_path))
    monkeypatch.delenv("VSSL_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(S, "__file__", str(tmp_path / "a" / "b" / "c.py"))
    with pytest.raises(S.DataNotFound, match=r"Pass --data.path=.*or set VSSL_DATA"):
        S.resolve_data_path("auto", "cifar10")
