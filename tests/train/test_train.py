"""train.py end to end on the CPU: outputs, kill-and-resume equality, SIGTERM, export, checkpoints."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers_train import REPO, env, run_train, tiny_args, train_rows

from vssl_fast import checkpoint as ckpt


def _ok(r):
    assert r.returncode == 0, f"train.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def baseline(cifar_tiny_tar, tmp_path_factory):
    """An uninterrupted 12-step run (checkpoint every 4 steps, metrics every step)."""
    d = tmp_path_factory.mktemp("base")
    r = run_train(tiny_args(cifar_tiny_tar, d / "run", d / "cache", steps=12, eval__knn_every_epochs=1))
    _ok(r)
    return d / "run"


def test_outputs_of_a_run(baseline):
    rows = train_rows(baseline)
    assert sorted(rows) == list(range(1, 13))
    for r in rows.values():
        assert {"step", "loss", "img_per_s", "kl", "ll", "z_std", "lr", "tau", "data_wait", "step_time_ms", "eta_s"} <= r.keys()
    res = json.loads((baseline / "results.json").read_text())
    for key in ("online_top1", "online_top5", "knn_top1", "knn_k20_t0.07_top1", "knn_k200_t0.1_top1", "wall_time_s", "img_per_s"):
        assert res[key] is not None, key
    assert res["steps"] == 12 and res["method"] == "vssl"
    # each automatic choice names what it rests on (vssl_fast.auto_settings): samples and spread included
    assert set(res["auto_evidence"]) == {"train.compile", "train.graph"}
    assert all({"rule", "source", "samples", "spread"} <= e.keys() for e in res["auto_evidence"].values())
    assert (baseline / "config.json").exists() and (baseline / "summary.md").exists()
    assert (baseline / "loss.png").exists() and (baseline / "accuracy.png").exists()
    # lr warms up then decays; tau rises to 1
    lrs = [rows[s]["lr"] for s in sorted(rows)]
    taus = [rows[s]["tau"] for s in sorted(rows)]
    assert max(lrs) > lrs[0] and lrs[-1] < max(lrs) and taus == sorted(taus) and taus[0] == pytest.approx(0.99)
    # retention: at least 2 and at most keep complete checkpoints
    done = sorted((baseline / "checkpoints").glob("step_*.pt.done"))
    assert len(done) == 2


def test_kill_and_resume_is_bit_exact(baseline, cifar_tiny_tar, tmp_path):
    args = tiny_args(cifar_tiny_tar, tmp_path / "run", tmp_path / "cache", steps=12)
    r = run_train(args, VSSL_FAULT_AT_STEP=6)  # SIGKILL right after step 6; the last checkpoint is step 4
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert ckpt.find_latest(tmp_path / "run" / "checkpoints").name == "step_00000004.pt"
    r = run_train(args + ["--resume=auto"])
    _ok(r)
    assert "resumed from" in r.stdout
    a, b = train_rows(baseline), train_rows(tmp_path / "run")
    assert sorted(b) == list(range(1, 13))
    for s in range(1, 13):
        assert a[s]["loss"] == b[s]["loss"], f"step {s}: {a[s]['loss']} != {b[s]['loss']}"
    wa = ckpt.load_checkpoint(ckpt.find_latest(baseline / "checkpoints"))["model"]
    wb = ckpt.load_checkpoint(ckpt.find_latest(tmp_path / "run" / "checkpoints"))["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_sigterm_saves_exits_143_and_resumes(cifar_tiny_tar, tmp_path):
    # a run that cannot end on its own (a million steps), stopped once it has logged two steps: the
    # outcome does not depend on how fast this machine steps; 300 s is a hang guard only
    args = tiny_args(cifar_tiny_tar, tmp_path / "run", tmp_path / "cache", steps=10**6, train__epochs=10**6,
                     ckpt__every_steps=10**7)
    p = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < 300 and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    assert p.poll() is None, "train.py ended before it was signalled"
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 143, out[-3000:]
    last = ckpt.find_latest(tmp_path / "run" / "checkpoints")
    assert last is not None
    state = ckpt.load_checkpoint(last)  # loadable with weights_only=True
    stopped_at = int(state["step"])
    assert 2 <= stopped_at < 10**6
    r = run_train(tiny_args(cifar_tiny_tar, tmp_path / "run", tmp_path / "cache", steps=stopped_at + 3,
                            ckpt__every_steps=1000) + ["--resume=auto"])
    _ok(r)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == stopped_at + 3


def test_explicit_missing_resume_path_is_an_error(cifar_tiny_tar, tmp_path):
    r = run_train(tiny_args(cifar_tiny_tar, tmp_path / "run", tmp_path / "cache", steps=2) + [f"--resume={tmp_path}/nope.pt"])
    assert r.returncode != 0 and "does not exist" in (r.stderr + r.stdout)


def test_resume_under_incompatible_config_names_the_field(baseline, cifar_tiny_tar, tmp_path):
    last = ckpt.find_latest(baseline / "checkpoints")
    args = tiny_args(cifar_tiny_tar, tmp_path / "run", tmp_path / "cache", steps=14, method__proj_output_dim=8)
    r = run_train(args + [f"--resume={last}"])
    assert r.returncode != 0 and "method.proj_output_dim=16" in (r.stderr + r.stdout)


def test_truncated_checkpoint_is_never_chosen(tmp_path):
    d = tmp_path / "ck"
    for step in (4, 8):
        ckpt.save_checkpoint({"config": {}, "x": torch.full((3,), float(step))}, d, step, keep=2)
    # a kill mid-write: the temp file, and a renamed-but-unmarked file, both truncated
    (d / ".step_00000012.pt.tmp").write_bytes(b"PK\x03\x04trunc")
    full = (d / "step_00000008.pt").read_bytes()
    (d / "step_00000012.pt").write_bytes(full[: len(full) // 2])
    latest = ckpt.find_latest(d)
    assert latest.name == "step_00000008.pt"
    assert torch.equal(ckpt.load_checkpoint(latest)["x"], torch.full((3,), 8.0))
    with pytest.raises(ckpt.CheckpointError, match="could not be loaded"):
        ckpt.load_checkpoint(d / "step_00000012.pt")
    # retention keeps the newest two complete ones
    ckpt.save_checkpoint({"config": {}}, d, 16, keep=2)
    assert sorted(p.name for p in d.glob("step_*.pt.done")) == ["step_00000008.pt.done", "step_00000016.pt.done"]


def test_export_round_trips_strictly(baseline, tmp_path):
    from vssl_fast.export import export_backbone, load_exported
    from vssl_fast.models import build_backbone

    last = ckpt.find_latest(baseline / "checkpoints")
    meta = export_backbone(last, tmp_path / "exp")
    assert meta["arch"] == "resnet18" and meta["cifar_stem"] is True
    net = load_exported(tmp_path / "exp").eval()
    ref = build_backbone("resnet18", cifar_stem=True)
    sd = {k[9:]: v for k, v in ckpt.load_checkpoint(last)["model"].items() if k.startswith("backbone.")}
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net(x), ref.eval()(x))
    if not meta["safetensors"]:
        pytest.skip("safetensors (the dev extra) is not installed: only backbone.pt was written and checked")
    from safetensors.torch import load_file

    st = load_file(str(tmp_path / "exp" / "backbone.safetensors"))
    assert st.keys() == sd.keys() and all(torch.equal(st[k], sd[k]) for k in sd)


def test_knn_command_on_a_checkpoint(baseline, cifar_tiny_tar, tmp_path):
    last = ckpt.find_latest(baseline / "checkpoints")
    out = tmp_path / "knn.json"
    r = subprocess.run([sys.executable, "-m", "vssl_fast.evaluate", "knn", "--ckpt", str(last), "--out", str(out),
                        f"--data.path={cifar_tiny_tar}", f"--data.cache_dir={tmp_path / 'c'}"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert 0 <= res["knn_k20_t0.07_top1"] <= 100 and "knn_k200_t0.1_top1" in res


def test_linear_command_on_a_checkpoint(baseline, cifar_tiny_tar, tmp_path):
    last = ckpt.find_latest(baseline / "checkpoints")
    out = tmp_path / "lin.json"
    r = subprocess.run([sys.executable, "-m", "vssl_fast.evaluate", "linear", "--ckpt", str(last), "--epochs", "2",
                        "--batch-size", "32", "--out", str(out), f"--data.path={cifar_tiny_tar}",
                        f"--data.cache_dir={tmp_path / 'c'}"], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert 0 <= res["linear_top1"] <= 100 and res["linear_top5"] >= res["linear_top1"]


def test_linear_eval_on_an_image_folder(tmp_path):
    """The §3.6 protocol on a class-folder tree (the ImageNet-100 path), with a small backbone."""
    import numpy as np
    from PIL import Image

    from vssl_fast.data.folder_eval import FolderEvalLoader
    from vssl_fast.evaluate import folder_linear_batches, linear_eval

    for split in ("train", "val"):
        for c in range(2):
            d = tmp_path / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(np.full((40, 48, 3), 200 * c + i, np.uint8)).save(d / f"{i}.jpg")
    bb = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    dev = torch.device("cpu")
    batches = folder_linear_batches(tmp_path / "train", 4, 24, 0, 0, dev)
    val = FolderEvalLoader(tmp_path / "val", 8, 0, 1, dev, 0, crop=24, resize=28)
    res = linear_eval(bb, batches, val, 2, dev, epochs=3, batch_size=4, log=lambda *_: None)
    assert set(res) == {"linear_top1", "linear_top5", "linear_last_loss"} and res["linear_top5"] == 100.0
