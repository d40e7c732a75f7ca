"""LAMB step over the ImageNet-100 model's student parameters, all providers in one run.

    python -m bench.bench_lamb            # on a GPU
    python -m bench.bench_lamb --tiny     # smoke run (CPU: TRITON_INTERPRET=1)

Providers: the per-parameter reference (apex math, a Python loop), a torch._foreach version,
ours (FusedLAMB), and apex.optimizers.FusedLAMB when importable. Bytes for the roofline, per
fp32 element, for the schedule LAMB's dependencies force (norms before moments, ||u|| before
the update): norms read g, p (8); moments read g, p, m, v and write m, v, u (28); update reads
u, p and writes p (12): 48 B. (apex moves 52 B: it also re-reads u for its norm.)
"""

from __future__ import annotations

import torch
from vssl_fast.kernels import FusedLAMB, LAMBReference

from bench.bench_optim_common import optimizer_bench_main

KW = dict(lr=2e-3, weight_decay=0.01, max_grad_norm=1.0)


class ForeachLAMB(LAMBReference):
    """The same math with torch._foreach ops per group (no Python loop over tensors, no host sync)."""

    @torch.no_grad()
    def step(self, closure=None, *, skip=None):
        ps_all = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        gn = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in ps_all])))
        mx = self.defaults["max_grad_norm"]
        clip = torch.where(gn > mx, gn / mx, torch.ones_like(gn))
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            group["step"] = group.get("step", 0) + 1
            b1, b2 = group["betas"]
            bc1 = 1 - b1 ** group["step"] if group["bias_correction"] else 1.0
            bc2 = 1 - b2 ** group["step"] if group["bias_correction"] else 1.0
            for p in ps:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
            m = [self.state[p]["exp_avg"] for p in ps]
            v = [self.state[p]["exp_avg_sq"] for p in ps]
            wd, lr = group["weight_decay"], group["lr"]
            pn = torch._foreach_norm(ps)
            g = torch._foreach_div([p.grad for p in ps], clip)
            if not self.adam_w_mode and wd != 0:
                torch._foreach_add_(g, ps, alpha=wd)
            torch._foreach_mul_(m, b1)
            torch._foreach_add_(m, g, alpha=1 - b1 if group["grad_averaging"] else 1.0)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, g, g, value=1 - b2)
            den = torch._foreach_sqrt(torch._foreach_div(v, bc2))
            torch._foreach_add_(den, group["eps"])
            u = torch._foreach_div(torch._foreach_div(m, bc1), den)
            if self.adam_w_mode and wd != 0:
                torch._foreach_add_(u, ps, alpha=wd)
            if self.use_nvlamb or wd != 0:
                un = torch._foreach_norm(u)
                ratios = [torch.where((b != 0) & (a != 0), lr * a / b, torch.full_like(a, lr)) for a, b in zip(pn, un)]
                torch._foreach_mul_(u, ratios)
                torch._foreach_sub_(ps, u)
            else:
                torch._foreach_add_(ps, u, alpha=-lr)


def _apex(groups):
    try:
        from apex.optimizers import FusedLAMB as ApexLAMB
    except Exception:  # noqa: BLE001 - apex is optional: not on the package index
        return None
    opt = ApexLAMB(groups, **KW)
    return opt.step


def providers():
    return {
        "reference": lambda gr: LAMBReference(gr, **KW).step,
        "foreach": lambda gr: ForeachLAMB(gr, **KW).step,
        "ours": lambda gr: FusedLAMB(gr, **KW).step,
        "apex": _apex,
    }


def main(argv=None):
    return optimizer_bench_main("lamb", "LAMB", providers(), 48, __doc__, argv)


if __name__ == "__main__":
    main()
