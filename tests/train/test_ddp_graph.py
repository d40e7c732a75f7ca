"""The DDP step under torchrun (issue 25), on the CPU with gloo: the graph-ready 'static' step (what a
CUDA graph captures under DDP on GPUs) equals the eager DDP step bit for bit, a skip and a crash with
resume included; DDP's buffer broadcast, redundant under SyncBatchNorm, is off and changes nothing;
the graph-mode conditions of torch's CUDA-graph recipe are checked and named."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from helpers_train import CPU_RANKS, REPO, env, tiny_args

from vssl_fast import trainer
from vssl_fast.distributed import DistInfo

WORKER = REPO / "tests" / "train" / "ddp_trainer_worker.py"


# what a GPU rank runs, as far as a CPU can: the fused losses, FusedLARS (its LRs and tau read on the device
# from the schedule tables), channels-last, bf16 autocast (or fp32); the kernels under the Triton interpreter
GPU_LIKE = ["--model.channels_last=true", "--method.impl=fused", "--optim.impl=fused", "--train.compile=none",
            "--data.crop_size=16"]


def _run(tmp_path, name, graph, bad="3", crash=0, resume=False, force_broadcast=False, tar=None, gpu_like=""):
    """``gpu_like``: '' (the CPU's reference path) or the precision of the GPU-like configuration."""
    args = tiny_args(tar, tmp_path / name, tmp_path / "cache", steps=6, train__batch_size=4, data__train_subset=24,
                     data__val_subset=8, eval__knn_train_subset=8, eval__knn_k=4, eval__knn_t=0.1,
                     ckpt__every_steps=1000, log__every_steps=1000, train__graph=graph, log__plots="false")
    args += [*GPU_LIKE, f"--train.precision={gpu_like}"] if gpu_like else []
    if resume:
        args.append("--resume=auto")
    out = tmp_path / f"{name}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(out),
           bad, str(crash)] + (["--force-broadcast"] if force_broadcast else []) + (
           ["--tiny-backbone"] if gpu_like else []) + ["--"] + args
    extra = {"TRITON_INTERPRET": "1"} if gpu_like else {}
    r = subprocess.run(cmd, cwd=REPO, env=env(PYTHONPATH=str(REPO), **CPU_RANKS, **extra), capture_output=True,
                       text=True, timeout=900)
    return r, (torch.load(out, weights_only=True) if out.exists() else None)


def _same(a, b, what):
    diff = [k for k in a["state"] if not torch.equal(a["state"][k], b["state"][k])]
    assert not diff, f"{what}: {diff[:4]}"
    assert all(torch.equal(x, y) for x, y in zip(a["info"]["opt"], b["info"]["opt"])), f"{what}: optimizer state"


def test_static_ddp_step_equals_the_eager_one_with_a_skip_and_a_resume(cifar_tiny_tar, tmp_path):
    # 24 images, 2 ranks x 4: 3 steps per epoch; step 3 (an epoch's last, before its checkpoint) is skipped
    r, eager = _run(tmp_path, "eager", "off", tar=cifar_tiny_tar)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert eager["info"]["graph"] == "off" and eager["info"]["skipped"] == 1
    assert eager["info"]["broadcast_buffers"] is False and eager["info"]["buffers_equal"]
    r, static = _run(tmp_path, "static", "on", tar=cifar_tiny_tar)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert static["info"]["graph"] == "static" and "DDP over 2 processes" in r.stdout
    _same(eager, static, "graph-ready DDP step vs eager")
    r, _ = _run(tmp_path, "resumed", "on", crash=5, tar=cifar_tiny_tar)
    assert r.returncode != 0
    r, resumed = _run(tmp_path, "resumed", "on", resume=True, tar=cifar_tiny_tar)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    _same(static, resumed, "crashed at step 5 and resumed from the epoch-end checkpoint at step 3")
    r, broadcast = _run(tmp_path, "broadcast", "off", force_broadcast=True, tar=cifar_tiny_tar)
    assert r.returncode == 0 and broadcast["info"]["broadcast_buffers"] is True
    _same(eager, broadcast, "DDP's buffer broadcast on (its default) vs off")


def test_fused_static_ddp_step_equals_the_eager_one_with_a_skip_and_a_resume(cifar_tiny_tar, tmp_path):
    """The same under the GPU configuration: FusedLARS reads its LRs and tau from the device tables at the
    device's applied-step count (no host read per step), so a skip and a resume are exact without a sync.
    fp32: graph-ready equals eager bit for bit. bf16 autocast: graph modes turn autocast's weight-cast cache
    off (torch's CUDA-graph rule), which changes the rounding against the eager step (~1e-4 here after one
    step), so under bf16 the graph-ready run is compared with itself resumed, bit for bit."""
    runs = {}
    for name, graph, crash, resume, prec in (("eager", "off", 0, False, "fp32"), ("static", "on", 0, False, "fp32"),
                                             ("bf16", "on", 0, False, "bf16"), ("resumed", "on", 5, False, "bf16"),
                                             ("resumed", "on", 0, True, "bf16")):
        r, runs[name] = _run(tmp_path, name, graph, crash=crash, resume=resume, tar=cifar_tiny_tar, gpu_like=prec)
        assert (r.returncode != 0) == bool(crash), r.stdout[-3000:] + r.stderr[-3000:]
    eager, static, bf16, resumed = runs["eager"], runs["static"], runs["bf16"], runs["resumed"]
    assert eager["info"]["optimizer"] == "FusedLARS" and eager["info"]["device_schedule"] is True
    assert (eager["info"]["graph"], static["info"]["graph"], static["info"]["skipped"]) == ("off", "static", 1)
    _same(eager, static, "fused graph-ready DDP step vs eager (fp32)")
    assert bf16["info"]["skipped"] == 1 and bf16["info"]["precision"] == "bf16"
    _same(bf16, resumed, "fused bf16: crashed at step 5 and resumed from the epoch-end checkpoint at step 3")


@pytest.mark.parametrize("nccl, handling, want", [((2, 21, 5), "0", "on"), ((2, 9, 5), "0", "off"),
                                                  ((2, 21, 5), "3", "off"), ((2, 21, 5), None, "off")])
def test_graph_under_ddp_checks_torchs_conditions(nccl, handling, want, monkeypatch):
    from vssl_fast.kernels import FusedLARS

    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: nccl)
    info = DistInfo(rank=0, world=8, device=torch.device("cuda", 0), async_error_handling=handling)
    opt = FusedLARS([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    mode, why = trainer.resolve_graph_mode("on", torch.device("cuda", 0), info, None, opt)
    assert mode == want, why
    if want == "on":
        assert "NCCL 2.21.5" in why and "TORCH_NCCL_ASYNC_ERROR_HANDLING=0" in why and "11 DDP warm-up" in why
    elif nccl < (2, 9, 6):
        assert "older than 2.9.6" in why
    else:
        assert f"TORCH_NCCL_ASYNC_ERROR_HANDLING={handling}" in why


@pytest.mark.parametrize("preset", [None, "3"])
def test_capture_under_ddp_turns_nccl_async_error_handling_off_unless_set(preset, monkeypatch):
    """init_distributed(capture=True) on CUDA ranks sets TORCH_NCCL_ASYNC_ERROR_HANDLING=0 before the
    process group is made, and keeps (and reports) a value the user set."""
    import vssl_fast.distributed as d

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    if preset is None:
        monkeypatch.delenv(d.ASYNC_ERRORS, raising=False)
    else:
        monkeypatch.setenv(d.ASYNC_ERRORS, preset)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(d.dist, "init_process_group", lambda **kw: seen.update(kw, env=os.environ.get(d.ASYNC_ERRORS)))
    monkeypatch.setattr(d.dist, "new_group", lambda **kw: "vote")
    info = d.init_distributed(60, capture=True)
    assert seen["backend"] == "nccl" and seen["env"] == (preset or "0")
    assert info.async_error_handling == (preset or "0")


@pytest.mark.gpu
def test_captured_ddp_step_on_one_nccl_rank_matches_the_eager_one():
    """What one GPU can show of a captured DDP step: DDP built on the capture stream, 11 DDP warm-up
    steps, NCCL collectives (DDP's gradient all-reduce, the skip flag's) inside the graph, replays
    against the eager DDP step, a skip included."""
    import copy
    import socket

    import torch.distributed as dist
    from helpers import tiny_model
    from vssl_fast.kernels import FusedLARS

    from vssl_fast.config import OptimConfig
    from vssl_fast.method import MethodConfig
    from vssl_fast.step import CudaGraphs, TrainStep

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCH_NCCL_ASYNC_ERROR_HANDLING="0")
    dev = torch.device("cuda", 0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=dev)
    try:
        torch.manual_seed(0)
        cfg = MethodConfig(proj_output_dim=4)
        base = tiny_model(cfg).to(dev).to(memory_format=torch.channels_last)

        def stepper(graph):
            model = copy.deepcopy(base)
            opt = FusedLARS(model.parameter_groups(0.3, 1e-5, 0.1), lr=0.3, weight_decay=1e-5)
            graphs = CudaGraphs(dev) if graph == "on" else None
            with graphs.on_side_stream() if graphs else contextlib.nullcontext():
                ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0], **trainer.ddp_buffer_sync(False))
            return TrainStep(model, ddp, opt, cfg, OptimConfig(), dev, distributed=True, graph=graph, graphs=graphs,
                             warmup=trainer.DDP_GRAPH_WARMUP)

        g = torch.Generator().manual_seed(3)
        batches = []
        for k in range(16):
            x1, x2 = torch.rand(6, 3, 8, 8, generator=g), torch.rand(6, 3, 8, 8, generator=g)
            if k == 13:
                x1 = x1 * float("nan")
            batches.append([t.to(dev).contiguous(memory_format=torch.channels_last) for t in (x1, x2)]
                           + [torch.randint(0, 3, (6,), generator=g).to(dev)])
        eager, graph = stepper("off"), stepper("on")
        for st in (eager, graph):
            st.schedule(4, 40)
        for b in batches:
            pe, pg = eager(*b), graph(*b)
            for k in pe:
                torch.testing.assert_close(pg[k], pe[k], rtol=1e-5, atol=1e-6, equal_nan=True)
        assert graph._captured is not None and int(graph.skipped) == int(eager.skipped) == 1
        for a, b in zip(eager.model.state_dict().values(), graph.model.state_dict().values()):
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5, equal_nan=True)
    finally:
        dist.destroy_process_group()
