"""Every command ends a known failure as train.py does (issue 26): one line on stderr and the README's exit
code (2 config, 3 output taken, 4 data, 5 checkpoint), never a traceback. The real entry points run in
subprocesses (``python -m ...``), as a user runs them."""

import subprocess
import sys
from pathlib import Path

import pytest

from vssl_fast.checkpoint import save_checkpoint
from vssl_fast.config import Config
from vssl_fast.models import build_backbone

REPO = Path(__file__).resolve().parents[1]


def _cmd(*args):
    r = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    return r.returncode, lines, r


def _one_line(lines, r):
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def checkpoints(cifar_tiny_tar, tmp_path_factory):
    """A checkpoint whose data.path is a tar cut short, a truncated copy of it, and a file that is no checkpoint."""
    import tarfile

    d = tmp_path_factory.mktemp("cmd")
    cfg = Config()
    cfg.model.cifar_stem, cfg.data.path, cfg.data.cache_dir = True, str(d / "cut.tar"), str(d / "cache")
    with tarfile.open(cifar_tiny_tar) as tf:
        last = tf.getmembers()[-1].offset
    (d / "cut.tar").write_bytes(cifar_tiny_tar.read_bytes()[:last])  # cut at the last member's header
    weights = build_backbone("resnet18", True).state_dict()
    state = {"config": cfg.to_dict(), "model": {f"backbone.{k}": v for k, v in weights.items()}}
    good = save_checkpoint(state, d / "ck", 2)
    (d / "truncated.pt").write_bytes(good.read_bytes()[:4000])
    (d / "notes.pt").write_text("not a checkpoint\n" * 30)
    return d, good


@pytest.mark.parametrize("case", ["missing", "truncated", "not a checkpoint"])
def test_evaluate_and_export_refuse_a_bad_checkpoint_in_one_line_exit_5(checkpoints, case, tmp_path):
    d, _ = checkpoints
    path = {"missing": d / "nope.pt", "truncated": d / "truncated.pt", "not a checkpoint": d / "notes.pt"}[case]
    for cmd in (["vssl_fast.evaluate", "knn", "--ckpt", path], ["vssl_fast.export", "--ckpt", path, "--out", tmp_path / "x"]):
        rc, lines, r = _cmd(*cmd)
        line = _one_line(lines, r)
        assert rc == 5 and line.startswith(f"error: checkpoint {path} "), (cmd, line)


def test_evaluate_data_and_config_failures_are_one_line(checkpoints):
    d, good = checkpoints
    rc, lines, r = _cmd("vssl_fast.evaluate", "knn", "--ckpt", good)  # its data.path: an archive cut short
    line = _one_line(lines, r)
    assert rc == 4 and f"{d / 'cut.tar'} is truncated" in line and "pass --data.path=DIR" in line, line
    rc, lines, r = _cmd("vssl_fast.evaluate", "knn", "--ckpt", good, "--optim.lr=nan")
    assert rc == 2 and _one_line(lines, r).startswith("config error: ") and "optim.lr" in lines[0]


def test_data_scan_exit_codes(tmp_path):
    (tmp_path / "ok").mkdir()
    rc, lines, r = _cmd("vssl_fast.data", "scan", tmp_path / "ok")
    assert rc == 0 and lines == [f"0 bad files under {tmp_path / 'ok'}"]
    rc, lines, r = _cmd("vssl_fast.data", "scan", tmp_path / "nope")
    assert rc == 4 and "does not exist" in _one_line(lines, r)


def test_imagenet100_builder_exit_codes(tmp_path):
    rc, lines, r = _cmd("vssl_fast.data", "imagenet100", "--src", tmp_path / "nope", "--dst", tmp_path / "out")
    assert rc == 4 and _one_line(lines, r).startswith(f"error: imagenet100: {tmp_path / 'nope' / 'train'} is missing")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    rc, lines, r = _cmd("vssl_fast.data", "imagenet100", "--src", tmp_path / "nope", "--dst", tmp_path / "taken")
    assert rc == 3 and "already exists and is not empty" in _one_line(lines, r)
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep me"
