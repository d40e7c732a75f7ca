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
    markdown_table,
    model_param_set,
    peak_bandwidth_gbps,
    time_ms,
    write_results,
)


def run(tiny: bool, device):
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
        "loop": lambda: ema_update_loop_(t, s, 0.996),
        "foreach_lerp": lambda: ema_update_reference_(t, s, 0.996),
        "flat_lerp": lambda: flat_t.lerp_(flat_s, 1 - 0.996),
        "ours": lambda: ema_update_(t, s, tau, impl="triton"),
    }
    # correctness first: ours equals foreach within one ulp of the operands on this parameter set
    restore()
    ema_update_(t, s, tau, impl="triton")
    got = [x.detach().clone() for x in t]
    restore()
    ema_update_reference_(t, s, tau)
    for a, b, x0, y in zip(got, t, init, s):
        scale = torch.maximum(x0.abs(), y.detach().abs())
        ulp = torch.nextafter(scale, torch.full_like(scale, float("inf"))) - scale
        assert bool(((a - b).abs() <= ulp).all()), "EMA kernel disagrees with _foreach_lerp_"
    peak = peak_bandwidth_gbps()
    rows = []
    for name, fn in provs.items():
        restore()
        first = first_call_s(fn)  # warm-up / compile, reported apart
        ms, lo, hi = time_ms(fn, setup=restore)
        gpu_ms, how = gpu_time_ms(fn, setup=restore)
        gbps = 12 * n / (ms * 1e-3) / 1e9
        rows.append(dict(op="ema", tensors=len(t), numel=n, provider=name, bytes=12 * n, ms=ms, p20=lo, p80=hi, GBps=gbps,
                         pct_peak=100 * gbps / peak if peak else None, gpu_ms=gpu_ms, gpu_note=how, first_call_s=first))
    flat = next(r["ms"] for r in rows if r["provider"] == "flat_lerp")
    gflat = next(r["gpu_ms"] for r in rows if r["provider"] == "flat_lerp")
    for r in rows:
        r["vs_flat"] = r["ms"] / flat
        r["gpu_vs_flat"] = r["gpu_ms"] / gflat if (r["gpu_ms"] and gflat) else None
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="bench/results/ema.jsonl")
    args = ap.parse_args(argv)
    env = env_info()
    rows = run(args.tiny, bench_device())
    print(header("EMA", env))
    print(markdown_table(rows, ["op", "tensors", "numel", "provider", "ms", "p20", "p80", "GBps", "pct_peak", "vs_flat",
                                "gpu_ms", "gpu_vs_flat", "first_call_s"]))
    write_results("ema", rows, args.out, env)
    return rows


if __name__ == "__main__":
    main()
