"""Distributed runs on the CPU with gloo: torchrun on one node, two launchers as two nodes, DDP gradients."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers_train import CPU_RANKS, REPO, env, run_train, tiny_args, train_rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*extra):
    return [sys.executable, "-m", "torch.distributed.run", *extra]


@pytest.fixture(scope="module")
def two_proc(cifar_tiny_tar, tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    args = tiny_args(cifar_tiny_tar, d / "run", d / "cache", steps=6, eval__knn_every_epochs=1)
    r = run_train(args, launcher=_torchrun("--standalone", "--nproc_per_node=2"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return d / "run", r


def test_two_process_gloo_run(two_proc):
    run, r = two_proc
    rows = train_rows(run)
    assert sorted(rows) == list(range(1, 7))
    res = json.loads((run / "results.json").read_text())
    assert res["world_size"] == 2 and res["knn_top1"] is not None
    # every rank holds identical parameters: the saved (rank-0) teacher equals an EMA of identical students
    assert "world 2" in r.stdout


def test_two_node_launch_matches_single_node(two_proc, cifar_tiny_tar, tmp_path):
    run1, _ = two_proc
    port = _free_port()
    args = tiny_args(cifar_tiny_tar, tmp_path / "run", tmp_path / "cache", steps=6, eval__knn_every_epochs=1)
    procs = []
    for node in (0, 1):
        cmd = _torchrun("--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                        f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=vssl-test", "--max_restarts=0")
        procs.append(subprocess.Popen(cmd + [str(REPO / "train.py"), *args], cwd=REPO, env=env(**CPU_RANKS),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    a, b = train_rows(run1), train_rows(tmp_path / "run")
    assert sorted(b) == list(range(1, 7))
    for s in a:
        assert a[s]["loss"] == b[s]["loss"], f"step {s}: single node {a[s]['loss']} vs two nodes {b[s]['loss']}"


def _ddp_worker(rank, world, port, batch, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    from helpers_ddp import grads_for, make_inputs, make_model

    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x1, x2, y, eps = make_inputs(batch)
    B = batch // world
    sl = slice(rank * B, (rank + 1) * B)
    eps_rank = torch.cat([eps[:batch][sl], eps[batch:][sl]])  # this rank's rows of both views
    g = grads_for(ddp, model, x1[sl], x2[sl], y[sl], eps_rank)
    if rank == 0:
        torch.save(g, result_path)
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process_on_concatenated_batch(tmp_path):
    """With BN in eval mode (no cross-sample coupling) the VSSL loss is a per-sample mean, so DDP's
    averaged gradient over two half batches equals the single-process gradient on the whole batch."""
    sys.path.insert(0, os.path.dirname(__file__))
    from helpers_ddp import grads_for, make_inputs, make_model

    batch = 8
    out = tmp_path / "g.pt"
    mp.start_processes(_ddp_worker, args=(2, _free_port(), batch, str(out)), nprocs=2, join=True, start_method="spawn")
    torch.manual_seed(0)
    model = make_model()
    x1, x2, y, eps = make_inputs(batch)
    ref = grads_for(model, model, x1, x2, y, eps)
    got = torch.load(out, weights_only=True)
    assert ref.keys() == got.keys() and len(ref) > 20
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
