"""train.py on an image-folder tree through DALI (CPU-only mode): real epochs, bad files, exact resume."""

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers_train import REPO, env, run_train, train_rows

from vssl_fast import checkpoint as ckpt

pytest.importorskip("nvidia.dali", reason="DALI is the optional 'dali' extra")


@pytest.fixture(scope="module")
def folder_tree(cifar_tiny_tar, tmp_path_factory):
    """2 classes of 8 train / 3 val real CIFAR JPEGs, plus one empty train file (16 good + 1 bad)."""
    root = tmp_path_factory.mktemp("in")
    with tarfile.open(cifar_tiny_tar) as tf:
        for m in tf:
            parts = Path(m.name).parts
            if not m.isfile() or parts[-2] not in ("airplane", "bird"):
                continue
            split = "train" if parts[-3] == "train" else "val"
            out = root / split / parts[-2]
            out.mkdir(parents=True, exist_ok=True)
            if len(list(out.iterdir())) < (8 if split == "train" else 3):
                (out / parts[-1]).write_bytes(tf.extractfile(m).read())
    (root / "train" / "bird" / "zz_empty.jpg").write_bytes(b"")
    return root


def _args(tree, run_dir, cache):
    kv = {"preset": "imagenet100", "run-dir": run_dir, "data.path": tree, "data.cache_dir": cache,
          "data.loader": "dali", "data.crop_size": 32, "data.max_bad_fraction": 0.1, "train.batch_size": 8,
          "train.epochs": 3, "train.max_steps": 5, "method.proj_hidden_dim": 32, "method.pred_hidden_dim": 32,
          "method.denoiser_hidden_dim": 32, "method.proj_output_dim": 16, "optim.warmup_epochs": 0.5,
          "log.every_steps": 1, "ckpt.every_steps": 3, "eval.online_every_epochs": 1, "eval.knn_every_epochs": 1,
          "log.tensorboard": "false", "log.progress": "false", "log.plots": "false"}
    return [f"--{k}={v}" for k, v in kv.items()]


def _evals(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["epoch"], r["step"]): r for r in rows if r.get("kind") == "eval"}


def test_dali_training_follows_real_epochs_counts_bad_files_and_resumes_exactly(folder_tree, tmp_path):
    """2.5 epochs of 2 steps: evaluations and checkpoints at the real epoch ends (DALI's end of epoch used
    to give an empty extra epoch each time), the final evaluation labelled 2.5, the bad file counted;
    a run killed after step 4 and resumed from its step-3 checkpoint (mid-epoch 2, after an epoch
    boundary) gives the same losses and evaluations."""
    base = tmp_path / "base"
    r = run_train(_args(os.path.relpath(folder_tree, REPO), base, tmp_path / "c"))  # relative to train.py's cwd
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = train_rows(base)
    assert sorted(rows) == [1, 2, 3, 4, 5] and [rows[s]["epoch"] for s in sorted(rows)] == [0, 0, 1, 1, 2]
    assert sorted(_evals(base)) == [(1, 2), (2, 4), (2.5, 5)]
    assert sorted(p.name for p in (base / "checkpoints").glob("*.pt")) == ["step_00000004.pt", "step_00000005.pt"]
    res = json.loads((base / "results.json").read_text())
    assert res["bad_files"] == 1 and rows[5]["bad_files"] == 1 and res["epochs"] == 2.5
    log = (base / "train.log").read_text()
    assert log.count("zz_empty.jpg") == 1 and log.count("data: DALI") == 1

    # the checkpoint holds the absolute data path: evaluation works from any directory, --data.path overrides it
    last = base / "checkpoints" / "step_00000005.pt"
    assert ckpt.load_checkpoint(last)["config"]["data"]["path"] == str(folder_tree)
    knn = [sys.executable, "-m", "vssl_fast.evaluate", "knn", "--ckpt", str(last), "--k", "5", "--t", "0.1"]
    r = subprocess.run(knn, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and 0 <= json.loads(r.stdout)["knn_k5_t0.1_top1"] <= 100, r.stderr[-2000:]
    r = subprocess.run(knn + [f"--data.path={tmp_path / 'moved'}"], cwd=tmp_path, env=env(), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 4 and r.stderr.count("\n") == 1 and "pass --data.path=DIR" in r.stderr, r.stderr[-2000:]

    run = tmp_path / "run"
    r = run_train(_args(folder_tree, run, tmp_path / "c"), VSSL_FAULT_AT_STEP=4)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    state = ckpt.load_checkpoint(ckpt.find_latest(run / "checkpoints"))
    assert (state["step"], state["loader"]["epoch"], state["loader"]["step"]) == (3, 1, 1)  # mid-epoch, after a boundary
    r = run_train(_args(folder_tree, run, tmp_path / "c") + ["--resume=auto"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout
    a, b = train_rows(base), train_rows(run)
    assert all(a[s]["loss"] == b[s]["loss"] for s in range(1, 6)), [(a[s]["loss"], b[s]["loss"]) for s in a]
    ea, eb = _evals(base), _evals(run)
    assert sorted(eb) == sorted(ea)
    for key in ea:
        assert ea[key]["online_top1"] == eb[key]["online_top1"], key
    assert ea[(2.5, 5)]["knn_k20_t0.07_top1"] == eb[(2.5, 5)]["knn_k20_t0.07_top1"]
