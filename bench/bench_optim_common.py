"""Shared driver for the optimizer benchmarks: same parameters and gradients for every provider."""

from __future__ import annotations

import torch

from bench.common import first_call_s, gpu_time_ms, kernel_time, model_param_set, peak_bandwidth_gbps
from bench.timing import KERNEL, TINY, Reps


def fresh(groups):
    """New group dicts over the same parameters (torch optimizers write 'step' etc. into them)."""
    return [{k: (list(v) if k == "params" else v) for k, v in g.items() if k != "step"} for g in groups]


def figures(bytes_per_elem: int, numel: int, ms: float, peak: float | None, gpu_ms: float | None = None,
            ref_ms: float | None = None) -> dict:
    """Bytes, GB/s, % of peak, the time over the byte roofline, the speed-up over the same run's reference."""
    gbps = bytes_per_elem * numel / (ms * 1e-3) / 1e9
    roof_ms = bytes_per_elem * numel / (peak * 1e9) * 1e3 if peak else None
    return dict(bytes=bytes_per_elem * numel, GBps=gbps, pct_peak=100 * gbps / peak if peak else None,
                x_roofline=ms / roof_ms if roof_ms else None,
                gpu_x_roofline=gpu_ms / roof_ms if (gpu_ms and roof_ms) else None,
                speedup_vs_reference=ref_ms / ms if ref_ms else None)


def param_state(tiny: bool, device):
    """(groups, restore, params, numel): the parameter set with fixed gradients, and a restore of its values."""
    _, _, _, groups = model_param_set(device, tiny)
    params = [p for g in groups for p in g["params"]]
    init = [p.detach().clone() for p in params]

    def restore():
        for p, x in zip(params, init):
            p.data.copy_(x)

    return groups, restore, params, sum(p.numel() for p in params)


def run_providers(op: str, providers: dict, tiny: bool, device, bytes_per_elem: int, check=None, reps: Reps = KERNEL):
    """providers: name -> factory(groups) returning a step() callable. Times each from the same state."""
    groups, restore, params, n = param_state(tiny, device)
    peak = peak_bandwidth_gbps()
    if check is not None:
        check(groups, restore)
    rows = []
    for name, factory in providers.items():
        restore()
        step = factory(fresh(groups))
        if step is None:
            rows.append(dict(op=op, provider=name, note="not available"))
            continue
        first = first_call_s(step)  # creates state, compiles kernels: reported apart
        t = kernel_time(step, reps, setup=restore)
        g, how = gpu_time_ms(step, setup=restore, reps=reps)
        rows.append(dict(op=op, tensors=len(params), numel=n, provider=name, **t.row(), gpu_ms=g.ms if g else None,
                         gpu_samples=g.samples if g else None, gpu_note=how, first_call_s=first))
    ref = next(r["ms"] for r in rows if r["provider"] == "reference")
    for r in rows:
        if "ms" in r:
            r.update(figures(bytes_per_elem, n, r["ms"], peak, r["gpu_ms"], ref))
    restore()
    return rows


def assert_same_step(make_a, make_b, groups, restore, rtol=1e-4, atol=1e-6, what=""):
    """One step of two implementations from the same state gives the same parameters."""
    params = [p for g in groups for p in g["params"]]
    restore()
    make_a(fresh(groups))()
    a = [p.detach().clone() for p in params]
    restore()
    make_b(fresh(groups))()
    for i, (x, p) in enumerate(zip(a, params)):
        torch.testing.assert_close(x, p.detach(), rtol=rtol, atol=atol, msg=lambda m, i=i: f"{what} tensor {i}: {m}")


def optimizer_bench_main(op: str, title: str, providers: dict, bytes_per_elem: int, doc: str, argv=None):
    """The shared command line of bench_lamb / bench_lars: check ours and foreach against the reference, time all."""
    import argparse

    from bench.common import bench_device, env_info, header, markdown_table, write_results

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=f"bench/results/{op}.jsonl")
    args = ap.parse_args(argv)
    env = env_info()

    def check(groups, restore):
        assert_same_step(providers["reference"], providers["ours"], groups, restore, what=f"{title} ours vs reference")
        assert_same_step(providers["reference"], providers["foreach"], groups, restore, what=f"{title} foreach vs reference")

    rows = run_providers(op, providers, args.tiny, bench_device(), bytes_per_elem, check, TINY if args.tiny else KERNEL)
    print(header(title, env))
    print(markdown_table(rows, ["op", "tensors", "numel", "provider", "ms", "p20", "p80", "samples", "GBps", "pct_peak",
                                "x_roofline", "speedup_vs_reference", "gpu_ms", "gpu_x_roofline", "first_call_s", "note"]))
    write_results(op, rows, args.out, env)
    return rows
