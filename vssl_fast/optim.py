"""Optimizer construction and schedules (METHOD.md §3.1)."""

from __future__ import annotations

import math

import torch

from vssl_fast.kernels import FusedLAMB, FusedLARS, LAMBReference, LARSReference

__all__ = ["build_optimizer", "warmup_cosine", "tau_schedule", "scaled_lrs"]


def scaled_lrs(cfg, world: int) -> tuple[float, float]:
    """lr and classifier_lr scaled by the global batch / 256 (warmup_start_lr and min_lr are not)."""
    f = cfg.train.batch_size * world / 256
    return cfg.optim.lr * f, cfg.optim.classifier_lr * f


def build_optimizer(model, cfg, world: int):
    lr, clr = scaled_lrs(cfg, world)
    groups = model.parameter_groups(lr=lr, weight_decay=cfg.optim.weight_decay, classifier_lr=clr)
    for g in groups:
        g["base_lr"] = g["lr"]
    o = cfg.optim
    if o.name == "lars":
        cls = LARSReference if o.impl == "reference" else FusedLARS
        return cls(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, eta=o.eta)
    cls = LAMBReference if o.impl == "reference" else FusedLAMB
    return cls(groups, lr=lr, weight_decay=o.weight_decay)


def warmup_cosine(step: int, base: float, warmup_steps: int, total_steps: int, start: float, min_lr: float) -> float:
    """Linear warmup from ``start`` over ``warmup_steps``, then cosine to ``min_lr`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return start + step * (base - start) / max(warmup_steps - 1, 1)
    span = max(total_steps - warmup_steps, 1)
    t = min(step - warmup_steps, span)
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / span))


def tau_schedule(step: int, total_steps: int, base: float, final: float) -> float:
    """tau_k = final - (final - base) (cos(pi k / K) + 1) / 2: tau_0 = base, tau_K = final."""
    return final - (final - base) * (math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)) + 1) / 2


def set_lrs(opt: torch.optim.Optimizer, step: int, warmup_steps: int, total_steps: int, start: float, min_lr: float):
    for g in opt.param_groups:
        g["lr"] = warmup_cosine(step, g.setdefault("base_lr", g["lr"]), warmup_steps, total_steps, start, min_lr)
