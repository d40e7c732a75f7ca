"""Training-step throughput: the plain reference step, the product's fast step, the backbone floor.

    python -m bench.bench_step                 # the issue-7 grid on a GPU: 32 px (B 256, 512), 224 px (B 128, 256)
    python -m bench.bench_step --tiny          # smoke run on the CPU

Variants, in the same process on the same card, after warm-up (and compilation):
  (a) reference: typical SSL code: eager, fp16 autocast with a GradScaler, contiguous memory,
      the reference losses, per-parameter LARS (solo-learn's, host syncs) and a per-parameter EMA loop;
  (b) fast: what the trainer runs by default: bf16 autocast, channels-last, fused Triton losses,
      FusedLARS, multi-tensor EMA, the non-finite skip flag, torch.compile per train.compile=auto
      (``--compile-modes auto,none,default,reduce-overhead`` times each mode, to decide by measurement),
      eager and as one CUDA graph per step (``--graph-modes off,on``: train.graph by measurement);
  (c) floor: the backbone alone: student forward+backward on both views, teacher forward, bf16
      channels-last, eager.
Views/s = 2 B / median step time; on a card, for ``--profile-cases``, each fast step also gets a
``launches`` row, profiled after every case is timed (one step under torch.profiler:
``host_launches``, the kernel launches, async copies/sets and graph launches the host issued;
``gpu_kernels``, the kernels the device ran). Each variant: its first call (compilation, reported apart), 5
warm-up steps, then at least 30 timed steps and 2 s (``bench.timing.STEP``), CUDA events around
each step. When a setting is timed in more than one mode (``--graph-modes off,on``, several
``--compile-modes``) a ``decision(...)`` row names the choice the timings support, with the samples
and spread it rests on ('undecided' when the spreads overlap): what ``train.graph=auto`` and
``train.compile=auto`` are to follow (``vssl_fast/auto_settings.py``). The JSON rows carry card,
versions, date and git revision.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools

import torch
from vssl_fast.kernels import LARSReference, ema_update_loop_
from vssl_fast.kernels._common import interpret_mode

from bench.common import RowSink, bench_device, env_info, first_call_s, header, markdown_table
from bench.timing import STEP, TINY, Reps, Timing, kernel_clock, time_ms, warm
from vssl_fast.config import device_formats, load_config
from vssl_fast.models import SSLModel
from vssl_fast.optim import build_optimizer
from vssl_fast.step import TrainStep
from vssl_fast.trainer import resolve_compile_mode


def _model(cfg, num_classes, device, channels_last, tiny=False):
    torch.manual_seed(0)
    kw = {}
    if tiny:  # a small conv net with BatchNorm: the fast step's kernels run under the CPU interpreter in seconds
        bb = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                 torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                                 torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        kw = dict(backbone_module=bb, feature_dim=8)
    m = SSLModel(**cfg.method.model_kwargs(), backbone=cfg.model.backbone, cifar_stem=cfg.model.cifar_stem,
                 num_classes=num_classes, **kw).to(device)
    return m.to(memory_format=torch.channels_last) if channels_last else m


class ReferenceStep:
    """(a): what common SSL code does, for comparison (not used by the trainer)."""

    def __init__(self, model, cfg, device):
        self.model, self.cfg = model, cfg
        groups = model.parameter_groups(cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.classifier_lr)
        self.opt = LARSReference(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, eta=cfg.optim.eta)
        self.cuda = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.cuda else None
        self.mcfg = cfg.method.replace(impl="reference")

    def __call__(self, x1, x2, y):
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.cuda):
            loss, _ = self.model(x1, x2, y, self.mcfg)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        t, s = self.model.ema_param_lists()
        ema_update_loop_(t, s, 0.996)


class FloorStep:
    """(c): student backbone forward+backward on both views plus the teacher backbone forward."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def __call__(self, x1, x2, y):
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            out = sum(self.model.backbone(x).float().sum() for x in (x1, x2))
            with torch.no_grad():
                for x in (x1, x2):
                    self.model.teacher["backbone"](x)
        out.backward()
        for p in self.model.backbone.parameters():
            p.grad = None


def variants(px: int, batch: int, device, tiny: bool, compile_modes=("auto",), graph_modes=("off",)):
    """(name, build) per variant, in order: (a), (c), then (b) per compile and graph mode; ``build()``
    makes the variant on demand and returns (step, inputs, model, extra row fields).

    The fast step runs the GPU configuration (``device_formats`` with ``model.channels_last=true``
    and bf16): on the CPU that is its twin, channels-last weights and inputs under CPU autocast.
    """
    preset = "cifar10" if px <= 64 else "imagenet100"
    cfg = load_config(["--preset", preset, f"--data.crop_size={px}", f"--train.batch_size={batch}",
                       "--model.channels_last=true", "--train.precision=bf16"])
    if tiny:
        for k in ("proj_hidden_dim", "pred_hidden_dim", "denoiser_hidden_dim"):
            setattr(cfg.method, k, 64)
        cfg.method.proj_output_dim = 32
    cuda = device.type == "cuda"
    if not cuda and interpret_mode():  # the CPU twin runs the fused losses too (auto picks them on CUDA only)
        cfg.method = cfg.method.replace(impl="fused")
    amp, img_dtype, cl = device_formats(cfg, device)
    g = torch.Generator(device="cpu").manual_seed(0)
    x1 = torch.randn(batch, 3, px, px, generator=g).to(device)
    x2 = torch.randn(batch, 3, px, px, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    fmt = (lambda t: t.to(img_dtype).contiguous(memory_format=torch.channels_last)) if cl else (lambda t: t.to(img_dtype))
    xb = (fmt(x1), fmt(x2), y)

    def reference():  # (a): contiguous fp32 weights, fp16 autocast, reference losses, per-parameter LARS + EMA loop
        m = _model(cfg, 10, device, channels_last=False, tiny=tiny)
        return ReferenceStep(m, cfg, device), (x1, x2, y), m, {}

    def floor():  # (c): the backbone alone
        m = _model(cfg, 10, device, channels_last=cl, tiny=tiny)
        return FloorStep(m, device), xb, m, {}

    def fast(mode, gmode):  # (b): the product's step
        m = _model(cfg, 10, device, channels_last=cl, tiny=tiny)
        forward = torch.compile(m, mode=mode) if mode != "none" else m
        opt = build_optimizer(m, cfg, 1)
        step = TrainStep(m, forward, opt, cfg.method, cfg.optim, device, amp, graph=gmode)
        step.schedule(10, 1000)
        return step, xb, m, dict(channels_last=cl, optimizer=type(opt).__name__)

    yield "a_reference", reference
    yield "c_backbone_floor", floor
    seen = set()
    for requested in compile_modes:  # 'auto' = what the trainer picks
        mode = resolve_compile_mode(requested, device, px)
        if mode in seen:  # e.g. auto,none at 224 px, where auto is none: timed once
            continue
        seen.add(mode)
        for graph in graph_modes:  # 'on': one CUDA graph per step ('static', its uncaptured twin, on a CPU)
            gmode = graph if (graph == "off" or cuda) else "static"
            name = f"b_fast(compile={mode}{'=auto' if requested == 'auto' else ''},graph={gmode})"
            yield name, functools.partial(fast, mode, gmode)


def time_step(step, xs, model, reps: Reps, clock=None) -> tuple[Timing, float]:
    """(timing, first call s): the first call (compilation) apart, ``reps.warmup`` warm-up steps, the
    model's state restored, then the timed steps (CUDA events around each on a card)."""
    clock = clock or kernel_clock()
    state = copy.deepcopy(model.state_dict())
    first = first_call_s(lambda: step(*xs))  # compilation, reported apart
    warm(lambda: step(*xs), reps, clock=clock)  # the counted warm-ups
    model.load_state_dict(state)  # restore the initial state before timing
    t = time_ms(lambda: step(*xs), dataclasses.replace(reps, warmup=0), clock=clock)
    return dataclasses.replace(t, warmup=reps.warmup), first


# the host's calls that put work on a CUDA stream, as the profiler names the runtime/driver API events
LAUNCH_APIS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchCooperativeKernel",
               "cudaMemcpyAsync", "cudaMemsetAsync", "cudaGraphLaunch")


def count_launches(events) -> dict:
    """Launches per step from profiler events (``.name``, ``.device_type``): the host's launch calls
    (kernels, async copies and sets, graph launches: what the host issues), the kernels the device ran
    (those inside a replayed graph included, as CUPTI records them; its copies and sets, also device
    activity, apart) and any other host call named like a launch (an API this list misses)."""
    from torch.autograd import DeviceType

    host = sum(1 for e in events if e.name in LAUNCH_APIS)
    graphs = sum(1 for e in events if e.name == "cudaGraphLaunch")
    device = [e for e in events if e.device_type == DeviceType.CUDA]
    copies = sum(1 for e in device if e.name.startswith(("Memcpy", "Memset")))
    other = sorted({e.name for e in events if e.device_type != DeviceType.CUDA and "Launch" in e.name
                    and e.name not in LAUNCH_APIS})
    return dict(host_launches=host, graph_launches=graphs, gpu_kernels=len(device) - copies, gpu_copies=copies,
                other_launch_apis=other)


def profile_launches(step, xs) -> dict:
    """``count_launches`` over one step under torch.profiler (CPU and CUDA activity), on a card: one
    step run as the profiler's warm-up (its first session can miss kernels at its start), one recorded."""
    from torch.profiler import ProfilerActivity, profile, schedule

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=schedule(wait=0, warmup=1, active=1)) as prof:
        for _ in range(2):
            step(*xs)
            torch.cuda.synchronize()
            prof.step()
    return count_launches(prof.events())


def run_case(px: int, batch: int, device, tiny: bool, compile_modes=("auto",), emit=None,
             graph_modes=("off",), reps: Reps | None = None, keep: list | None = None) -> list[dict]:
    """Every variant of ``variants``, then the decisions; each row goes to ``emit`` as soon as it is measured.
    ``keep``: the fast steps are kept there (row, step, inputs) for ``profile_kept`` after every timing."""
    cuda = device.type == "cuda"
    reps = reps or (TINY if tiny else STEP)
    rows, base = [], {}
    for name, build in variants(px, batch, device, tiny, compile_modes, graph_modes):
        step, xs, model, extra = build()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t, first = time_step(step, xs, model, reps)
        row = dict(px=px, batch=batch, variant=name, **t.row(), views_per_s=2 * batch / (t.ms * 1e-3),
                   first_call_s=first, peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                   **extra)
        if keep is not None and name.startswith("b_fast"):
            keep.append((row, step, xs))  # profiled after every case is timed: CUPTI, once attached, stays
        if name in ("a_reference", "c_backbone_floor"):
            base[name] = row["views_per_s"]
        else:
            row["b_over_a"], row["b_over_c"] = row["views_per_s"] / base["a_reference"], row["views_per_s"] / base[
                "c_backbone_floor"]
        rows.append(row)
        if emit is not None:
            emit(row)
        del step, xs, model
        torch._dynamo.reset()
    for row in decisions(rows):
        rows.append(row)
        if emit is not None:
            emit(row)
    return rows


def profile_kept(kept: list, emit=None) -> list[dict]:
    """One ``launches`` row per kept fast step (``run_case(keep=...)``), profiled after all timing: the
    profiler's CUPTI stays attached once started and would slow every timing after it."""
    rows = []
    for row, step, xs in kept:
        out = dict(px=row["px"], batch=row["batch"], variant=row["variant"], kind="launches", **profile_launches(step, xs))
        rows.append(out)
        if emit is not None:
            emit(out)
    kept.clear()
    return rows


def _variant(name: str) -> tuple[str, str] | None:
    """'b_fast(compile=default=auto,graph=on)' -> ('default', 'on')."""
    if not name.startswith("b_fast("):
        return None
    kv = dict(part.split("=", 1) for part in name[len("b_fast("):-1].split(","))
    return kv["compile"].split("=")[0], kv["graph"]


def decide(setting: str, timed: dict[str, dict]) -> dict:
    """The choice ``timed`` (option -> row with ms, p20, p80, samples) supports for ``setting``: the fastest
    median, and only when its p80 is below every other option's p20 ('undecided' otherwise), with
    the samples and spread it rests on."""
    best = min(timed, key=lambda k: timed[k]["ms"])
    clear = all(timed[best]["p80"] < r["p20"] for k, r in timed.items() if k != best)
    return dict(decision=setting, choice=best if clear else "undecided", fastest=best,
                rule="fastest median, its p80 below every other option's p20",
                rests_on={k: {f: r[f] for f in ("ms", "p20", "p80", "samples", "warmup", "timer")} for k, r in timed.items()})


def decisions(rows: list[dict]) -> list[dict]:
    """One decision row per setting timed in more than one mode: train.graph (per compile mode) and
    train.compile (per graph mode), at this case's size."""
    if not rows:
        return []
    px, batch = rows[0]["px"], rows[0]["batch"]
    fast = {v: r for r in rows if (v := _variant(r["variant"]))}
    out = []
    for comp in sorted({c for c, _ in fast}):
        timed = {g: r for (c, g), r in fast.items() if c == comp}
        if len(timed) > 1:
            out.append(dict(px=px, batch=batch, variant=f"decision(train.graph, compile={comp})",
                            **decide("train.graph", timed)))
    for graph in sorted({g for _, g in fast}):
        timed = {c: r for (c, g), r in fast.items() if g == graph}
        if len(timed) > 1:
            out.append(dict(px=px, batch=batch, variant=f"decision(train.compile, graph={graph})",
                            **decide("train.compile", timed)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--cases", default="32x256,32x512,224x128,224x256", help="PXxBATCH,...")
    ap.add_argument("--compile-modes", default="auto",
                    help="fast-step variants to time, e.g. auto,none,default,reduce-overhead (train.compile by measurement)")
    ap.add_argument("--graph-modes", default="off,on", help="off (eager step) and/or on (one CUDA graph per step)")
    ap.add_argument("--profile-cases", default="", help="PXxBATCH,... whose fast steps also get one profiled step "
                    "(launches per step, eager vs captured; on a card)")
    ap.add_argument("--out", default="bench/results/step.jsonl")
    a = ap.parse_args(argv)
    profiled = {tuple(int(v) for v in c.split("x")) for c in a.profile_cases.split(",") if c}
    cases = [(16, 4)] if a.tiny else [tuple(int(v) for v in c.split("x")) for c in a.cases.split(",")]
    env = env_info()
    device = bench_device()
    sink = RowSink("step", a.out, env)
    rows = []
    kept = []  # the fast steps of --profile-cases, profiled after every case is timed
    for px, b in cases:
        rows += run_case(px, b, device, a.tiny, tuple(a.compile_modes.split(",")), emit=sink.emit,
                         graph_modes=tuple(a.graph_modes.split(",")),
                         keep=kept if (device.type == "cuda" and (px, b) in profiled) else None)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    launches = profile_kept(kept, sink.emit)
    print(header("training step", env))
    print(markdown_table([r for r in rows if "decision" not in r],
                         ["px", "batch", "variant", "ms", "p20", "p80", "samples", "views_per_s", "b_over_a", "b_over_c",
                          "first_call_s", "peak_mem_gb"]))
    if launches:
        print(markdown_table(launches, ["px", "batch", "variant", "host_launches", "graph_launches", "gpu_kernels",
                                        "gpu_copies", "other_launch_apis"]))
    dec = [dict(r, rests_on="; ".join(f"{k}: {v['ms']:.3g} ms [{v['p20']:.3g}, {v['p80']:.3g}] x{v['samples']}"
                                      for k, v in r["rests_on"].items())) for r in rows if "decision" in r]
    if dec:
        print(markdown_table(dec, ["px", "batch", "decision", "choice", "rests_on"]))
    return rows


if __name__ == "__main__":
    main()
