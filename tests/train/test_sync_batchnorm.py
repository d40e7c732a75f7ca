"""SyncBatchNorm in multi-process runs (model.sync_batchnorm=auto): the gloo layer against BatchNorm on the
global batch, and a two-process torchrun run that trains, is killed, and resumes bit-exactly."""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers_train import run_train, tiny_args, train_rows

from vssl_fast import checkpoint as ckpt
from vssl_fast.config import ConfigError, config_from_dict, load_config
from vssl_fast.syncbn import GlooSyncBatchNorm, convert_sync_batchnorm, use_sync_batchnorm


def test_sync_batchnorm_setting():
    assert load_config([]).model.sync_batchnorm == "auto"
    table = {("auto", 1): False, ("auto", 2): True, ("true", 1): False, ("true", 8): True, ("false", 8): False,
             (True, 2): True, (False, 2): False}
    for (setting, world), want in table.items():
        assert use_sync_batchnorm(setting, world) is want, (setting, world)
    assert load_config(["--model.sync_batchnorm=TRUE"]).model.sync_batchnorm == "true"
    old = config_from_dict({"model": {"sync_batchnorm": False}}).validate()  # a config saved before 'auto'
    assert old.model.sync_batchnorm == "false"
    with pytest.raises(ConfigError, match="model.sync_batchnorm"):
        load_config(["--model.sync_batchnorm=maybe"])


def _net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 5), torch.nn.BatchNorm1d(5))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-1.0, 1.0)
    return net


def _batch():
    g = torch.Generator().manual_seed(1)
    return 3 * torch.randn(8, 3, 8, 8, generator=g) + 1, torch.randn(8, 5, generator=g)


def _sbn_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net = convert_sync_batchnorm(_net(), torch.device("cpu")).train()
    x, w = _batch()
    rows = slice(rank * 4, rank * 4 + 4)
    xr = x[rows].clone().requires_grad_()
    for _ in range(2):  # two steps of running statistics
        y = net(xr)
    (y * w[rows]).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)  # the loss is the sum over ranks: its gradient is the sum of the ranks' gradients
    torch.save({"y": y.detach(), "x_grad": xr.grad, "grads": grads, "state": net.state_dict(),
                "types": [type(m).__name__ for m in net]}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_gloo_sync_batchnorm_equals_batchnorm_on_the_global_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "r"
    mp.start_processes(_sbn_worker, args=(2, port, str(out)), nprocs=2, join=True, start_method="spawn")
    ref = _net().train()
    x, w = _batch()
    x.requires_grad_()
    for _ in range(2):
        y = ref(x)
    (y * w).sum().backward()
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert r0["types"][1] == r0["types"][4] == GlooSyncBatchNorm.__name__
    tol = dict(rtol=1e-5, atol=1e-5)  # fp32 sums in another order than one process's
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y.detach(), **tol)
    torch.testing.assert_close(torch.cat([r0["x_grad"], r1["x_grad"]]), x.grad, **tol)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(r0["grads"][n], p.grad, **tol, msg=lambda m, n=n: f"{n}: {m}")
    sd = ref.state_dict()
    assert r0["state"].keys() == sd.keys()  # checkpoints load into plain BatchNorm networks
    for k in sd:
        torch.testing.assert_close(r0["state"][k], sd[k], **tol, msg=lambda m, k=k: f"{k}: {m}")
        torch.testing.assert_close(r1["state"][k], sd[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def test_two_process_run_with_sync_batchnorm_trains_and_resumes_bit_exactly(cifar_tiny_tar, tmp_path):
    """torchrun, 2 gloo processes, the default model.sync_batchnorm=auto: killed after step 4 (last checkpoint
    at step 2), resumed; step 3 of the resumed run equals step 3 of the first one."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = tiny_args(cifar_tiny_tar, tmp_path / "run", tmp_path / "cache", steps=4, ckpt__every_steps=2,
                     train__batch_size=4, data__val_subset=40, eval__knn_train_subset=40)  # small: 2 CPU cores
    r = run_train(args, launcher=launcher, VSSL_FAULT_AT_STEP=4)
    assert r.returncode != 0 and "BatchNorm: SyncBatchNorm over all ranks" in r.stdout, r.stdout[-3000:]
    last = ckpt.find_latest(tmp_path / "run" / "checkpoints")
    assert last.name == "step_00000002.pt"
    first = train_rows(tmp_path / "run")
    assert sorted(first) == [1, 2, 3]
    from vssl_fast.evaluate import _load_backbone

    _load_backbone(last, [])  # strict load of the converted model's backbone into a plain ResNet
    r = run_train(args + ["--resume=auto"], launcher=launcher)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and "SyncBatchNorm over all ranks" in r.stdout
    second = train_rows(tmp_path / "run")
    assert sorted(second) == [1, 2, 3, 4]
    assert second[3]["loss"] == first[3]["loss"], f"step 3: {first[3]['loss']} then {second[3]['loss']} after resume"
