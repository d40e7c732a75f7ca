"""Reading CIFAR once into cached uint8 arrays: tar, folder, torchvision format; clear errors; a cache that
follows the files it was decoded from; archives cut short and missing classes refused (issue 26)."""

import gzip
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vssl_fast.data import sources as S
from vssl_fast.faults import DataError


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


# ----------------------------------------------------------------------------- the data the run sees is on disk
def _tree(cifar_tiny_tar, root):
    with tarfile.open(cifar_tiny_tar) as tf:
        tf.extractall(root, filter="data")
    return root


def test_a_changed_folder_is_decoded_again(cifar_tiny_tar, tmp_path):
    """Before issue 26 the cache key was the folder's own size and mtime: changes in subfolders were missed."""
    tree, cache = _tree(cifar_tiny_tar, tmp_path / "tree"), str(tmp_path / "cache")
    a = S.load_cifar_arrays(str(tree), "cifar10", cache)
    assert a.train_x.shape[0] == 200
    trucks = sorted(tree.rglob("train/truck/*.jpg"))
    for p in trucks[:5]:  # five trucks fewer: a smaller train split
        p.unlink()
    b = S.load_cifar_arrays(str(tree), "cifar10", cache)
    assert b.train_x.shape[0] == 195 and np.bincount(b.train_y).tolist() == [20] * 9 + [15]
    # a same-size rewrite with the modification time put back (touch -r, rsync -t) still changes the key
    victim = trucks[5]
    st = victim.stat()
    victim.write_bytes(b"x" * st.st_size)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ValueError, match="1 unreadable images"):
        S.load_cifar_arrays(str(tree), "cifar10", cache)


def _cut(src, dst, size):
    dst.write_bytes(src.read_bytes()[:size])
    return dst


def _members(tar):
    with tarfile.open(tar) as tf:
        return tf.getmembers()


@pytest.mark.parametrize("where", ["at the last member boundary", "inside the last header", "inside the last member"])
def test_a_truncated_tar_is_a_data_error_naming_it(cifar_tiny_tar, tmp_path, where):
    """Cut at a member boundary, tarfile reads on as if the archive had ended (before issue 26: accepted)."""
    last = _members(cifar_tiny_tar)[-1]  # its header starts at .offset, its data at .offset_data
    size = {"at the last member boundary": last.offset, "inside the last header": last.offset + 100,
            "inside the last member": last.offset_data + last.size // 2}[where]
    cut = _cut(cifar_tiny_tar, tmp_path / "cut.tar", size)
    with pytest.raises(DataError, match=rf"^{cut} is truncated or corrupt") as ei:
        S.load_cifar_arrays(str(cut), "cifar10", str(tmp_path / "cache"))
    assert "\n" not in str(ei.value)
    gz = tmp_path / "cut.tar.gz"  # the same cut archive, compressed
    gz.write_bytes(gzip.compress(cut.read_bytes()))
    with pytest.raises(DataError, match=rf"^{gz} is truncated or corrupt"):
        S.load_cifar_arrays(str(gz), "cifar10", str(tmp_path / "cache"))


def test_a_truncated_gzip_stream_is_a_data_error_naming_it(cifar_tiny_tar, tmp_path):
    whole = gzip.compress(cifar_tiny_tar.read_bytes())
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) * 3 // 4])
    with pytest.raises(DataError, match=rf"^{cut} is truncated or corrupt after \d+ members \(EOFError"):
        S.load_cifar_arrays(str(cut), "cifar10", str(tmp_path / "cache"))


def test_fewer_classes_than_the_dataset_has_is_a_data_error(cifar_tiny_tar, tmp_path):
    four = tmp_path / "four.tar"
    with tarfile.open(cifar_tiny_tar) as src, tarfile.open(four, "w") as out:
        for m in src:
            if Path(m.name).parts[-2] in ("airplane", "bird", "cat", "dog"):
                out.addfile(m, src.extractfile(m))
    with pytest.raises(DataError, match=r"holds 4 classes \(airplane, bird, cat, dog\); data.dataset='cifar10' has 10"):
        S.load_cifar_arrays(str(four), "cifar10", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="holds 10 classes .*data.dataset='cifar100' has 100"):
        S.load_cifar_arrays(str(cifar_tiny_tar), "cifar100", str(tmp_path / "cache"))
    tree = _tree(cifar_tiny_tar, tmp_path / "tree")  # a class missing from one split only
    for p in tree.rglob("test/horse/*.jpg"):
        p.unlink()
    with pytest.raises(DataError, match=r"test has no images of 1 of the 10 classes \(horse\)"):
        S.load_cifar_arrays(str(tree), "cifar10", str(tmp_path / "cache"))
