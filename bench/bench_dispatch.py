"""Host work per training step, measured on any machine: ops dispatched and kernels launched.

    python -m bench.bench_dispatch            # the fast step (GPU configuration) and the CIFAR loader, tiny sizes
    python -m bench.bench_dispatch --json     # one JSON object (what the regression test reads)

At CIFAR size a step is bound by how many kernels the host issues, not by FLOPs (issue 12:
38-52 ms per step on an H200 for ~6 ms of convolutions). The count does not depend on the
device or the image size, so it is measured on the CPU at a tiny size:

- ``aten_ops``: every ATen op the step dispatches (``TorchDispatchMode``; each is at least one
  kernel launch on a GPU in eager mode), broken down by phase (forward+backward, check, optimizer,
  EMA, BatchNorm restore) and by op name;
- ``triton_launches``: Triton kernel launches (the fused losses, LARS/LAMB, EMA, restore);
- ``host_ms``: median wall time of the step here with the Triton kernels counted but not run
  (ATen's CPU work at 16 px plus Python: an upper bound of the host's share on a GPU).

The loader is counted separately per batch (two augmented views of the device-resident CIFAR),
averaged over a chunk of ``data.aug_chunk`` steps augmented in one call.
``tests/train/test_dispatch_budget.py`` fails when a count rises above the bound recorded there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from vssl_fast.kernels._multi_tensor import is_dense

# ops that launch nothing on a CUDA device: views (outputs alias an input) and bare allocations
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view",
              "_reshape_alias", "lift_fresh", "set_", "resize_", "_has_compatible_shallow_copy_type"}
# ops that make the host wait for the device (a sync per call)
# (nonzero_static and repeat_interleave with an int count do not sync; repeat_interleave with a tensor does:
# counted, as the conservative side)
HOST_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "is_nonzero", "equal", "allclose",
                 "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave", "bincount",
                 "histc", "masked_scatter_"}
# ATen's CUDA multi_tensor_apply: tensors per launch by the number of lists (depth), blocks per launch,
# elements per block (aten/src/ATen/native/cuda/MultiTensorApply.cuh)
_MTA_MAX_TENSORS = (110, 64, 48, 36, 30)
_MTA_MAX_BLOCKS, _MTA_CHUNK = 320, 65536
# foreach ops whose fast path accepts a destination list of another dtype than the source
_FOREACH_MIXED_DST = {"_foreach_copy_"}
# foreach ops that promote integer inputs to float (their CUDA fast path refuses integer tensors)
_FOREACH_INT_PROMOTE = {"_foreach_div", "_foreach_div_", "_foreach_sqrt", "_foreach_sqrt_", "_foreach_exp", "_foreach_exp_",
                        "_foreach_log", "_foreach_log_", "_foreach_norm", "_foreach_lerp", "_foreach_lerp_",
                        "_foreach_addcdiv", "_foreach_addcdiv_", "_foreach_reciprocal", "_foreach_reciprocal_"}


def _is_view(func) -> bool:
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def _mta_launches(tensors: list, depth: int) -> int:
    """Kernels ATen's CUDA multi_tensor_apply launches for one list of ``tensors`` at ``depth`` lists, as
    MultiTensorApply.cuh fills them: empty tensors skipped; a launch when the blocks reach their limit, or
    the tensors do at a tensor's last chunk; after a launch the tensor count restarts at 0, or at 1 when
    the tensor goes on into the next launch. (The 4 KB kernel-argument limits: on CUDA >= 12.1 some
    functors take larger launches, so on a card this is an upper bound for those.)"""
    max_t = _MTA_MAX_TENSORS[min(depth, len(_MTA_MAX_TENSORS)) - 1]
    launches = n_t = n_b = 0
    for t in tensors:
        if t.numel() == 0:
            continue
        n_t += 1
        chunks = -(-t.numel() // _MTA_CHUNK)
        for c in range(chunks):
            n_b += 1
            if n_b == _MTA_MAX_BLOCKS or (n_t == max_t and c == chunks - 1):
                launches += 1
                n_b = 0
                n_t = 0 if c == chunks - 1 else 1
    return launches + (1 if n_b else 0)


def _norm_launches(tensors: list) -> int:
    """``_foreach_norm`` on its fast path (ATen's ForeachReduceOp.cu): the zeroed partials, the
    multi_tensor_apply sweep, the clean-up kernels (one per launch-sized group of tensors) and a zero
    fill per empty tensor."""
    n = len(tensors)
    empty = sum(1 for t in tensors if t.numel() == 0)
    return 1 + _mta_launches(tensors, 1) + -(-n // _MTA_MAX_TENSORS[0]) + empty


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Sizes equal and strides equal where the size is above 1 (ATen ignores size-1 dims' strides)."""
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def foreach_route(name: str, lists: list[list], scalars=(), norm_ord=2) -> tuple[bool, str]:
    """Would ATen's CUDA ``_foreach_*`` take its fast path (one multi_tensor_apply) for these lists?
    (aten/src/ATen/native/ForeachUtils.h, check_fast_path_restrictions): one device for all tensors,
    one dtype per list and, but for a copy's destination, the same dtype across lists; the same sizes
    and strides across lists (size-1 dims aside), dense non-overlapping tensors, no integer tensors for
    ops that promote them to float, no float scalar on integer tensors; a norm of order 1, 2 or inf.
    Returns (fast, why not)."""
    first = [t for lst in lists for t in lst]
    if not first:
        return True, ""
    devices = {t.device for t in first}
    if len(devices) > 1:
        return False, f"devices {sorted(map(str, devices))}"
    for k, lst in enumerate(lists):
        dts = {t.dtype for t in lst}
        if len(dts) > 1:
            return False, f"list {k} mixes {sorted(map(str, dts))}"
    cross = lists[1:] if name in _FOREACH_MIXED_DST else lists
    if len({t.dtype for lst in cross for t in lst}) > 1:
        return False, f"lists of different dtypes {sorted({str(t.dtype) for t in first})}"
    for lst in lists[1:]:
        for a, b in zip(lists[0], lst):
            if not _same_layout(a, b):
                return False, f"sizes/strides differ across lists ({tuple(a.shape)}{a.stride()} vs {tuple(b.shape)}{b.stride()})"
    for t in first:
        if not is_dense(t):  # non-overlapping and dense in some dimension order
            return False, f"a tensor of shape {tuple(t.shape)} strides {t.stride()} is not dense"
    if name == "_foreach_norm" and norm_ord not in (1, 2, float("inf")):
        return False, f"a norm of order {norm_ord}"
    if not lists[0][0].is_floating_point():
        if name.rstrip("_") + "_" in _FOREACH_INT_PROMOTE or name in _FOREACH_INT_PROMOTE:
            return False, f"{name} promotes the integer tensors to float"
        if any(isinstance(v, float) for v in scalars):
            return False, "a float scalar on integer tensors"
    return True, ""


class OpCounter(TorchDispatchMode):
    """Counts ATen ops by name (and Triton launches, patched in while active), and models what a CUDA
    device would launch for each (``cuda_launches``): views and bare allocations launch nothing, a
    ``_foreach_*`` op launches multi_tensor_apply's kernels on its fast path and one kernel per
    tensor on its per-tensor fallback (``foreach_route``; the CPU always takes the fallback, so the
    route is decided from the lists as ATen's CUDA code decides it). Every foreach call is recorded
    with its lists' dtypes and devices (``foreach``), and host syncs are counted (``syncs``)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.triton = 0
        self.cuda_launches = 0
        self.syncs: Counter = Counter()
        self.host_data = 0
        self.foreach: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__)
        self.ops[name] += 1
        if name.startswith("_foreach_"):
            lists = [a for a in list(args) + list(kwargs.values())
                     if isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a)]
            plain = list(args) + list(kwargs.values())
            scalars = [a for a in plain if isinstance(a, (int, float)) and not isinstance(a, bool)]
            scalars += [v for a in plain if isinstance(a, (list, tuple)) for v in a
                        if isinstance(v, (int, float)) and not isinstance(v, bool)]  # scalar lists
            norm_ord = args[1] if name == "_foreach_norm" and len(args) > 1 else kwargs.get("ord", 2)
            fast, why = foreach_route(name, lists, scalars, norm_ord)
            n = len(lists[0]) if lists else 0
            reduction = name in ("_foreach_norm", "_foreach_max")  # outputs are not a list the kernel sweeps
            depth = len(lists) + (0 if func._schema.is_mutable or reduction else 1)
            if not fast:
                launches = n
            elif name == "_foreach_norm":
                launches = _norm_launches(lists[0])
            else:
                launches = _mta_launches(lists[0], depth)
            self.cuda_launches += launches
            self.foreach.append({"op": name, "tensors": n, "fast": fast, "why": why, "launches": launches,
                                 "lists": [sorted({f"{t.dtype}@{t.device.type}" for t in lst}) for lst in lists]})
        elif name in HOST_SYNC_OPS or (name in ("index", "index_put_", "index_put") and _bool_index(args)):
            self.syncs[name if not name.startswith("index") else f"{name} (boolean mask)"] += 1
        elif name in ("lift_fresh", "lift_fresh_copy"):
            # torch.tensor(data): on CUDA a host-to-device copy, a sync unless it is pinned and non_blocking
            # (as the multi-tensor pointer tables are); counted apart, under test, so a new one is seen
            self.host_data += 1
        elif not (name in _NO_LAUNCH or _is_view(func)):
            self.cuda_launches += 1
        return func(*args, **kwargs)

    @property
    def leaf_ops(self) -> int:
        """ATen ops as a CUDA device would run them: a foreach call on its per-tensor fallback
        counts one op per tensor (it is a loop of per-tensor kernels there)."""
        return sum(self.ops.values()) + sum(f["tensors"] - 1 for f in self.foreach if not f["fast"])

    def mixed_foreach(self) -> list[dict]:
        """Foreach calls whose lists do not each hold one dtype on one device."""
        return [f for f in self.foreach if any(len(lst) > 1 for lst in f["lists"])]

    @contextlib.contextmanager
    def counting(self, dispatch=True):
        """Count while active. Triton launches are counted, not run: the count is structural (the
        step has no host sync, so values cannot change what is issued) and the interpreter would
        take ~10 s per optimizer launch over ResNet-18's 11M parameters."""
        import triton.runtime.interpreter as interp
        import triton.runtime.jit as jit

        originals = [(jit.JITFunction, "run", jit.JITFunction.run),
                     (interp.InterpretedFunction, "run", interp.InterpretedFunction.run)]
        counter = self

        def wrap(fn):
            def run(self, *a, **k):
                counter.triton += 1
            return run

        for cls, name, fn in originals:
            setattr(cls, name, wrap(fn))
        try:
            with self if dispatch else contextlib.nullcontext():
                yield self
        finally:
            for cls, name, fn in originals:
                setattr(cls, name, fn)


def _bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (idx or ()))


def _tiny_step(device, channels_last=True, graph: str = "off", ddp: bool = False):
    """The fast step in the GPU configuration (bf16 autocast and images), tiny batch."""
    from vssl_fast.kernels._common import interpret_mode

    from vssl_fast.config import load_config
    from vssl_fast.models import SSLModel
    from vssl_fast.optim import build_optimizer
    from vssl_fast.step import TrainStep

    cfg = load_config(["--preset", "cifar10", "--data.crop_size=16", "--train.batch_size=8",
                       f"--model.channels_last={str(channels_last).lower()}", "--train.precision=bf16",
                       "--method.proj_hidden_dim=32", "--method.pred_hidden_dim=32", "--method.denoiser_hidden_dim=32",
                       "--method.proj_output_dim=16"])
    if device.type == "cuda" or interpret_mode():
        cfg.method = cfg.method.replace(impl="fused")
    amp, img_dtype, cl = torch.bfloat16, torch.bfloat16, channels_last
    torch.manual_seed(0)
    # ResNet-18's layer structure at width 8 would still be 60 convolutions: the op count per layer
    # is what matters, so the real ResNet-18 (CIFAR stem) is used with the real heads, at 16 px.
    model = SSLModel(**cfg.method.model_kwargs(), backbone="resnet18", cifar_stem=True, num_classes=10)
    if ddp:  # the recipe's multi-process model: SyncBatchNorm everywhere, DDP without buffer broadcasts
        from vssl_fast.syncbn import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    model = model.to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg, 1)
    fwd = model
    if ddp:
        fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                        broadcast_buffers=False)
    step = TrainStep(model, fwd, opt, cfg.method, cfg.optim, device, amp, graph=graph, distributed=ddp)
    g = torch.Generator().manual_seed(0)
    fmt = (lambda t: t.contiguous(memory_format=torch.channels_last)) if cl else (lambda t: t)
    xs = [fmt(torch.randn(8, 3, 16, 16, generator=g).to(device, img_dtype)) for _ in range(2)]
    y = torch.randint(0, 10, (8,), generator=g).to(device)
    return step, (xs[0], xs[1], y)


SYNCBN_FUSED = ("stats", "gather_stats_with_counts", "elemt", "backward_reduce", "backward_elemt")


@contextlib.contextmanager
def cuda_shaped_syncbn(counter: OpCounter):
    """SyncBatchNorm's per-channel primitives as a CUDA rank runs them: each ``CpuOps`` call (the CPU
    twin of one fused CUDA kernel of ``CudaOps``) counts as that one kernel, its plain-PyTorch ops
    unseen, so a CPU count of the DDP step stands for a GPU rank's."""
    from torch.utils._python_dispatch import _disable_current_modes

    from vssl_fast import syncbn

    saved = {name: syncbn.CpuOps.__dict__[name] for name in SYNCBN_FUSED}
    gather = syncbn._all_gather

    def nccl_gather(t, group, world):  # a NCCL rank: one all_gather_into_tensor into a flat buffer, no stack
        counter.ops["_allgather_base_"] += 1
        counter.cuda_launches += 1
        with _disable_current_modes():
            return gather(t, group, world)

    syncbn._all_gather = nccl_gather

    def fused(name, fn):
        def run(*a):
            counter.ops[f"batch_norm_{name}"] += 1
            counter.cuda_launches += 1
            with _disable_current_modes():
                return fn(*a)
        return staticmethod(run)

    for name, fn in saved.items():
        setattr(syncbn.CpuOps, name, fused(name, fn.__func__))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(syncbn.CpuOps, name, fn)
        syncbn._all_gather = gather


def count_step(device, channels_last=True, timed=False, graph: str = "off", ddp: bool = False) -> dict:
    """One step after a warm one. ``graph='static'`` is the graph-ready step: what a CUDA graph
    captures (each launch a node of the graph), with gradients kept and zeroed in place. ``ddp``: the
    step of one rank of a running process group (torchrun), SyncBatchNorm and DDP as the trainer has
    them (DDP's gradient all-reduces run from its C++ reducer and are counted only where they pass
    the dispatcher)."""
    step, batch = _tiny_step(device, channels_last, graph, ddp)
    step.schedule(10, 100)
    with OpCounter().counting(dispatch=False):
        # first step: optimizer state, pointer tables; DDP: its own warm-up (buckets rebuilt after the first
        # iteration, timing statistics up to the tenth), so the count is of the iteration a capture records
        for _ in range(11 if ddp else 1):
            step(*batch)
    c = OpCounter()
    with c.counting(), (cuda_shaped_syncbn(c) if ddp and device.type != "cuda" else contextlib.nullcontext()):
        step(*batch)
    times = []
    with OpCounter().counting(dispatch=False):  # kernels not run: host work only
        for _ in range(3 if timed else 0):
            t0 = time.perf_counter()
            step(*batch)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"aten_ops": sum(c.ops.values()), "leaf_ops": c.leaf_ops, "triton_launches": c.triton,
            "cuda_launches": c.cuda_launches + c.triton, "graph": graph,
            "host_ms": statistics.median(times) if times else None, "channels_last": channels_last,
            "top_ops": dict(c.ops.most_common(12)), "optimizer": type(step.opt).__name__,
            "foreach": [{k: f[k] for k in ("op", "tensors", "fast", "launches", "lists")} for f in c.foreach],
            "mixed_foreach": c.mixed_foreach(), "slow_foreach": [f for f in c.foreach if not f["fast"]],
            "syncs": dict(c.syncs), "host_data": c.host_data}


def count_loader(device, chunk: int = 16) -> dict:
    """Ops per batch of the device CIFAR loader, averaged over one chunk of ``chunk`` batches."""
    from vssl_fast.data.augment import view_specs
    from vssl_fast.data.loader import DeviceTwoViewLoader

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16 * 2 * chunk, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
    y = torch.randint(0, 10, (x.shape[0],), generator=g).to(device)
    ld = DeviceTwoViewLoader(x, y, 16, view_specs("cifar10"), 0, out_dtype=torch.float32, chunk=chunk)
    it = iter(ld)
    for _ in range(chunk):  # the first chunk: warm
        next(it)
    c = OpCounter()
    t0 = time.perf_counter()
    with c.counting():
        for _ in range(chunk):
            next(it)
    return {"aten_ops": sum(c.ops.values()) / chunk, "triton_launches": c.triton / chunk, "chunk": chunk,
            "host_ms": (time.perf_counter() - t0) * 1e3 / chunk, "top_ops": dict(c.ops.most_common(12))}


def optimizer_calls(device, tiny: bool = False) -> dict:
    """name -> (one call, tensors it sweeps): FusedLAMB/FusedLARS steps, the EMA and the restore over the
    ImageNet-100 model's parameters (``tiny``: a handful), each on fresh state."""
    from vssl_fast.kernels import FusedLAMB, FusedLARS, ema_update_, restore_where_

    from bench.common import model_param_set

    _, t, s, groups = model_param_set(device, tiny)

    def fresh():
        return [{k: (list(v) if k == "params" else v) for k, v in g.items()} for g in groups]

    flag = torch.zeros(1, dtype=torch.int32, device=device)
    tau = torch.tensor(0.99, device=device)
    lamb, lars = FusedLAMB(fresh(), lr=1e-3, weight_decay=1e-5), FusedLARS(fresh(), lr=0.3, weight_decay=1e-5)
    n_opt = sum(len(g["params"]) for g in groups)
    return {"FusedLAMB.step": (lambda: lamb.step(skip=flag), n_opt),
            "FusedLARS.step": (lambda: lars.step(skip=flag), n_opt),
            "ema_update_": (lambda: ema_update_(t, s, tau), len(t)),
            "restore_where_": (lambda: restore_where_(t, s, flag), len(t))}


def count_optimizers(device, tiny: bool = False, reps: int = 30) -> dict:
    """Per call of each multi-tensor kernel family over the ImageNet-100 model's parameters (86
    tensors, 28.1M elements; ``tiny``: a handful): ATen ops, Triton launches and host microseconds
    with the launches counted, not run (the Python around the kernels: plans, checks, tables).
    Needs a device where the Triton path runs (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    from vssl_fast.kernels._common import triton_available

    if not triton_available(device):
        return {}
    cases = optimizer_calls(device, tiny)
    out = {}
    for name, (fn, n_tensors) in cases.items():
        with OpCounter().counting(dispatch=False):
            fn()  # the first call builds the plan
        c = OpCounter()
        with c.counting():
            fn()
        times = []
        with OpCounter().counting(dispatch=False):
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
        out[name] = {"aten_ops": sum(c.ops.values()), "triton_launches": c.triton,
                     "host_us": statistics.median(times), "ops": dict(c.ops), "tensors": n_tensors}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--contiguous", action="store_true", help="contiguous weights (the only layout before issue 11)")
    ap.add_argument("--chunk", type=int, default=16, help="loader steps augmented per call (data.aug_chunk)")
    ap.add_argument("--time", action="store_true", help="also the host ms per step (slow on a CPU: bf16 convolutions)")
    ap.add_argument("--optim", action="store_true", help="only the optimizer/EMA/restore calls over the ImageNet-100 "
                    "parameter set (on a CPU: set TRITON_INTERPRET=1)")
    ap.add_argument("--ddp", action="store_true", help="one step of each rank under torchrun (gloo on CPUs, NCCL on "
                    "GPUs), eager and graph-ready; rank 0 prints")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if a.ddp:
        return _main_ddp(a.json)
    if a.optim:
        res = count_optimizers(device)
        if not res:
            raise SystemExit("bench_dispatch --optim: the Triton path cannot run here (no CUDA; set TRITON_INTERPRET=1)")
        for k, v in res.items():
            print(f"{k}: {v['aten_ops']} ATen ops, {v['triton_launches']} Triton launches, {v['host_us']:.0f} host us "
                  f"(launches not run) over {v['tensors']} tensors; {v['ops']}")
        return res
    res = {"step": count_step(device, not a.contiguous, a.time), "loader": count_loader(device, a.chunk)}
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            ms = f"{v['host_ms']:.1f} host ms" if v["host_ms"] is not None else "host ms not timed"
            print(f"{k}: {v['aten_ops']:g} ATen ops, {v['triton_launches']:g} Triton launches, {ms}; "
                  f"most frequent: {v['top_ops']}")
    return res


def _main_ddp(as_json: bool) -> dict:
    import torch.distributed as dist

    from vssl_fast.distributed import cleanup, init_distributed

    info = init_distributed(600)
    if not info.enabled:
        raise SystemExit("bench_dispatch --ddp: run it under torchrun with at least 2 processes")
    try:
        res = {g: count_step(info.device, graph=g, ddp=True) for g in ("off", "static")}
    finally:
        cleanup()
    if info.is_main:
        keys = ("aten_ops", "leaf_ops", "cuda_launches", "triton_launches", "syncs")
        print(json.dumps(res) if as_json else "\n".join(f"DDP step, graph={g}: " + ", ".join(f"{k} {v[k]}" for k in keys)
                                                        for g, v in res.items()))
    del dist
    return res


if __name__ == "__main__":
    main()
