"""Fused cosine KL+sample and cosine LL, forward+backward, against eager and compiled references.

    python -m bench.bench_cosine_loss                      # the issue's grid on a GPU
    python -m bench.bench_cosine_loss --tiny               # a seconds-long smoke run (CPU: TRITON_INTERPRET=1)

Rows = 2B (both ordered view pairs in one launch). Bytes counted per fwd+bwd, in elements of R x d
at the input width: KL+sample reads mu, var, mu_t, var_t and writes z (5), backward reads the four
inputs and grad_z and writes two gradients (7): 12 R d. LL: 4 forward, 4 + 2 backward: 10 R d.
The per-row scalars are negligible. GB/s = bytes / median time; '%peak' against the datasheet.
Each case: 5 warm-ups, then at least 20 timed repetitions and 0.5 s (``bench.timing.KERNEL``);
``--tiny``: 1 + 3. ``python -m pytest bench/test_losses.py --benchmark-only`` times the same cases.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import (
    RowSink,
    bench_device,
    env_info,
    first_call_s,
    gpu_time_ms,
    header,
    kernel_time,
    markdown_table,
    peak_bandwidth_gbps,
)
from bench.timing import KERNEL, TINY, Reps
from vssl_fast import kernels as K


def make_case(R: int, d: int, device, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)
    t = [torch.randn(R, d, generator=g, dtype=torch.float32).to(device=device, dtype=dtype) for _ in range(4)]
    mu, var = (x.requires_grad_() for x in t[:2])
    seed = torch.tensor([7], device=device)
    eps = K.sample_noise(7, (R, d), device)
    g_kl = torch.randn(R, device=device)
    g_z = torch.randn(R, d, device=device, dtype=dtype)
    return mu, var, t[2], t[3], seed, eps, g_kl, g_z


def providers(R, d, device):
    mu, var, mu_t, var_t, seed, eps, g_kl, g_z = make_case(R, d, device)

    def kl_fused():
        kl, z = K.cosine_kl_sample(mu, var, mu_t, var_t, beta=3.0, seed=seed)
        torch.autograd.backward([kl, z], [g_kl, g_z])

    def kl_ref_fn(mu, var):
        return K.cosine_kl_sample_reference(mu, var, mu_t, var_t, eps, beta=3.0)

    kl_compiled_fn = torch.compile(kl_ref_fn)

    def kl_eager():
        kl, z = kl_ref_fn(mu, var)
        torch.autograd.backward([kl, z], [g_kl, g_z])

    def kl_compiled():
        kl, z = kl_compiled_fn(mu, var)
        torch.autograd.backward([kl, z], [g_kl, g_z])

    def ll_fused():
        K.cosine_ll(mu, var, mu_t, var_t, beta=1.0).backward(g_kl)

    def ll_ref_fn(m, r):
        return K.cosine_ll_reference(m, r, mu_t, var_t, beta=1.0)

    ll_compiled_fn = torch.compile(ll_ref_fn)

    def ll_eager():
        ll_ref_fn(mu, var).backward(g_kl)

    def ll_compiled():
        ll_compiled_fn(mu, var).backward(g_kl)

    def zero():
        mu.grad = None
        var.grad = None

    return {
        "kl_sample": ({"eager": kl_eager, "compiled": kl_compiled, "fused": kl_fused}, 12),
        "ll": ({"eager": ll_eager, "compiled": ll_compiled, "fused": ll_fused}, 10),
    }, zero, mu.element_size()


def figures(n_elems: int, R: int, d: int, elt: int, ms: float, gpu_ms: float | None, peak: float | None) -> dict:
    """Bytes moved per fwd+bwd, GB/s and % of the datasheet peak, host-inclusive and GPU-only."""
    nbytes = n_elems * R * d * elt
    gbps = nbytes / (ms * 1e-3) / 1e9
    gpu_gbps = nbytes / (gpu_ms * 1e-3) / 1e9 if gpu_ms else None
    return dict(bytes=nbytes, GBps=gbps, pct_peak=(100 * gbps / peak) if peak else None,
                gpu_pct_peak=(100 * gpu_gbps / peak) if (peak and gpu_gbps) else None)


def ratios(case: list[dict]) -> None:
    """Each provider's speed-up over the same run's eager and compiled references (in place)."""
    base = {r["provider"]: r["ms"] for r in case}
    gbase = {r["provider"]: r.get("gpu_ms") for r in case}
    for r in case:
        if "eager" in base:
            r["speedup_vs_eager"] = base["eager"] / r["ms"]
        if "compiled" in base:
            r["speedup_vs_compiled"] = base["compiled"] / r["ms"]
        if r.get("gpu_ms") and gbase.get("compiled"):
            r["gpu_speedup_vs_compiled"] = gbase["compiled"] / r["gpu_ms"]


def run(shapes, device, check=True, sink=None, reps: Reps = KERNEL):
    """Time every provider per (B, d, op); ``sink`` gets each case's rows as soon as it ends."""
    peak = peak_bandwidth_gbps()
    rows = []
    for B, d in shapes:
        R = 2 * B
        ops, zero, elt = providers(R, d, device)
        for op, (fns, n_elems) in ops.items():
            case = []
            for prov, fn in fns.items():
                zero()
                first = first_call_s(fn)  # compilation, reported apart
                zero()
                t = kernel_time(fn, reps, setup=zero)
                g, how = gpu_time_ms(fn, setup=zero, reps=reps)
                case.append(dict(op=op, B=B, d=d, rows=R, provider=prov, **t.row(), gpu_ms=g.ms if g else None,
                                 gpu_samples=g.samples if g else None, gpu_note=how, first_call_s=first,
                                 **figures(n_elems, R, d, elt, t.ms, g.ms if g else None, peak)))
            ratios(case)
            rows += case
            if sink is not None:
                sink.emit(*case)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run that works on the CPU")
    ap.add_argument("--out", default="bench/results/cosine_loss.jsonl", help="append JSON rows here ('' = don't)")
    args = ap.parse_args(argv)
    device = bench_device()
    shapes = [(4, 8), (8, 3)] if args.tiny else [(B, d) for B in (256, 1024, 8192) for d in (256, 2048)]
    env = env_info()
    rows = run(shapes, device, sink=RowSink("cosine_loss", args.out, env), reps=TINY if args.tiny else KERNEL)
    print(header("cosine loss fwd+bwd", env))
    print(markdown_table(rows, ["op", "B", "d", "provider", "ms", "p20", "p80", "samples", "GBps", "pct_peak",
                                "speedup_vs_eager", "speedup_vs_compiled", "gpu_ms", "gpu_pct_peak",
                                "gpu_speedup_vs_compiled", "first_call_s"]))
    return rows


if __name__ == "__main__":
    main()
