"""Shared benchmark plumbing: environment facts, timing, bandwidth, Markdown and JSON output.

Every benchmark runs its baseline and ours in the same process on the same tensors. Timing
(``bench.timing``): warm-ups apart, then at least a stated number of timed repetitions and a
stated timed duration per case; every row names its samples, warm-ups, clock and spread (median,
p20, p80). On CUDA the clock is CUDA events; on a CPU (the tiny smoke runs CI makes, under
TRITON_INTERPRET=1) perf_counter, so the command is testable everywhere; CPU figures of GPU cases
are never reported as results.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from bench.timing import KERNEL, CudaEventClock, L2Flush, Reps, Timing, kernel_clock, time_ms  # noqa: F401

# Vendor datasheet peak HBM bandwidth, GB/s (leads; the card's measured copy bandwidth is lower).
PEAK_GBPS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
             "A100-SXM4-80GB": 2039.0, "A100": 1555.0}


def env_info() -> dict:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - a missing git must not stop a benchmark
        rev = "unknown"
    import triton

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "git": rev,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "launch": _launch_source(cuda),
        "launch_settings": _launch_settings(cuda),
    }


def _launch_settings(cuda: bool) -> dict:
    """The settings themselves, per kernel family (recorded with every figure)."""
    from vssl_fast.kernels import launch

    dev = torch.device("cuda" if cuda else "cpu")
    return {fam: launch.settings(fam, dev) for fam in launch.DEFAULTS}


def _launch_source(cuda: bool) -> str:
    """Which launch settings the kernels use here (``kernels/launch.py``): measured, defaults or interpreter."""
    from vssl_fast.kernels import launch

    return launch.source(torch.device("cuda" if cuda else "cpu"))


def peak_bandwidth_gbps() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, val in PEAK_GBPS.items():
        if key in name:
            return val
    return None


def bench_device() -> torch.device:
    """The card (with its index: DALI takes `cuda` without one for the CPU) or the CPU."""
    from vssl_fast.distributed import resolve_device

    return resolve_device("cuda" if torch.cuda.is_available() else "cpu")


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def gpu_time_ms(fn, *, setup=None, reps: Reps = KERNEL) -> tuple[Timing | None, str]:
    """(timing, note): the GPU time of ``fn`` alone, replayed from a CUDA graph of one call, timed
    with CUDA events at ``reps``' counts.

    The host-inclusive timing (``time_ms``) is what an eager loop pays; this is what remains when
    the call sits inside a captured training step. ``None`` without CUDA, or when the call cannot
    be captured (a host sync, e.g. the per-parameter references), with the reason in the note.
    """
    if not torch.cuda.is_available():
        return None, "no CUDA"
    try:
        if setup is not None:
            setup()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # warm: allocations and autotuning happen outside the capture
        torch.cuda.current_stream().wait_stream(side)
        if setup is not None:
            setup()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return time_ms(graph.replay, reps, clock=CudaEventClock(), before_each=_flush()), "graph replay"
    except Exception as e:  # noqa: BLE001 - a provider that cannot be captured is reported, not fatal
        torch.cuda.synchronize()
        return None, f"not capturable: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


_L2 = []


def _flush():
    """One L2 flush buffer per process (256 MB on a card; None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    if not _L2:
        _L2.append(L2Flush())
    return _L2[0]


def kernel_time(fn, reps: Reps = KERNEL, *, setup=None) -> Timing:
    """Host-inclusive time of ``fn`` (CUDA events with an L2 flush on a card, perf_counter elsewhere)."""
    return time_ms(fn, reps, setup=setup, clock=kernel_clock(), before_each=_flush())


def first_call_s(fn) -> float:
    """Seconds of one call, synchronized: the first call of a provider, where Triton/inductor
    compile (reported apart from the timings, which come after warm-up)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


class RowSink:
    """Appends each finished case's rows to ``out`` at once, so a run cut by a time limit keeps
    every figure it took; ``rows`` keeps them all for the final table."""

    def __init__(self, name: str, out: str | None, env: dict | None = None):
        self.name, self.out, self.env, self.rows = name, out, env or env_info(), []

    def emit(self, *rows: dict) -> None:
        self.rows += rows
        write_results(self.name, list(rows), self.out, self.env)


def write_results(name: str, rows: list[dict], out: str | None, env: dict | None = None) -> Path | None:
    """Append machine-readable rows (one JSON object per line, each with the environment)."""
    if not out:
        return None
    env = env or env_info()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps({"bench": name, **env, **r}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def model_param_set(device, tiny: bool = False):
    """The real parameter set of the ImageNet-100 model (ResNet-18 with the VSSL heads, METHOD.md §1.2),
    or a handful of small tensors for smoke runs. Returns (model, teacher params, student params,
    optimizer groups), gradients filled with fixed random values."""
    from vssl_fast.models import SSLModel

    if tiny:
        import torch.nn as nn

        bb = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        model = SSLModel("vssl", num_classes=5, proj_hidden_dim=32, proj_output_dim=8, pred_hidden_dim=32,
                         denoiser_hidden_dim=16, backbone_module=bb, feature_dim=8)
    else:
        model = SSLModel("vssl", backbone="resnet18", num_classes=100, proj_hidden_dim=4096, proj_output_dim=256,
                         pred_hidden_dim=8192, denoiser_hidden_dim=4096)
    model = model.to(device)
    t, s = model.ema_param_lists()
    g = torch.Generator(device="cpu").manual_seed(0)
    groups = model.parameter_groups(lr=1.0, weight_decay=1e-5, classifier_lr=0.1)
    for grp in groups:
        for p in grp["params"]:
            p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(device)
    return model, t, s, groups


def header(title: str, env: dict) -> str:
    return (f"# {title} on {env['device']} (torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
            f"git {env['git']}, {env['date']})")
