"""What a run writes while it is watched: the step log under a progress bar on a terminal, W&B rows."""

import json
import os
import pty
import subprocess
import sys
import threading

import pytest
from helpers_train import REPO, env, run_train, tiny_args, train_rows


def _run_on_a_terminal(args: list[str], timeout: int = 600) -> tuple[int, str]:
    """train.py with stdout and stderr on a pseudo-terminal (isatty() is true there, as in an interactive shell)."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env(), stdin=subprocess.DEVNULL,
                         stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []

    def drain():  # a pty's buffer is small: read while the run writes, until the last writer closes it (EIO)
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    try:
        rc = p.wait(timeout=timeout)
    finally:
        p.kill()
        t.join(timeout=30)
        os.close(master)
    return rc, b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_keeps_every_step_line_in_train_log(cifar_tiny_tar, tmp_path):
    """The bar was drawn *instead of* logging: train.log of an interactive run had no step lines."""
    run = tmp_path / "run"
    rc, screen = _run_on_a_terminal(tiny_args(cifar_tiny_tar, run, tmp_path / "cache", steps=4, log__progress="true"))
    assert rc == 0, screen[-3000:]
    assert "\r[" in screen and "] 4/4 ep 0 step 4/4" in screen  # the bar was drawn on the terminal
    assert "[rank 0] ep 0 step" not in screen  # ... and the step lines did not scroll under it
    log = (run / "train.log").read_text()
    for step in range(1, 5):
        assert f"] ep 0 step {step}/4 loss " in log, f"train.log has no line for step {step}"
    assert sorted(train_rows(run)) == [1, 2, 3, 4]  # metrics.jsonl: every step row
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("loss" in r for r in rows if r["kind"] == "train")


# ----------------------------------------------------------------------------- Weights & Biases
def _wandb_history(run_dir) -> list[dict]:
    """The history rows of the offline W&B run in ``run_dir``, read back from its .wandb file (LevelDB-style log
    blocks of 32 KiB holding wandb_internal_pb2.Record protobufs: what `wandb sync` would upload)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    data, pos, block = path.read_bytes(), 7, 32768  # a 7-byte file header, then records
    records, part = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # padding
            continue
        part = chunk if kind in (1, 2) else part + chunk  # full / first, then middle / last pieces
        if kind in (1, 4):
            records.append(part)
    rows = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            items = {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            rows.append({k: v for k, v in items.items() if not k.startswith("_")})  # wandb's own _step, _runtime
    return rows


def test_wandb_logs_the_metrics_rows_offline(cifar_tiny_tar, tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (the [wandb] extra, part of [dev])")
    run = tmp_path / "run"
    r = run_train(tiny_args(cifar_tiny_tar, run, tmp_path / "cache", steps=3, log__wandb="true",
                            log__wandb_project="vssl-test"), timeout=600, WANDB_MODE="offline", WANDB_SILENT="true",
                  WANDB_DIR=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    want = [{k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)} for row in rows]
    got = _wandb_history(run)
    assert len(got) == len(want) == 4  # 3 step rows and the final evaluation
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and all(g[k] == pytest.approx(w[k], rel=1e-12) for k in w), (g, w)
    assert (run / "wandb_run_id").read_text().strip() in str(next(run.glob("wandb/offline-run-*")))


def test_wandb_asked_for_but_missing_is_one_line_exit_2(tmp_path, monkeypatch):
    from vssl_fast import faults
    from vssl_fast.config import ConfigError, load_config
    from vssl_fast.monitor import require_wandb
    from vssl_fast.trainer import Trainer

    assert load_config([]).log.wandb is False  # off by default
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError, as where it is not installed
    with pytest.raises(ConfigError, match=r"log.wandb=true: the wandb package is not installed; pip install wandb"):
        require_wandb()
    cfg = load_config(["--preset=smoke", "--log.wandb=true", f"--run-dir={tmp_path / 'run'}"])
    code, line = faults.classify(pytest.raises(ConfigError, Trainer, cfg).value)
    assert code == 2 and line.startswith("config error: log.wandb=true") and "\n" not in line
    assert not (tmp_path / "run").exists()  # refused before anything was written
