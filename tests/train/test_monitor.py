"""What a run writes while it is watched: the step log under a progress bar on a terminal, W&B rows."""

import json
import os
import pty
import subprocess
import sys
import threading

from helpers_train import REPO, env, tiny_args, train_rows


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
