"""EMA teacher update over the ImageNet-100 model's teacher (backbone + projector), all providers in one run.

    python -m bench.bench_ema            # on a GPU
    python -m bench.bench_ema --tiny     # smoke run (CPU: TRITON_INTERPRET=1)

Providers: a per-parameter lerp loop (common SSL code), torch._foreach_lerp_, one lerp over a
single flat buffer (the bandwidth floor: the teacher copied into one contiguous tensor
beforehand), and ours (one multi-tensor Triton launch). Bytes: read teacher and student, write
teacher = 12 B per fp32 element.
"""

from __future__ import annotations

import argparse

import torch
from vssl_fast.kernels import ema_update_, ema_update_loop_, ema_update_reference_

from bench.common import (
    bench_device,
    env_info,
    first_call_s,
    gpu_time_ms,
    header,
    kernel_time,
    markdown_table,
    model_param_set,
    peak_bandwidth_gbps,
    write_results,
)
from bench.timing import KERNEL, TINY, Reps


def providers(tiny: bool, device):
    """(name -> call, restore, tensors, numel): the teacher update by every provider, from the same state.
    Checks first that ours equals ``_foreach_lerp_`` within one ulp of the operands."""
    _, t, s, _ = model_param_set(device, tiny)
    n = sum(x.numel() for x in t)
    flat_t = torch.cat([x.detach().reshape(-1) for x in t])
    flat_s = torch.cat([x.detach().reshape(-1) for x in s])
    init = [x.detach().clone() for x in t]
    tau = torch.tensor(0.996, device=device)

    def restore():
        for x, y in zip(t, init):
            x.data.copy_(y)

    provs = {
        "flat_lerp": lambda: flat_t.lerp_(flat_s, 1 - 0.996),  # the bandwidth floor: the baseline, first
        "loop": lambda: ema_update_loop_(t, s, 0.996),
        "foreach_lerp": lambda: ema_update_reference_(t, s, 0.996),
        "ours": lambda: ema_update_(t, s, tau, impl="triton"),
    }
    restore()
    ema_update_(t, s, tau, impl="triton")
    got = [x.detach().clone() for x in t]
    restore()
    ema_update_reference_(t, s, tau)
    for a, b, x0, y in zip(got, t, init, s):
        scale = torch.maximum(x0.abs(), y.detach().abs())
        ulp = torch.nextafter(scale, torch.full_like(scale, float("inf"))) - scale
        assert bool(((a - b).abs() <= ulp).all()), "EMA kernel disagrees with _foreach_lerp_"
    return provs, restore, len(t), n


def figures(numel: int, ms: float, peak: float | None, flat: dict | None = None, gpu_ms: float | None = None) -> dict:
    """12 B per fp32 element (read teacher and student, write teacher); ratios to the flat lerp of the same run."""
    gbps = 12 * numel / (ms * 1e-3) / 1e9
    out = dict(bytes=12 * numel, GBps=gbps, pct_peak=100 * gbps / peak if peak else None)
    if flat:
        out["vs_flat"] = ms / flat["ms"]
        out["gpu_vs_flat"] = gpu_ms / flat["gpu_ms"] if (gpu_ms and flat.get("gpu_ms")) else None
    return out


def run(tiny: bool, device, reps: Reps = KERNEL):
    provs, restore, tensors, n = providers(tiny, device)
    peak = peak_bandwidth_gbps()
    rows = []
    for name, fn in provs.items():
        restore()
        first = first_call_s(fn)  # warm-up / compile, reported apart
        t = kernel_time(fn, reps, setup=restore)
        g, how = gpu_time_ms(fn, setup=restore, reps=reps)
        rows.append(dict(op="ema", tensors=tensors, numel=n, provider=name, **t.row(), gpu_ms=g.ms if g else None,
                         gpu_samples=g.samples if g else None, gpu_note=how, first_call_s=first))
    flat = next(r for r in rows if r["provider"] == "flat_lerp")
    for r in rows:
        r.update(figures(n, r["ms"], peak, flat, r["gpu_ms"]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="bench/results/ema.jsonl")
    args = ap.parse_args(argv)
    env = env_info()
    rows = run(args.tiny, bench_device(), TINY if args.tiny else KERNEL)
    print(header("EMA", env))
    print(markdown_table(rows, ["op", "tensors", "numel", "provider", "ms", "p20", "p80", "samples", "GBps", "pct_peak",
                                "vs_flat", "gpu_ms", "gpu_vs_flat", "first_call_s"]))
    write_results("ema", rows, args.out, env)
    return rows


if __name__ == "__main__":
    main()
