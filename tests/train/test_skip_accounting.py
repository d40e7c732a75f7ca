"""Skip accounting on every device (issue 23): the schedule is read on the device at the number of
applied steps, so nothing waits for the host to learn of a skip, and a checkpoint's schedule
position is the one the uninterrupted run has at that step. ``train.max_consecutive_skips`` reads
the device count without a host sync per step, at most ``CounterReader.DEPTH - 1`` steps late.

These run the trainer's device path on the CPU (FusedLARS and the fused kernels under the Triton
interpreter, no host read of the skip count per step): the GPU's semantics. ``never_ready`` makes
every asynchronous count arrive as late as a GPU may deliver it."""

import pytest
import torch
from helpers import tiny_backbone
from helpers_train import tiny_args, train_rows
from vssl_fast.kernels._common import interpret_mode

from vssl_fast import models
from vssl_fast.config import load_config
from vssl_fast.faults import NonFiniteError
from vssl_fast.step import CounterReader
from vssl_fast.trainer import Trainer


def test_counter_reader_sees_every_value_in_order_within_its_depth():
    dev = torch.device("cpu")
    r = CounterReader(dev, depth=4)
    r.ready = lambda slot: False  # a device that is always behind: values arrive only when waited for
    seen = []
    for step in range(1, 11):
        new = r.push(torch.tensor(step * 10), step)
        assert all(step - s <= 3 for s, _ in new), f"a value arrived more than DEPTH - 1 steps late: {new} at {step}"
        seen += new
    # the value of step k arrives with the push of step k + 3 (its slot is needed again)
    assert seen == [(k, 10 * k) for k in range(1, 8)]
    assert r.drain() == [(k, 10 * k) for k in range(8, 11)] and r.drain() == []
    r2 = CounterReader(dev, depth=4)  # a device that keeps up: every value at once
    assert [r2.push(torch.tensor(k), k) for k in (1, 2)] == [[(1, 1)], [(2, 2)]]


def _tiny(monkeypatch, width=8):
    monkeypatch.setitem(models.FEATURE_DIMS, "resnet18", width)
    monkeypatch.setattr(models, "build_backbone", lambda name="resnet18", cifar_stem=False: tiny_backbone(width))


def _argv(tar, tmp_path, run, steps, **kw):
    # 24 images at batch 8: 3 steps per epoch, a checkpoint at every epoch end (ckpt.every_steps far away),
    # log points far apart (the old code learned of skips there), the fused kernels on the device path
    return tiny_args(tar, tmp_path / run, tmp_path / "cache", steps=steps, data__crop_size=16, data__train_subset=24,
                     data__val_subset=8, eval__knn_train_subset=8, eval__knn_k=4, eval__knn_t=0.1, log__plots="false",
                     ckpt__every_steps=1000, log__every_steps=1000, optim__warmup_epochs=0, **kw) + [
        "--method.impl=fused", "--optim.impl=fused", "--train.compile=none", "--model.channels_last=true",
        "--train.precision=fp32"]


class Crash(Exception):
    pass


def _poisoned(tr, bad_steps, crash_at=None):
    """The trainer's forward, with a non-finite loss at ``bad_steps`` and a crash before ``crash_at``."""
    fwd = tr.stepper.forward

    def forward(*a):
        taking = tr.stepper.step + 1
        if taking == crash_at:
            raise Crash(f"crash before step {taking}")
        loss, parts = fwd(*a)
        return (loss * float("nan"), parts) if taking in bad_steps else (loss, parts)

    tr.stepper.forward = forward


def _fit(argv, bad_steps, crash_at=None):
    tr = Trainer(load_config(argv))
    try:
        assert tr.stepper.device_schedule, "the device path (fused optimizer reading the LR on the device)"
        _poisoned(tr, bad_steps, crash_at)
        tr.fit()
        return {k: v.clone() for k, v in tr.model.state_dict().items()}, int(tr.stepper.skipped)
    finally:
        tr.close()


@pytest.mark.parametrize("graph", ["off", "on"])  # 'on': the graph-ready step, as captured on a GPU
def test_resume_after_a_skip_before_an_epoch_end_checkpoint_is_bit_exact(graph, cifar_tiny_tar, tmp_path, monkeypatch):
    """A skip at step 3, the epoch's last, then the epoch-end checkpoint; a crash at step 5; resume.
    The old code saved the true skip count while the live schedule still lagged it on a GPU (it learned
    of skips at log points only), so the resumed run took other learning rates from step 4 on."""
    assert interpret_mode()
    _tiny(monkeypatch)
    monkeypatch.setattr(CounterReader, "ready", lambda self, slot: False)
    straight, skipped = _fit(_argv(cifar_tiny_tar, tmp_path, "a", 7, train__graph=graph), {3})
    assert skipped == 1
    with pytest.raises(Crash):
        _fit(_argv(cifar_tiny_tar, tmp_path, "b", 7, train__graph=graph), {3}, crash_at=5)
    resumed, skipped = _fit(_argv(cifar_tiny_tar, tmp_path, "b", 7, train__graph=graph, resume="auto"), {3})
    assert skipped == 1
    diff = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not diff, f"resumed after a skip differs from the straight run: {diff[:4]}"
    rows_a, rows_b = train_rows(tmp_path / "a"), train_rows(tmp_path / "b")
    assert rows_a[7]["lr"] == rows_b[7]["lr"] and rows_a[7]["loss"] == rows_b[7]["loss"]


def test_consecutive_skips_stop_within_the_readers_depth_naming_the_step(cifar_tiny_tar, tmp_path, monkeypatch):
    """Steps 2.. are non-finite; the limit (3 in a row) is reached at step 4. With the counts arriving
    as late as a GPU may deliver them, the run stops by step 4 + DEPTH - 1, naming step 4."""
    _tiny(monkeypatch)
    monkeypatch.setattr(CounterReader, "ready", lambda self, slot: False)
    tr = Trainer(load_config(_argv(cifar_tiny_tar, tmp_path, "c", 20, train__max_consecutive_skips=3)))
    try:
        _poisoned(tr, set(range(2, 21)))
        with pytest.raises(NonFiniteError, match=r"3 consecutive steps .*last at step 4, train.max_consecutive_skips=3"):
            tr.fit()
        assert 4 <= tr.stepper.step <= 4 + CounterReader.DEPTH - 1
    finally:
        tr.close()
