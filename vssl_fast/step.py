"""One optimisation step of the product, shared by the trainer and the step benchmark.

forward (through DDP / torch.compile when the trainer wraps it) -> backward -> device-side
non-finite check (loss and gradient norms; max-reduced across ranks) -> optimizer step with that
flag as ``skip`` -> EMA with tau = 1 on a skipped step. No host synchronization (the fp16 path's
GradScaler has its own).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from vssl_fast.optim import set_lrs, tau_schedule

__all__ = ["TrainStep"]


class TrainStep:
    def __init__(self, model, forward, opt, method_cfg, optim_cfg, device, amp_dtype=None, scaler=None,
                 distributed: bool = False, seed: int = 0, rank: int = 0, ema_impl: str = "auto"):
        self.model, self.forward, self.opt = model, forward, opt
        self.method_cfg, self.optim_cfg = method_cfg, optim_cfg
        self.device, self.amp_dtype, self.scaler, self.distributed = device, amp_dtype, scaler, distributed
        self.ema_impl = ema_impl
        self.step = 0
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.consecutive = torch.zeros((), dtype=torch.int64, device=device)
        self.tau = torch.tensor(optim_cfg.tau_base, device=device)
        self.noise_seed = torch.zeros(1, dtype=torch.int64, device=device)
        self.seed_base = (seed * 1_000_003 + rank) * (1 << 32)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def schedule(self, warmup_steps: int, total_steps: int) -> None:
        o = self.optim_cfg
        set_lrs(self.opt, self.step, warmup_steps, total_steps, o.warmup_start_lr, o.min_lr)
        self.tau.fill_(tau_schedule(self.step, total_steps, o.tau_base, o.tau_final))

    def __call__(self, x1, x2, y):
        self.noise_seed.add_(1)
        seed = self.noise_seed + self.seed_base
        with self.autocast():
            loss, parts = self.forward(x1, x2, y, self.method_cfg, seed)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        grads = [p.grad for g in self.opt.param_groups for p in g["params"] if p.grad is not None]
        bad = ~torch.isfinite(loss.detach()) | ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        bad = bad.to(torch.int32).reshape(1)
        if self.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if self.scaler:
            self.scaler.step(self.opt)  # the scaler skips on inf itself (with its own host sync)
            self.scaler.update()
        else:
            self.opt.step(skip=bad)
        badf = bad.reshape(()).bool()
        self.model.ema_update(torch.where(badf, torch.ones_like(self.tau), self.tau), impl=self.ema_impl)
        self.skipped += badf.long()
        self.consecutive.copy_((self.consecutive + badf.long()) * badf.long())
        self.step += 1
        return parts

    def state_dict(self) -> dict:
        return {"skipped": self.skipped.clone(), "consecutive": self.consecutive.clone(),
                "noise_seed": self.noise_seed.clone(), "step": self.step}

    def load_state_dict(self, st: dict) -> None:
        self.skipped.copy_(st["skipped"])
        self.consecutive.copy_(st["consecutive"])
        self.noise_seed.copy_(st["noise_seed"])
        self.step = int(st["step"])
