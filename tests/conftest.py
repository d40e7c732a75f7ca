import os
import tarfile
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Without CUDA the Triton kernels run on CPU tensors under the interpreter (set before triton is
# imported anywhere). With CUDA the compiled kernels are what the tests check: the interpreter on
# CUDA tensors dereferences device pointers from the pointer tables on the host and crashes.
if HAS_CUDA:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise pytest.UsageError("TRITON_INTERPRET is set on a CUDA machine: unset it so the kernel tests run compiled")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _package_logger_restored():
    """An in-process Trainer configures the package logger (its own handlers, no propagation); put it
    back after every test, so a later test's caplog sees the package's records whatever the order."""
    import logging

    log = logging.getLogger("vssl_fast")
    saved = (list(log.handlers), log.propagate, log.level)
    yield
    for h in list(log.handlers):
        if h not in saved[0]:
            log.removeHandler(h)
            h.close()
    log.handlers[:] = saved[0]
    log.propagate, log.level = saved[1], saved[2]


@pytest.fixture
def kernel_device():
    """CUDA when present, else the CPU under TRITON_INTERPRET=1."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


REPO = Path(__file__).resolve().parents[1]
SHARED_TAR = REPO / ".." / "shared" / "data" / "cifar10-jpeg.tar.gz"
# On a device machine ../shared does not travel: the device check carries the archive (call 1) or
# the tiny extract the tests use (call 2, ``python -m bench.gpu_check --prepare``) into .gpu/.
CIFAR_SOURCES = [SHARED_TAR, REPO / ".gpu" / "cifar10-jpeg.tar.gz", REPO / ".gpu" / "cifar-tiny.tar"]


def cifar_source() -> Path | None:
    return next((p for p in CIFAR_SOURCES if p.exists()), None)


def _make_tiny_tar(dst: Path, per_class_train: int, per_class_test: int, src_tar: Path | None = None) -> Path:
    """A small class-folder tar of real CIFAR-10 JPEGs taken from the shared archive."""
    counts: dict = {}
    with tarfile.open(src_tar or cifar_source()) as src, tarfile.open(dst, "w") as out:
        for m in src:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 4:
                continue
            split, cls = parts[-3], parts[-2]
            cap = per_class_train if split == "train" else per_class_test
            if counts.get((split, cls), 0) >= cap:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            out.addfile(m, src.extractfile(m))
    return dst


@pytest.fixture(scope="session")
def cifar_tiny_tar(tmp_path_factory):
    """20 train + 10 test real JPEGs per class (200 + 100), as cifar10-jpeg/{train,test}/<class>/*.jpg."""
    if cifar_source() is None:
        pytest.skip(f"needs the CIFAR-10 JPEG archive at {SHARED_TAR} (the project's shared data)")
    return _make_tiny_tar(tmp_path_factory.mktemp("cifar") / "cifar-tiny.tar", 20, 10)
