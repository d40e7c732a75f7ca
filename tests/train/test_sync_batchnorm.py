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
from vssl_fast.syncbn import CpuOps, SyncBatchNorm, convert_sync_batchnorm, use_sync_batchnorm


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
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),  # as ResNet
                              torch.nn.Linear(4 * 6 * 6, 5, bias=False), torch.nn.BatchNorm1d(5))  # a bias before BN: 0 grad
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-1.0, 1.0)
    return net


def _batch():
    g = torch.Generator().manual_seed(1)
    return 3 * torch.randn(8, 3, 8, 8, generator=g) + 1, torch.randn(8, 5, generator=g)


def _sbn_worker(rank, world, port, out, case):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from bench.bench_dispatch import OpCounter

    net = convert_sync_batchnorm(_net(), torch.device("cpu")).train()
    x, w = _batch()
    rows = slice(rank * 4, rank * 4 + 4)
    xr = x[rows].clone()
    if case == "bf16-channels-last":
        net = net.to(memory_format=torch.channels_last)
        xr = xr.to(memory_format=torch.channels_last)
    xr.requires_grad_()
    counter = OpCounter()
    with counter, torch.autocast("cpu", torch.bfloat16, enabled=case != "fp32"):
        for _ in range(2):  # two steps of running statistics
            y = net(xr)
        (y.float() * w[rows]).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)  # the loss is the sum over ranks: its gradient is the sum of the ranks' gradients
    torch.save({"y": y.detach(), "x_grad": xr.grad, "grads": grads, "state": net.state_dict(),
                "types": [type(m).__name__ for m in net], "syncs": dict(counter.syncs),
                "bn_out": [t.dtype for t in (y,)], "cl": net[1].weight.grad is not None}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("case", ["fp32", "bf16-channels-last"])
def test_sync_batchnorm_equals_batchnorm_on_the_global_batch(case, tmp_path):
    """Two gloo ranks of 4 images against one process of 8: outputs, input/weight/bias gradients and
    running statistics; fp32, and bf16 autocast with channels-last inputs; no host sync in the step
    (no item, nonzero or boolean-mask indexing: the layer CUDA ranks run too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "r"
    mp.start_processes(_sbn_worker, args=(2, port, str(out), case), nprocs=2, join=True, start_method="spawn")
    ref = _net().train()
    x, w = _batch()
    if case != "fp32":
        ref = ref.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=case != "fp32"):
        for _ in range(2):
            y = ref(x)
        (y.float() * w).sum().backward()
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert r0["types"][1] == r0["types"][4] == SyncBatchNorm.__name__
    assert r0["syncs"] == r1["syncs"] == {}, f"host syncs in the synchronised BatchNorm: {r0['syncs']}"
    # fp32: sums in another order than one process's. bf16: every conv/linear output and gradient rounds to
    # 8 bits of mantissa (0.4%), and each rank's partial weight gradient rounds before the two are added, so
    # errors are relative to the partials' scale: 2% of the tensor's largest magnitude
    assert r0["y"].dtype == y.dtype

    def close(a, b, what):
        tol = dict(rtol=1e-5, atol=1e-5) if case == "fp32" else dict(rtol=2e-2, atol=2e-2 * float(b.abs().max()))
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")

    close(torch.cat([r0["y"], r1["y"]]), y.detach(), "output")
    close(torch.cat([r0["x_grad"], r1["x_grad"]]), x.grad, "input gradient")
    for n, p in ref.named_parameters():
        close(r0["grads"][n], p.grad, n)
    sd = ref.state_dict()
    assert r0["state"].keys() == sd.keys()  # checkpoints load into plain BatchNorm networks
    for k in sd:
        close(r0["state"][k], sd[k], k)
        close(r1["state"][k], sd[k], k)


def test_cpu_twins_of_the_fused_kernels_match_their_formulas():
    """CpuOps (what the CPU ranks run in place of torch's CUDA-only kernels) against a float64
    BatchNorm written out: statistics, the combination over ranks, the running statistics, the
    normalisation and both backward parts, on an awkward channels-last shape."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 5, 3, 2, generator=g).to(memory_format=torch.channels_last) * 2 + 1 for n in (3, 4)]
    eps, mom = 1e-5, 0.1
    stats = [CpuOps.stats(x, eps) for x in xs]
    counts = torch.tensor([float(x.numel() // 5) for x in xs])
    rm, rv = torch.zeros(5), torch.ones(5)
    mean, invstd = CpuOps.gather_stats_with_counts(xs[0], torch.stack([m for m, _ in stats]),
                                                   torch.stack([i for _, i in stats]), rm, rv, mom, eps, counts)
    allx = torch.cat(xs).double()
    m64, v64 = allx.mean((0, 2, 3)), allx.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), m64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(invstd.double(), (v64 + eps).rsqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rm.double(), mom * m64, rtol=1e-6, atol=1e-6)
    n = allx.numel() // 5
    torch.testing.assert_close(rv.double(), (1 - mom) + mom * v64 * n / (n - 1), rtol=1e-5, atol=1e-6)
    wt, b = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
    y = CpuOps.elemt(xs[0], wt, b, mean, invstd, eps)
    ref = ((xs[0].double() - m64.view(1, -1, 1, 1)) * (v64 + eps).rsqrt().view(1, -1, 1, 1) * wt.double().view(1, -1, 1, 1)
           + b.double().view(1, -1, 1, 1))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # backward over both "ranks": autograd of the float64 BatchNorm on the concatenated batch
    dys = [torch.randn(x.shape, generator=g) for x in xs]
    parts = [CpuOps.backward_reduce(dy, x, mean, invstd, wt, True, True, True) for dy, x in zip(dys, xs)]
    sum_dy, sum_dy_xmu = sum(p[0] for p in parts), sum(p[1] for p in parts)
    cnt = counts.to(torch.int32)
    dx = torch.cat([CpuOps.backward_elemt(dy, x, mean, invstd, wt, sum_dy, sum_dy_xmu, cnt) for dy, x in zip(dys, xs)])
    xa = allx.clone().requires_grad_()
    wa, ba = wt.double().requires_grad_(), b.double().requires_grad_()
    torch.nn.functional.batch_norm(xa, None, None, wa, ba, training=True, eps=eps).mul(torch.cat(dys).double()).sum().backward()
    torch.testing.assert_close(dx.double(), xa.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum(p[2] for p in parts).double(), wa.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum(p[3] for p in parts).double(), ba.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_sync_batchnorm_matches_torch_and_never_syncs(tmp_path):
    """On one GPU (a 1-rank NCCL group): the synchronised path (forced: one rank would use plain
    BatchNorm) against torch.nn.SyncBatchNorm's result there (plain BatchNorm), fp32 and bf16
    channels-last, under torch.cuda.set_sync_debug_mode('error'); and the CPU twins against the
    fused CUDA kernels they stand in for."""
    from vssl_fast.syncbn import CudaOps, _SyncBatchNormFn

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        dev = torch.device("cuda", 0)
        for dtype, fmt in ((torch.float32, torch.contiguous_format), (torch.bfloat16, torch.channels_last)):
            g = torch.Generator(device=dev).manual_seed(0)
            x = (torch.randn(32, 64, 8, 8, device=dev, generator=g) * 2 + 1).to(dtype).to(memory_format=fmt)
            ref = torch.nn.SyncBatchNorm(64).to(dev).train()  # one rank: torch's layer runs plain BatchNorm
            ours = SyncBatchNorm(64).to(dev).train()
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya = ref(xa)
            torch.cuda.set_sync_debug_mode("error")
            try:
                ours.num_batches_tracked.add_(1)
                yb = _SyncBatchNormFn.apply(xb, ours.weight, ours.bias, ours.running_mean, ours.running_var, ours.eps,
                                            0.1, dist.group.WORLD, 1)
                dy = torch.randn(x.shape, device=dev, generator=g).to(dtype)
                yb.backward(dy)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            ya.backward(dy)
            tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(yb, ya, **tol)
            torch.testing.assert_close(xb.grad, xa.grad, **tol)
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **tol)
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **tol)
            torch.testing.assert_close(ours.running_mean, ref.running_mean, **tol)
            torch.testing.assert_close(ours.running_var, ref.running_var, **tol)
            m_c, i_c = CudaOps.stats(x, 1e-5)
            m_p, i_p = CpuOps.stats(x.cpu(), 1e-5)
            torch.testing.assert_close(m_c.cpu(), m_p, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(i_c.cpu(), i_p, rtol=1e-4, atol=1e-4)
    finally:
        dist.destroy_process_group()


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


def test_the_sync_counter_sees_torch_sync_batchnorms_empty_rank_mask():
    """What the zero above rests on: torch.nn.SyncBatchNorm's forward drops empty ranks with a boolean mask
    over the gathered count, mean and invstd (torch/nn/modules/_functions.py); the counter used above sees
    each of those indexings as a host sync: 3 per layer call."""
    from bench.bench_dispatch import OpCounter

    world, c = 2, 4
    gathered = torch.rand(world, 2 * c + 1)
    counter = OpCounter()
    with counter:
        mean_all, invstd_all, count_all = torch.split(gathered, [c, c, 1], dim=1)
        mask = count_all.squeeze(-1) >= 1  # torch's empty-rank mask
        count_all, mean_all, invstd_all = count_all[mask], mean_all[mask], invstd_all[mask]
    assert dict(counter.syncs) == {"index (boolean mask)": 3}
    # and that is torch's code: the installed torch.nn.SyncBatchNorm indexes these three with its mask
    import inspect

    from torch.nn.modules import _functions

    src = inspect.getsource(_functions.SyncBatchNorm.forward)
    assert all(f"{t} = {t}[mask]" in src for t in ("count_all", "mean_all", "invstd_all")), "torch's mask changed"
