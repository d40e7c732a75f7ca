"""The product's step: a non-finite loss or gradient skips the step on the device (params, optimizer state,
teacher and every BatchNorm statistic untouched) and is counted; the trainer stops after several in a row."""

import sys
from pathlib import Path

import pytest
import torch
from helpers_train import run_train, tiny_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import tiny_model  # noqa: E402
from vssl_fast.kernels import FusedLARS  # noqa: E402

from vssl_fast.config import OptimConfig  # noqa: E402
from vssl_fast.method import MethodConfig  # noqa: E402
from vssl_fast.optim import tau_schedule, warmup_cosine  # noqa: E402
from vssl_fast.step import TrainStep  # noqa: E402


@pytest.mark.parametrize("poison", ["loss", "grad", "input"])
def test_nonfinite_step_is_skipped_and_counted(poison, kernel_device):
    torch.manual_seed(0)
    cfg = MethodConfig(proj_output_dim=4, impl="reference")
    model = tiny_model(cfg).to(kernel_device)
    opt = FusedLARS(model.parameter_groups(0.1, 1e-5, 0.1), lr=0.1, weight_decay=1e-5)
    calls = {"n": 0}

    def forward(x1, x2, y, mcfg, seed):
        loss, parts = model(x1, x2, y, mcfg, seed)
        calls["n"] += 1
        if calls["n"] == 2:  # poison the second step
            if poison == "input":  # NaN images: BatchNorm running statistics turn NaN in the forward
                loss, parts = model(x1 * float("nan"), x2, y, mcfg, seed)
            elif poison == "loss":
                loss = loss * float("nan")
            else:
                loss = loss + model.classifier.weight.sum() * float("inf")
        return loss, parts

    step = TrainStep(model, forward, opt, cfg, OptimConfig(), kernel_device)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.rand(6, 3, 8, 8, generator=g).to(kernel_device), torch.rand(6, 3, 8, 8, generator=g).to(kernel_device)
    y = torch.randint(0, 3, (6,), generator=g).to(kernel_device)
    step(x1, x2, y)
    snap = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm statistics and counters included
    bufs = [opt.state[p]["momentum_buffer"].clone() for g_ in opt.param_groups for p in g_["params"]]
    step.schedule(10, 100)
    assert step.applied == 1
    step(x1, x2, y)  # poisoned
    used = _schedule_used(step)
    o = OptimConfig()  # the schedule at position 1 (fp32 on the device path)
    assert used[0] == pytest.approx([warmup_cosine(1, g["base_lr"], 10, 100, o.warmup_start_lr, o.min_lr)
                                     for g in opt.param_groups], rel=1e-6)
    assert used[1] == pytest.approx(tau_schedule(1, 100, o.tau_base, o.tau_final), rel=1e-6)
    assert int(step.skipped) == 1 and int(step.consecutive) == 1
    assert step.applied == 1, "a skipped step advanced the schedule"
    assert snap.keys() == model.state_dict().keys() and any("running_var" in k for k in snap)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), f"{k} changed on a skipped step"
    assert all(torch.equal(a, opt.state[p]["momentum_buffer"])
               for a, p in zip(bufs, [p for g_ in opt.param_groups for p in g_["params"]]))
    step.schedule(10, 100)
    step(x1, x2, y)  # a good step again: the retry takes the skipped step's lr and tau
    assert _schedule_used(step) == used and step.applied == 2
    assert int(step.skipped) == 1 and int(step.consecutive) == 0
    assert not torch.equal(model.classifier.weight, snap["classifier.weight"])


def _schedule_used(step):
    """(each group's lr, tau) that the last step used, as the host sees them."""
    step.sync_host()
    return [g["lr"] for g in step.opt.param_groups], float(step.tau)


def test_trainer_stops_after_consecutive_nonfinite_steps(cifar_tiny_tar, tmp_path):
    # an absurd learning rate makes every step after the first non-finite
    args = tiny_args(cifar_tiny_tar, tmp_path / "run", tmp_path / "cache", steps=12, optim__lr="1e30",
                     optim__warmup_epochs="0", train__max_consecutive_skips="3")
    r = run_train(args)
    assert r.returncode != 0
    assert "3 consecutive steps had a non-finite loss or gradient" in r.stderr
    assert "skipped 3" in r.stdout


@pytest.mark.parametrize("seed, rank", [(0, 0), (2147, 1), (2148, 0), (10**9, 7), (-3, 0)])
def test_noise_seed_fits_int64_for_any_train_seed(seed, rank, kernel_device):
    """The per-step noise seed is (seed, rank) in the high bits, the step count in the low ones; a
    train.seed of 2148 or more used to overflow int64 on the first step. Seeds below 2147 keep the
    value every earlier run used."""
    cfg = MethodConfig(proj_output_dim=4, impl="reference")
    model = tiny_model(cfg).to(kernel_device)
    opt = FusedLARS(model.parameter_groups(0.1, 1e-5, 0.1), lr=0.1, weight_decay=1e-5)
    seen = []

    def forward(x1, x2, y, mcfg, s):
        seen.append(int(s))
        return model(x1, x2, y, mcfg, s)

    step = TrainStep(model, forward, opt, cfg, OptimConfig(), kernel_device, seed=seed, rank=rank)
    x = torch.rand(4, 3, 8, 8).to(kernel_device)
    step(x, x, torch.zeros(4, dtype=torch.long, device=kernel_device))
    step(x, x, torch.zeros(4, dtype=torch.long, device=kernel_device))
    assert 0 <= seen[0] < 2**63 and seen[1] == seen[0] + 1
    if 0 <= seed < 2147:
        assert seen[0] == (seed * 1_000_003 + rank) * 2**32 + 1
