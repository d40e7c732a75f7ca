"""Skip accounting on every device (issue 23): the schedule is read on the device at the number of
applied steps, so nothing waits for the host to learn of a skip, and a checkpoint's schedule
position is the one the uninterrupted run has at that step. ``train.max_consecutive_skips`` reads
the device count without a host sync per step, at most ``CounterReader.DEPTH - 1`` steps late.

These run the trainer's device path on the CPU (FusedLARS and the fused kernels under the Triton
interpreter, no host read of the skip count per step): the GPU's semantics; the skip counts reach
the host CounterReader.DEPTH - 1 steps late on every device alike."""

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


def test_counter_reader_reads_each_value_depth_minus_one_steps_later_in_order():
    """The same lag on every device and rank: the value of step k is read at the push of step k + DEPTH - 1
    (never "whichever copies happen to have landed", which differs between ranks on GPUs)."""
    r = CounterReader(torch.device("cpu"), depth=4)
    seen = {}
    for step in range(1, 11):
        seen[step] = r.push(torch.tensor(step * 10), step)
    assert seen == {k: ([(k - 3, 10 * (k - 3))] if k >= 4 else []) for k in range(1, 11)}
    assert r.drain() == [(k, 10 * k) for k in (8, 9, 10)] and r.drain() == []


def test_a_count_that_never_lands_is_a_distributed_error_after_the_timeout():
    """A captured collective that hangs is watched by nothing else: the wait for the step's count gives up
    after dist.timeout_s with exit 8 (a fake clock; the query never completes)."""
    from vssl_fast.faults import DistributedError
    from vssl_fast.step import wait_for

    now = [0.0]

    def tick():
        now[0] += 1.0

    with pytest.raises(DistributedError, match=r"did not complete within dist.timeout_s=30 s") as e:
        wait_for(lambda: False, 30, "the step's skip count", clock=lambda: now[0], pause=tick)
    assert e.value.exit_code == 8 and 30 < now[0] <= 32
    wait_for(lambda: True, 30, "x", clock=lambda: now[0], pause=tick)  # done at once: no wait


def _tiny(monkeypatch, width=8):
    monkeypatch.setitem(models.FEATURE_DIMS, "resnet18", width)
    monkeypatch.setattr(models, "build_backbone", lambda name="resnet18", cifar_stem=False: tiny_backbone(width))


def _argv(tar, tmp_path, run, steps, **kw):
    # 24 images at batch 8: 3 steps per epoch, a checkpoint at every epoch end (ckpt.every_steps far away),
    # log points far apart (the old code learned of skips there), the fused kernels on the device path
    kw = {"data__crop_size": 16, "data__train_subset": 24, "data__val_subset": 8, "eval__knn_train_subset": 8,
          "eval__knn_k": 4, "eval__knn_t": 0.1, "log__plots": "false", "ckpt__every_steps": 1000,
          "log__every_steps": 1000, "optim__warmup_epochs": 0, **kw}
    return tiny_args(tar, tmp_path / run, tmp_path / "cache", steps=steps, **kw) + [
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
    """Steps 2.. are non-finite; the limit (3 in a row) is reached at step 4, read DEPTH - 1 steps later:
    the run stops at step 4 + DEPTH - 1 on every device, naming step 4."""
    _tiny(monkeypatch)
    # 64 images: 8 steps per epoch, so no epoch-end checkpoint (which reads every pending count) comes first
    tr = Trainer(load_config(_argv(cifar_tiny_tar, tmp_path, "c", 20, train__max_consecutive_skips=3,
                                   data__train_subset=64)))
    try:
        _poisoned(tr, set(range(2, 21)))
        with pytest.raises(NonFiniteError, match=r"3 consecutive steps .*last at step 4, train.max_consecutive_skips=3"):
            tr.fit()
        assert tr.stepper.step == 4 + CounterReader.DEPTH - 1
    finally:
        tr.close()


def test_settle_waits_for_the_device_queue_with_the_timeout(monkeypatch):
    """Before the host blocks on device values (a log point, an evaluation) it waits for the queued work at
    most dist.timeout_s: a stuck collective is exit 8 there, not a read that never returns."""
    from vssl_fast.faults import DistributedError

    done = {"v": False}

    recorded = []

    class Event:
        def record(self, stream=None):
            recorded.append(stream)

        def query(self):
            return done["v"]

    r = CounterReader(torch.device("cpu"), timeout_s=0.05)
    r.settle("never on a CPU")  # nothing queued anywhere but the host: returns at once
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    r.cuda, r.device = True, torch.device("cuda", 1)  # the CUDA branch, its event faked
    with pytest.raises(DistributedError, match=r"step 7 did not complete within dist.timeout_s=0.05 s") as e:
        r.settle("step 7")
    assert e.value.exit_code == 8
    done["v"] = True
    r.settle("step 8")
    assert recorded == ["stream of cuda:1"] * 2  # on the reader's device, not whichever is current


def test_the_trainer_settles_before_every_log_point_and_evaluation(cifar_tiny_tar, tmp_path, monkeypatch):
    _tiny(monkeypatch)
    argv = tiny_args(cifar_tiny_tar, tmp_path / "run", tmp_path / "cache", steps=4, data__crop_size=16,
                     data__train_subset=16, data__val_subset=8, eval__knn_train_subset=8, eval__knn_k=4,
                     eval__knn_t=0.1, log__plots="false", log__every_steps=2, eval__online_every_epochs=1)
    tr = Trainer(load_config(argv))
    events = []
    settle, record, evaluate = tr.stepper.skip_reader.settle, tr.monitor.record, tr.evaluate
    monkeypatch.setattr(tr.stepper.skip_reader, "settle", lambda what: (events.append("settle"), settle(what))[1])
    monkeypatch.setattr(tr.monitor, "record", lambda row: (events.append(row["kind"]), record(row))[1])
    monkeypatch.setattr(tr, "evaluate", lambda *a: (events.append("evaluate"), evaluate(*a))[1])
    try:
        tr.fit()
    finally:
        tr.close()
    blocking = [i for i, e in enumerate(events) if e in ("train", "evaluate")]
    assert events.count("train") == 2 and events.count("evaluate") >= 2, events
    assert all(events[i - 1] == "settle" for i in blocking), events
