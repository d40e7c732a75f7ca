"""Faults (issues 17, 26): run-dir ownership (one live process per run dir), checkpoints that are bad, known
failures as one line and an exit code, SIGTERM in every phase, leftovers and metrics after resumes,
nonsensical config values.

The trainer runs in this process (``train.main``) at a tiny size (16 px crops, 4 images a batch, 4 steps an
epoch), so a run costs a few seconds; signals are real (``os.kill`` of this process from inside a phase).
"""

import datetime
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers_train import REPO, env, run_train, tiny_args

from vssl_fast import checkpoint as ckpt
from vssl_fast import faults, rundir
from vssl_fast.config import ConfigError, load_config
from vssl_fast.data.loader import DeviceEvalLoader
from vssl_fast.optim import warmup_cosine

sys.path.insert(0, str(REPO))
import train  # noqa: E402

TINY = dict(data__crop_size=16, train__batch_size=4, data__train_subset=16, data__val_subset=4,
            eval__knn_train_subset=4, eval__knn_k=4, eval__knn_t=0.1, ckpt__every_steps=2, log__plots="false")
STEPS_PER_EPOCH = 4  # 16 images / 4


@pytest.fixture(autouse=True)
def _cpu_references(monkeypatch):
    """The trainer's CPU path uses the references (as in a subprocess without TRITON_INTERPRET)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("VSSL_DEBUG", raising=False)
    yield
    _restore_process_state()


def _restore_process_state():
    """What an in-process run leaves behind: its signal handlers and the package logger's handlers."""
    faults.restore_signals()
    log = logging.getLogger("vssl_fast")
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.propagate, log.level = True, logging.NOTSET


def _args(data, run, cache, steps, *extra, **kw):
    return tiny_args(data, run, cache, steps=steps, **{**TINY, **kw}) + list(extra)


def _main(argv, capsys):
    """train.main in this process: (exit code, stdout, stderr)."""
    try:
        rc = train.main(argv)
    except SystemExit as e:  # the trainer before issue 17 exited 143 this way
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() else None for p in sorted(d.rglob("*"))}


def _one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _train_steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "train"]


@pytest.fixture(scope="module")
def run0(cifar_tiny_tar, tmp_path_factory):
    """A finished 4-step run: checkpoints at steps 2 and 4, metrics rows 1..4, results."""
    d = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        rc = train.main(_args(cifar_tiny_tar, d / "run", d / "cache", 4))
    _restore_process_state()
    assert rc == 0
    return d / "run", cifar_tiny_tar, d / "cache"


@pytest.fixture
def cache(run0):
    """The decoded-data cache of run0, shared: each run skips decoding the JPEGs again."""
    return run0[2]


@pytest.fixture
def run_copy(run0, tmp_path):
    run, data, cache = run0
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", data, cache


# ----------------------------------------------------------------------------- the run directory
def test_a_run_dir_holding_a_run_is_never_written_without_resume(run0, run_copy, capsys):
    run, data, cache = run_copy
    before = _snapshot(run)
    rc, out, err = _main(_args(data, run, cache, 4, train__seed=7, optim__lr=0.5), capsys)
    line = _one_line(err)
    assert rc == 3 and "--resume auto" in line and "--run-dir" in line and str(run) in line
    assert _snapshot(run) == before
    # an explicit --resume of another run's checkpoint into it: refused too (the two runs would mix)
    foreign = run0[0] / "checkpoints" / "step_00000002.pt"
    rc, out, err = _main(_args(data, run, cache, 4, f"--resume={foreign}"), capsys)
    assert rc == 3 and "not one of its checkpoints" in _one_line(err)
    assert _snapshot(run) == before


def test_a_refused_start_leaves_the_run_dir_as_it_was(run_copy, tmp_path, capsys, monkeypatch):
    run, data, cache = run_copy
    before = _snapshot(run)
    # incompatible resume: one line naming the field; config.json still describes the checkpoints beside it
    rc, out, err = _main(_args(data, run, cache, 6, "--resume=auto", method__proj_output_dim=8), capsys)
    assert rc == 5 and "method.proj_output_dim=16" in _one_line(err)
    assert _snapshot(run) == before
    # data that is not data (a text file): one line naming data.path, exit 4, nothing written
    text = tmp_path / "notes.txt"
    text.write_text("not a tar archive\n" * 50)
    rc, out, err = _main(_args(text, run, cache, 6, "--resume=auto"), capsys)
    line = _one_line(err)
    assert rc == 4 and f"data.path='{text}'" in line
    assert _snapshot(run) == before
    rc, out, err = _main(_args(tmp_path / "missing.tar", tmp_path / "new", cache, 2), capsys)
    assert rc == 4 and "data.path=" in _one_line(err) and not (tmp_path / "new").exists()
    # --debug / VSSL_DEBUG=1: the traceback as well
    monkeypatch.setenv("VSSL_DEBUG", "1")
    rc, out, err = _main(_args(text, tmp_path / "new", cache, 2), capsys)
    assert rc == 4 and "Traceback" in err and not (tmp_path / "new").exists()


def test_resume_takes_the_lr_from_the_config_and_logs_the_change(run_copy, capsys):
    run, data, cache = run_copy
    rc, out, err = _main(_args(data, run, cache, 5, "--resume=auto", optim__lr=0.1), capsys)
    assert rc == 0, err[-3000:]
    assert "changed since the checkpoint" in out and "ssl.base_lr 0.015625 -> 0.0015625" in out
    base = 0.1 * 4 / 256  # optim.lr x batch / 256
    row5 = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"step": 5' in x][0]
    warmup = round(0.1 * STEPS_PER_EPOCH)  # tiny_args: optim.warmup_epochs=0.1
    assert row5["lr"] == pytest.approx(warmup_cosine(4, base, warmup, 5, 3e-5, 0.0), rel=1e-12)
    groups = ckpt.load_checkpoint(ckpt.find_latest(run / "checkpoints"))["optimizer"]["param_groups"]
    assert groups[0]["base_lr"] == pytest.approx(base)
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 0.1
    assert json.loads((run / "config.before_step_00000004.json").read_text())["optim"]["lr"] == 1.0
    assert "data: device-resident" in (run / "train.log").read_text()  # lines from before the start was accepted


# ----------------------------------------------------------------------------- one live process per run dir
def _popen_train(args, **envkw):
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env(**envkw),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("attempt", range(3))
def test_simultaneous_starts_into_one_run_dir_make_exactly_one_run(cifar_tiny_tar, cache, tmp_path, attempt):
    """Before issue 26 two such starts both ran and mixed metrics, checkpoints and config in the dir."""
    run, lrs = tmp_path / "run", (1.0, 0.25, 0.5)
    procs = [_popen_train(_args(cifar_tiny_tar, run, cache, 4, optim__lr=lr)) for lr in lrs]
    outs = [p.communicate(timeout=600) for p in procs]
    rcs = [p.returncode for p in procs]
    assert sorted(rcs) == [0, 3, 3], [(rc, err[-1500:]) for rc, (_, err) in zip(rcs, outs)]
    winner = lrs[rcs.index(0)]
    for rc, (out, err) in zip(rcs, outs):
        if rc == 3:  # refused at the lock, or (a loser slower than the whole run) as a dir holding a run
            line = _one_line(err)
            assert str(run) in line and ("in use by another live process" in line or "already holds a run" in line)
            assert "resolved config" not in out  # refused before anything was built
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == winner
    assert _train_steps(run) == [1, 2, 3, 4]  # one trajectory, each step once
    assert not list(run.glob("config.before_*")) and not (run / "metrics.superseded.jsonl").exists()
    assert {ckpt.load_checkpoint(p)["config"]["optim"]["lr"] for p in (run / "checkpoints").glob("step_*.pt")} == {winner}
    assert not (run / rundir.LOCK_NAME).exists()  # a clean end removes the lock file


def test_a_live_holder_refuses_every_other_start_even_resume_auto(run_copy, capsys):
    run, data, cache = run_copy
    held = rundir.RunDirLock(run)
    held.acquire()  # as another live run would: this process holds the lock through another open file
    try:
        before = _snapshot(run)
        for extra in (["--resume=auto"], []):
            rc, out, err = _main(_args(data, run, cache, 6, *extra), capsys)
            line = _one_line(err)
            assert rc == 3 and "in use by another live process" in line and f"pid {os.getpid()}" in line, line
            assert _snapshot(run) == before
    finally:
        held.release()
    rc, out, err = _main(_args(data, run, cache, 6, "--resume=auto"), capsys)
    assert rc == 0 and "resumed from" in out, err[-3000:]


def test_a_killed_holder_frees_the_run_dir_and_resume_auto_continues(cifar_tiny_tar, cache, tmp_path, capsys):
    run = tmp_path / "run"
    r = run_train(_args(cifar_tiny_tar, run, cache, 6), VSSL_FAULT_AT_STEP=3)  # SIGKILL after step 3
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert (run / rundir.LOCK_NAME).exists()  # the file stays; the kernel dropped the lock with the process
    rc, out, err = _main(_args(cifar_tiny_tar, run, cache, 6, "--resume=auto"), capsys)
    assert rc == 0, err[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000002.pt'} at step 2" in out
    assert _train_steps(run) == [1, 2, 3, 4, 5, 6] and not (run / rundir.LOCK_NAME).exists()


def test_two_locks_on_one_run_dir_exclude_each_other(tmp_path):
    a, b = rundir.RunDirLock(tmp_path / "r"), rundir.RunDirLock(tmp_path / "r")
    a.acquire()
    with pytest.raises(faults.RunDirError, match="in use by another live process"):
        b.acquire()
    a.release()  # the dir a made and left empty goes with the lock
    assert not (tmp_path / "r").exists()
    b.acquire()
    assert b.held and (tmp_path / "r" / rundir.LOCK_NAME).exists()
    b.release()


def test_a_run_dir_that_is_a_file_is_refused_before_the_data_load(tmp_path, cache, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine\n")
    for run in (f, f / "sub"):  # the file itself, or a dir under it
        rc, out, err = _main(_args(tmp_path / "missing.tar", run, cache, 2), capsys)  # data would be exit 4
        line = _one_line(err)
        assert rc == 3 and f"--run-dir {run} is an existing file, not a directory" in line, line
    assert f.read_text() == "mine\n"


def test_every_rank_agrees_on_a_refused_run_dir(run_copy):
    """Two ranks started as torchrun starts them (env://), but without torchrun, which would kill rank 1 as
    soon as rank 0 exits: each must exit 3 by itself, rank 1 told by rank 0, neither waiting for a timeout."""
    run, data, cache = run_copy
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    held = rundir.RunDirLock(run)
    held.acquire()
    try:
        procs = [_popen_train(_args(data, run, cache, 6, "--resume=auto", dist__timeout_s=300), MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=port, WORLD_SIZE=2, RANK=r, LOCAL_RANK=r) for r in (0, 1)]
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        held.release()
    assert [p.returncode for p in procs] == [3, 3], [err[-2000:] for _, err in outs]
    assert "in use by another live process" in _one_line(outs[0][1])
    assert "rank 0 could not claim the run dir" in _one_line(outs[1][1])


def test_checkpoint_temporaries_are_unique_per_process(tmp_path, monkeypatch):
    names, orig = [], torch.save

    def save(obj, f, *a, **k):
        names.append(Path(f.name).name)
        return orig(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    ckpt.save_checkpoint({"config": {}, "w": torch.ones(2)}, tmp_path, 2)
    assert names == [f".step_00000002.pt.{os.getpid()}.tmp"]
    for name in (".step_00000004.pt.12345.tmp", ".step_00000006.pt.tmp"):  # another process's; the old name
        (tmp_path / name).write_bytes(b"partial")
    assert ckpt.remove_partials(tmp_path) == [".step_00000004.pt.12345.tmp", ".step_00000006.pt.tmp"]


# ----------------------------------------------------------------------------- bad checkpoints
def test_auto_resume_skips_a_bad_checkpoint_and_tidies_the_run_dir(run_copy, capsys):
    run, data, cache = run_copy
    ck = run / "checkpoints"
    newest = ck / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:5000])  # truncated, yet marked complete
    (ck / ".step_00000006.pt.tmp").write_bytes(b"partial")  # leftovers of interrupted saves
    (ck / "step_00000008.pt").write_bytes(b"no marker")
    (ck / "step_00000010.pt.done").write_text("10\n")
    old_results = (run / "results.json").read_text()
    rc, out, err = _main(_args(data, run, cache, 5, "--resume=auto"), capsys)
    assert rc == 0, err[-3000:]
    skips = [x for x in out.splitlines() if "skipping" in x]
    assert len(skips) == 1 and "step_00000004.pt" in skips[0] and "truncated" in skips[0]
    assert f"resumed from {ck / 'step_00000002.pt'} at step 2" in out
    assert not {".step_00000006.pt.tmp", "step_00000008.pt", "step_00000010.pt.done"} & {p.name for p in ck.iterdir()}
    assert (ck / "step_00000004.pt.superseded").exists()  # set aside, not deleted
    # one metrics row per step; the rows of the replaced trajectory (steps 3, 4) moved aside
    assert _train_steps(run) == [1, 2, 3, 4, 5]
    aside = [json.loads(x) for x in (run / "metrics.superseded.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in aside if r["kind"] == "train") == [3, 4]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ips = [r["img_per_s"] for r in rows if r["kind"] == "train"]
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == 5 and res["img_per_s"] == pytest.approx(sum(ips) / len(ips))
    assert (run / "results.superseded.json").read_text() == old_results


def _tiny_states(d: Path):
    for step in (2, 4, 6):
        ckpt.save_checkpoint({"config": {}, "w": torch.full((3,), float(step))}, d, step, keep=3)
    (d / "step_00000006.pt").write_bytes((d / "step_00000006.pt").read_bytes()[:200])  # truncated
    ckpt.save_checkpoint({"config": {}, "w": torch.tensor([1.0, float("nan"), 2.0])}, d, 4, keep=3)  # non-finite


def test_bad_checkpoints_auto_skips_explicit_fails_in_one_line(tmp_path, caplog):
    d = tmp_path / "ck"
    _tiny_states(d)
    log = logging.getLogger("test_faults")
    with caplog.at_level(logging.WARNING, logger="test_faults"):
        path, state = ckpt.select_for_resume(d, "auto", log=log)
    assert path.name == "step_00000002.pt" and torch.equal(state["w"], torch.full((3,), 2.0))
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["resume auto", "resume auto"]
    assert "step_00000006.pt" in caplog.records[0].getMessage() and "non-finite" in caplog.records[1].getMessage()
    evil = tmp_path / "evil.pt"
    torch.save({"f": os.system}, evil)  # a pickle that runs code: refused by weights_only=True
    (tmp_path / "garbage.pt").write_bytes(b"plain text, not a checkpoint\n" * 40)
    for bad, why in [(d / "step_00000006.pt", "truncated"), (d / "step_00000004.pt", "non-finite"),
                     (evil, "refuses"), (tmp_path / "garbage.pt", "not a checkpoint"), (tmp_path / "nope.pt", "does not exist")]:
        with pytest.raises(ckpt.CheckpointError) as ei:
            ckpt.select_for_resume(d, str(bad))
        msg = str(ei.value)
        assert "\n" not in msg and str(bad) in msg and why in msg and "weights_only=False" not in msg, msg
        assert faults.classify(ei.value)[0] == 5
    (d / "step_00000002.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="none of the 3 complete checkpoints"):
        ckpt.select_for_resume(d, "auto")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path):
    d = tmp_path / "ck"
    ckpt.save_checkpoint({"config": {}, "w": torch.ones(3)}, d, 2)
    tmp = d / f".step_00000004.pt.{os.getpid()}.tmp"  # this process's temporary name for step 4
    tmp.symlink_to("/dev/full")  # every write there fails with ENOSPC
    with pytest.raises(faults.WriteError) as ei:
        ckpt.save_checkpoint({"config": {}, "w": torch.zeros(10_000)}, d, 4)
    code, line = faults.classify(ei.value)
    assert code == 7 and "step_00000004.pt" in line and "No space left" in line and "step_00000002.pt" in line
    assert not tmp.exists() and not (d / "step_00000004.pt").exists()
    assert ckpt.find_latest(d).name == "step_00000002.pt" and torch.equal(ckpt.load_good(ckpt.find_latest(d))["w"], torch.ones(3))
    assert faults.classify(OSError(errno.ENOSPC, "No space left on device", "runs/x/results.json"))[0] == 7


def test_a_non_finite_run_names_the_last_finite_checkpoint(cifar_tiny_tar, cache, tmp_path, capsys):
    # an absurd learning rate: the first step blows the weights up, the next ones are non-finite and skipped
    args = _args(cifar_tiny_tar, tmp_path / "run", cache, 8, optim__lr="1e30", optim__warmup_epochs=0,
                 train__max_consecutive_skips=2, ckpt__every_steps=1, ckpt__keep=10)
    rc, out, err = _main(args, capsys)
    line = _one_line(err)
    assert rc == 6 and "2 consecutive steps had a non-finite" in line and "--optim.lr=1e+29" in line
    ck = tmp_path / "run" / "checkpoints"
    if "no checkpoint in" in line:  # then none may be finite, which is checked here
        assert all(ckpt.nonfinite_entries(ckpt.load_checkpoint(p)) for p in ck.glob("step_*.pt"))
    else:
        named = Path(line.split("--resume ")[1].split(" ")[0])
        assert named.parent == ck and not ckpt.nonfinite_entries(ckpt.load_checkpoint(named))
        newer = [p for p in ck.glob("step_*.pt") if p.name > named.name]
        assert all(ckpt.nonfinite_entries(ckpt.load_checkpoint(p)) for p in newer)


# ----------------------------------------------------------------------------- stop signals in every phase
def _signal_in_evaluation(monkeypatch, sig=signal.SIGTERM):
    orig = DeviceEvalLoader.__iter__

    def it(self):
        for i, batch in enumerate(orig(self)):
            if i == 0:
                os.kill(os.getpid(), sig)
            yield batch

    monkeypatch.setattr(DeviceEvalLoader, "__iter__", it)


def test_sigterm_during_an_epoch_evaluation_saves_exits_143_and_the_evaluation_reruns(cifar_tiny_tar, cache, tmp_path,
                                                                                      capsys, monkeypatch):
    run = tmp_path / "run"
    two_step_epochs = dict(data__train_subset=8, eval__online_every_epochs=1, ckpt__every_steps=1000)
    with monkeypatch.context() as mp:
        _signal_in_evaluation(mp)
        rc, out, err = _main(_args(cifar_tiny_tar, run, cache, 8, **two_step_epochs), capsys)
    assert rc == 143, err[-3000:]
    assert _train_steps(run) == [1, 2]  # no step after the signal
    state = ckpt.load_checkpoint(ckpt.find_latest(run / "checkpoints"))
    assert state["step"] == 2 and state["pending_eval"] == [1, False]
    rc, out, err = _main(_args(cifar_tiny_tar, run, cache, 3, "--resume=auto", **two_step_epochs), capsys)
    assert rc == 0, err[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in rows if r["kind"] == "eval"][0] == (1, 2)
    assert _train_steps(run) == [1, 2, 3]


def test_sigterm_during_the_final_evaluation_exits_143_and_resume_finishes(cifar_tiny_tar, cache, tmp_path, capsys,
                                                                           monkeypatch):
    run = tmp_path / "run"
    args = _args(cifar_tiny_tar, run, cache, 2)
    with monkeypatch.context() as mp:
        _signal_in_evaluation(mp)
        rc, out, err = _main(args, capsys)
    assert rc == 143 and not (run / "results.json").exists()
    pending = ckpt.load_checkpoint(ckpt.find_latest(run / "checkpoints"))["pending_eval"]
    assert len(pending) == 2 and pending[1] is True  # (epoch label, with kNN): the final evaluation
    rc, out, err = _main(args + ["--resume=auto"], capsys)
    assert rc == 0, err[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == 2 and res["knn_top1"] is not None and _train_steps(run) == [1, 2]


def test_sigusr1_during_a_checkpoint_write_exits_143_after_that_save(cifar_tiny_tar, cache, tmp_path, capsys,
                                                                       monkeypatch):
    run = tmp_path / "run"
    saves = []
    orig = ckpt.save_checkpoint

    def save(state, d, step, keep=2):
        saves.append(step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return orig(state, d, step, keep)

    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    rc, out, err = _main(_args(cifar_tiny_tar, run, cache, 8, data__train_subset=8, ckpt__every_steps=1000), capsys)
    assert rc == 143, err[-3000:]
    assert saves == [2] and _train_steps(run) == [1, 2]  # the epoch-end save (2-step epochs), then out; no second save


_SIGNALS_AFTER_THE_SAVE = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import train
from vssl_fast import checkpoint, trainer

save, cleanup = checkpoint.save_checkpoint, trainer.cleanup

def saving(state, d, step, keep=2):
    os.kill(os.getpid(), signal.SIGTERM)  # the first at step 2; each later one arrives during a save
    return save(state, d, step, keep)

def cleaning(abort=False):
    os.kill(os.getpid(), signal.SIGTERM)  # after restore_signals(): the process is on its way out
    cleanup(abort)

checkpoint.save_checkpoint, trainer.cleanup = saving, cleaning
sys.exit(train.main(sys.argv[2:]))
"""


def test_stop_signals_during_and_after_the_save_still_exit_143(cifar_tiny_tar, cache, tmp_path):
    """Before issue 26 a SIGTERM after the save met the default handler again: death by the signal (-15)."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", _SIGNALS_AFTER_THE_SAVE, str(REPO),
                        *_args(cifar_tiny_tar, run, cache, 8, ckpt__every_steps=2)],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 143, (r.returncode, r.stderr[-3000:])
    assert "stopped by SIGTERM/SIGUSR1 at step 2" in _one_line(r.stderr)
    assert ckpt.find_latest(run / "checkpoints").name == "step_00000002.pt"


def test_a_batch_larger_than_the_data_is_a_config_error(cifar_tiny_tar, cache, tmp_path, capsys):
    rc, out, err = _main(_args(cifar_tiny_tar, tmp_path / "run", cache, 2, train__batch_size=100000), capsys)
    line = _one_line(err)
    assert rc == 2 and line.startswith("config error: train.batch_size: 16 training images cannot fill"), line
    assert "data.path" not in line and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- exit codes, config values
def test_a_distributed_timeout_is_one_line_with_exit_8():
    store, pgs = dist.HashStore(), {}

    def make(rank):  # the group's own timeout is a hang guard: both ranks meet however slow the machine
        pgs[rank] = dist.ProcessGroupGloo(dist.PrefixStore("t", store), rank, 2, datetime.timedelta(seconds=300))

    threads = [threading.Thread(target=make, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    opts = dist.AllreduceOptions()
    opts.timeout = datetime.timedelta(seconds=1)  # the collective's: it always expires, rank 1 never joins
    with pytest.raises(RuntimeError) as ei:
        pgs[0].allreduce([torch.ones(1)], opts).wait()
    code, line = faults.classify(ei.value)
    assert code == 8 and "dist.timeout_s" in line and "\n" not in line


def test_a_bug_keeps_its_traceback_and_exit_1(capsys):
    def boom(argv):
        raise ZeroDivisionError("division by zero")

    assert faults.run(boom, []) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "a bug" in err


@pytest.mark.parametrize("arg,key", [("--optim.lr=nan", "optim.lr"), ("--optim.lr=inf", "optim.lr"),
                                     ("--optim.weight_decay=-inf", "optim.weight_decay"),
                                     ("--train.max_steps=-1", "train.max_steps"),
                                     ("--data.train_subset=-5", "data.train_subset"),
                                     ("--train.max_consecutive_skips=0", "train.max_consecutive_skips")])
def test_nonsensical_values_are_config_errors_naming_the_key(arg, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load_config(["--preset", "smoke", arg])


def test_a_stuck_collective_aborts_the_group_prints_its_line_and_leaves_at_once(monkeypatch, capsys):
    """Exit 8 for a stuck collective: destroying the process group would wait for it (torch >= 2.6) and hang
    before the error line, so train.py aborts the group, prints the line, and exits without finalizers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", REPO / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    closed, left = [], []

    class StuckTrainer:
        def __init__(self, cfg):
            pass

        def fit(self):
            raise faults.DistributedError("the step's skip count (slot 1) did not complete within dist.timeout_s=5 s")

        def close(self, abort=False):
            closed.append(abort)

    monkeypatch.setattr(script, "Trainer", StuckTrainer)
    monkeypatch.setattr(faults, "exit_now", lambda code: left.append(code))
    assert script.main(["--preset", "smoke"]) == 8
    assert closed == [True] and left == [8]
    assert "did not complete within dist.timeout_s=5 s" in capsys.readouterr().err

    class OtherFailure(StuckTrainer):
        def fit(self):
            raise faults.DataError("a bad folder")

    monkeypatch.setattr(script, "Trainer", OtherFailure)
    assert script.main(["--preset", "smoke"]) == 4 and closed[-1] is False and left == [8]  # destroyed as usual


def test_cleanup_aborts_instead_of_destroying_when_asked(monkeypatch):
    from vssl_fast import distributed

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: calls.append("destroy"))
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", lambda *a: calls.append("abort"))
    distributed.cleanup(abort=True)
    distributed.cleanup()
    assert calls == ["abort", "destroy"]

    def gloo(*a):
        raise RuntimeError("abort is only supported by NCCL")

    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", gloo)
    distributed.cleanup(abort=True)  # a backend that cannot abort: left for the process's exit, never destroyed
    assert calls == ["abort", "destroy"]
