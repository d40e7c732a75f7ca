"""A tiny VSSL model and batch for the DDP-gradient test (importable by spawned workers)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for helpers.tiny_model


def make_model():
    from helpers import tiny_model

    from vssl_fast.method import MethodConfig

    m = tiny_model(MethodConfig(proj_output_dim=4, impl="reference"))
    m.eval()  # BN on running statistics: the loss is a per-sample mean
    return m


def make_inputs(batch):
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.rand(batch, 3, 8, 8, generator=g), torch.rand(batch, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (batch,), generator=g)
    eps = torch.randn(2 * batch, 4, generator=g)
    return x1, x2, y, eps


def grads_for(wrapper, model, x1, x2, y, eps):
    from vssl_fast.method import MethodConfig

    loss, _ = wrapper(x1, x2, y, MethodConfig(proj_output_dim=4, impl="reference"), 0, eps)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
