"""LARS step over the ImageNet-100 model's student parameters, all providers in one run.

    python -m bench.bench_lars            # on a GPU
    python -m bench.bench_lars --tiny     # smoke run (CPU: TRITON_INTERPRET=1)

Providers: solo-learn's per-parameter LARS (two host syncs per tensor), a torch._foreach version
without host syncs, and ours (FusedLARS). Bytes per fp32 element: norms read p, g (8); the
update reads g, p, buf and writes buf, p (20): 28 B.
"""

from __future__ import annotations

import torch
from vssl_fast.kernels import FusedLARS, LARSReference

from bench.bench_optim_common import optimizer_bench_main

KW = dict(lr=1.0, weight_decay=1e-5, momentum=0.9, eta=0.02)


class ForeachLARS(LARSReference):
    """solo-learn's LARS with torch._foreach ops and torch.where instead of host-side branches."""

    @torch.no_grad()
    def step(self, closure=None, *, skip=None):
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            g = [p.grad for p in ps]
            wd, lr, eta, eps = group["weight_decay"], group["lr"], group["eta"], group["eps"]
            pn, gn = torch._foreach_norm(ps), torch._foreach_norm(g)
            d = []
            for p, gi, a, b in zip(ps, g, pn, gn):
                if p.ndim == 1 and group["exclude_bias_n_norm"]:
                    d.append(gi)
                    continue
                r = a / (b + a * wd + eps) * eta
                if group["clip_lr"]:
                    r = torch.clamp(r / lr, max=1.0)
                r = torch.where((a != 0) & (b != 0), r, torch.ones_like(r))
                d.append(torch.where((a != 0) & (b != 0), gi + wd * p, gi) * r)
            for p in ps:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in ps]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, d)
            torch._foreach_add_(ps, bufs, alpha=-lr)


def providers():
    return {
        "reference": lambda gr: LARSReference(gr, **KW).step,
        "foreach": lambda gr: ForeachLARS(gr, **KW).step,
        "ours": lambda gr: FusedLARS(gr, **KW).step,
    }


def main(argv=None):
    return optimizer_bench_main("lars", "LARS", providers(), 28, __doc__, argv)


if __name__ == "__main__":
    main()
