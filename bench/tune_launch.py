"""Launch settings chosen per card by measurement: writes the entry for this card's capability.

    python -m bench.tune_launch                          # on a GPU: every family -> kernels/launch_table.json
    python -m bench.tune_launch --families lamb,lars --budget 120 --table $OUT/launch_table.json
    python -m bench.tune_launch --tiny --table /tmp/t.json   # CPU smoke (interpreter): two candidates each

For each kernel family (``kernels/launch.py``) every candidate setting is timed on the product's own
workload, as GPU time replayed from a CUDA graph of the call (``bench.common.gpu_time_ms``; on a
machine without CUDA the host-inclusive time, which only tests the plumbing):

- ``ema``, ``restore``: the ImageNet-100 model's teacher (66 tensors, 15.4M elements);
- ``lars``, ``lamb``: a step over its parameters (86 tensors, 28.1M);
- ``cosine``: the fused KL+sample and LL, forward+backward, at (B, d) = (256, 256) and (8192, 2048).

A candidate's score is the sum over its workloads of its median time relative to the default's;
the default is always measured (first) and a candidate replaces it only when it is faster beyond
the spread on every workload (its p80 below the default's p20). Each timing: 5 warm-ups, at least
20 repetitions and 0.2 s (``TUNE``); every candidate's median, p20, p80 and sample count are kept
in the table's provenance. Rows go to ``--out`` as each candidate
ends, so a cut run keeps what it measured; the table is updated after each family with the best
setting so far, every timing, and provenance (card, capability, torch/triton versions, date,
command, whether every candidate ran). Kernels read it at their next table build
(``VSSL_LAUNCH_TABLE`` points elsewhere), and ``launch.source(device)`` names the entry in use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from vssl_fast.kernels import launch

from bench.common import RowSink, bench_device, env_info, gpu_time_ms, kernel_time, model_param_set
from bench.timing import TINY, Reps, Timing
from vssl_fast import kernels as K

FAMILIES = ("lamb", "lars", "ema", "cosine", "restore")  # priority order: the largest gaps first
# per candidate and workload: graph replays of 10-500 us, so 0.2 s is hundreds to thousands of samples; the
# tuner's time goes to compiling each candidate
TUNE = Reps(warmup=5, min_reps=20, min_time_s=0.2)


def multi_tensor_candidates(tiny: bool) -> list[dict]:
    """BLOCK x num_warps with 4 to 64 elements per thread (a 128-bit access holds 4 fp32)."""
    if tiny:
        return [dict(launch.DEFAULTS["lars"]), {"BLOCK": 8192, "num_warps": 8}]
    out = [dict(launch.DEFAULTS["lars"]), dict(launch.PREVIOUS["lars"])]
    for block in (1024, 2048, 4096, 8192, 16384):
        for warps in (4, 8, 16):
            per_thread = block // (32 * warps)
            c = {"BLOCK": block, "num_warps": warps}
            if 4 <= per_thread <= 64 and c not in out:
                out.append(c)
    return out


def cosine_candidates(tiny: bool) -> list[dict]:
    if tiny:
        return [dict(launch.DEFAULTS["cosine"]), {"TILE": 8192, "num_warps": 8, "num_warps_wide": 8}]
    out = [dict(launch.DEFAULTS["cosine"]), dict(launch.PREVIOUS["cosine"])]
    for tile in (512, 1024, 2048, 4096):
        for warps, wide in ((4, 8), (8, 8), (8, 16), (4, 16)):
            c = {"TILE": tile, "num_warps": warps, "num_warps_wide": wide}
            if c not in out:
                out.append(c)
    return out


def workloads(family: str, device, tiny: bool) -> dict:
    """name -> (call, setup) for the family's workload(s)."""
    if family == "cosine":
        shapes = [(4, 8), (8, 3)] if tiny else [(256, 256), (8192, 2048)]
        out = {}
        for B, d in shapes:
            R = 2 * B
            g = torch.Generator().manual_seed(0)
            mu, var, mu_t, var_t = (torch.randn(R, d, generator=g).to(device) for _ in range(4))
            mu.requires_grad_(), var.requires_grad_()
            seed = torch.tensor([7], device=device)
            g_kl, g_z = torch.randn(R, device=device), torch.randn(R, d, device=device)

            def kl(mu=mu, var=var, mu_t=mu_t, var_t=var_t, seed=seed, g_kl=g_kl, g_z=g_z):
                k, z = K.cosine_kl_sample(mu, var, mu_t, var_t, beta=3.0, seed=seed)
                torch.autograd.backward([k, z], [g_kl, g_z])

            def ll(mu=mu, var=var, mu_t=mu_t, var_t=var_t, g_kl=g_kl):
                K.cosine_ll(mu, var, mu_t, var_t, beta=1.0).backward(g_kl)

            def zero(mu=mu, var=var):
                mu.grad = var.grad = None

            out[f"kl_sample B={B} d={d}"] = (kl, zero)
            out[f"ll B={B} d={d}"] = (ll, zero)
        return out
    _, t, s, groups = model_param_set(device, tiny)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    if family == "ema":
        tau = torch.tensor(0.996, device=device)
        return {"ema teacher": (lambda: K.ema_update_(t, s, tau), None)}
    if family == "restore":
        flag.fill_(1)
        return {"restore teacher": (lambda: K.restore_where_(t, s, flag), None)}
    params = [{k: (list(v) if k == "params" else v) for k, v in g.items()} for g in groups]
    opt = K.FusedLAMB(params, lr=1e-4, weight_decay=1e-5) if family == "lamb" else K.FusedLARS(params, lr=0.1)
    return {f"{family} step": (lambda: opt.step(skip=flag), None)}


def measure(fn, setup, reps: Reps = TUNE) -> tuple[Timing, str]:
    t, how = gpu_time_ms(fn, setup=setup, reps=reps)
    if t is None:  # no CUDA (the plumbing only), or a call that cannot be captured: the reason is kept
        t = kernel_time(fn, reps, setup=setup)
        how = f"host-inclusive ({how})"
    return t, how


def _beats(cand: dict, base: dict) -> bool:
    """A candidate replaces the default only when it is faster beyond the spread on every workload
    (its p80 below the default's p20), never on medians alone."""
    return all(cand[n]["p80"] < base[n]["p20"] for n in base)


def tune_family(family: str, device, tiny: bool, deadline: float, sink: RowSink, reps: Reps | None = None) -> dict:
    reps = reps or (TINY if tiny else TUNE)
    cands = cosine_candidates(tiny) if family == "cosine" else multi_tensor_candidates(tiny)
    loads = workloads(family, device, tiny)
    base: dict = {}
    base_how: dict = {}
    results = []
    for cand in cands:
        if time.monotonic() >= deadline:
            break
        times, hows = {}, {}
        with launch.override(**{family: cand}):
            for name, (fn, setup) in loads.items():
                t0 = time.perf_counter()
                fn()  # compiles this candidate's variants (reported apart)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first = time.perf_counter() - t0
                t, how = measure(fn, setup, reps)
                times[name] = {k: getattr(t, k) for k in ("ms", "p20", "p80", "samples", "warmup")}
                sink.emit(dict(family=family, workload=name, **cand, **t.row(), timing=how, first_call_s=first))
                hows[name] = how
        if not base:
            base, base_how = times, dict(hows)
        # a candidate timed another way than the default (not capturable) cannot be compared
        comparable = hows == base_how
        score = sum(times[n]["ms"] / base[n]["ms"] for n in times) if comparable else float("inf")
        results.append({"settings": cand, "score": score, "ms": {n: v["ms"] for n, v in times.items()}, "timings": times,
                        "timing": hows, "beats_default": comparable and results != [] and _beats(times, base)})
    if not results:
        return {}
    # the default (first) unless a candidate is faster beyond the spread; then the best such by median score
    winners = [r for r in results[1:] if r["beats_default"]]
    best = min(winners, key=lambda r: r["score"]) if winners else results[0]
    graph = all(h == "graph replay" for h in base_how.values())
    return {"best": best["settings"], "score_vs_default": best["score"] / len(loads),
            "complete": len(results) == len(cands), "graph_timed": graph,
            "samples": {"warmup": reps.warmup, "min_reps": reps.min_reps, "min_time_s": reps.min_time_s},
            "rule": "the default unless a candidate's p80 is below the default's p20 on every workload",
            "note": "" if graph or device.type != "cuda" else f"the default was not timed from a CUDA graph: {base_how}",
            "candidates": results}


def write_entry(path: Path, cap: str, family: str, res: dict, env: dict, argv: list[str]) -> None:
    """Merge one family's winner into the table (other capabilities and families untouched)."""
    table = json.loads(path.read_text()) if path.exists() else {}
    entry = table.setdefault(cap, {})
    entry[family] = res["best"]
    prov = dict(device=env.get("device"), torch=env.get("torch"), triton=env.get("triton"), date=env.get("date"),
                git=env.get("git"), command="python -m bench.tune_launch " + " ".join(argv))
    meta = entry.setdefault("_measured", {})
    meta.update(prov)  # the latest run; each family keeps the provenance of the run that measured it
    meta.setdefault("families", {})[family] = {**prov, **{k: v for k, v in res.items() if k != "best"}}
    launch.validate_table(table, str(path))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    launch._tables.pop(str(path), None)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--budget", type=float, default=240.0, help="seconds; candidates not started by then are skipped")
    ap.add_argument("--table", default=str(launch.TABLE_PATH), help="the launch table to update")
    ap.add_argument("--out", default="bench/results/tune_launch.jsonl", help="append JSON rows here ('' = don't)")
    ap.add_argument("--tiny", action="store_true", help="tiny workloads, two candidates: a smoke run for the CPU")
    ap.add_argument("--cap", default=None, help="capability key to write (default: this card's); without CUDA it "
                    "must be given, and the entry only tests the plumbing")
    args = ap.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    for f in families:
        if f not in launch.DEFAULTS:
            ap.error(f"--families: unknown family {f!r} (known: {', '.join(FAMILIES)})")
    device = bench_device()
    cap = args.cap or launch.capability_key(device)
    if cap is None:
        ap.error("no CUDA device: pass --cap sm_XY to write a (smoke-test) entry under that key")
    env = env_info()
    sink = RowSink("tune_launch", args.out, env)
    deadline = time.monotonic() + args.budget
    summary = {}
    for fam in families:
        res = tune_family(fam, device, args.tiny, deadline, sink)
        if not res:
            print(f"{fam}: skipped, budget spent")
            continue
        write_entry(Path(args.table), cap, fam, res, env, argv)
        summary[fam] = res
        print(f"{fam}: {res['best']} ({res['score_vs_default']:.3f} x the default's time; "
              f"{len(res['candidates'])} candidates{'' if res['complete'] else ', cut by the budget'})"
              + (f"; NOTE {res['note']}" if res["note"] else ""))
    return summary


if __name__ == "__main__":
    main()
