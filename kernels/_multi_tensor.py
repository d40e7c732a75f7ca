"""Multi-tensor plumbing shared by the fused optimizers, EMA and restore: plans, block maps, norms.

A multi-tensor launch sweeps many tensors in one grid. Program ``i`` handles elements
``[blk_start[i], blk_start[i] + BLOCK)`` of tensor ``blk_tensor[i]``; per-tensor pointers come
from int64 tables. ``BLOCK`` and the warps come from ``launch.settings(family, device)`` (per card).

Plans: the checks, dtype grouping, block maps, pointer tables and scratch buffers of a call are
built once and cached, keyed by each tensor's ``signature`` (address, strides, shape, dtype; the
optimizers also check that their state tensors are the ones the plan points to), so a step costs
reading those and the launches, and anything that changed is validated again. Gradient pointers
change whenever ``zero_grad(set_to_none=True)`` frees them, so their table is rebuilt (and their
layouts re-checked) when a gradient's address or strides changed, sent with a pinned,
non-blocking copy (a pageable host-to-device copy would synchronize the stream). A rebuilt plan
frees the previous one's tables and scratch unless a CUDA graph captured it (``note_capture``
keeps those alive); a graph captured before a rebuild still sweeps the old tensors, so it must be
captured again (``TrainStep`` captures after its warm-up steps and never rebuilds).

Vector width: a block that lies wholly inside its tensor ("full") is swept without a mask, and
when every pointer of the plan is 16-byte aligned (checked on the host) the kernels promise it to
the compiler, which then emits 128-bit loads and stores (``aot_check`` verifies the count in the
PTX). Masks built from sizes read from memory would keep every access scalar. Each tensor's last
block takes the masked path.

Layouts: every tensor is swept as its storage span ``[data_ptr, data_ptr + numel)``, which is
exact for any dense, non-overlapping layout (contiguous, channels-last, ...). Element ``k`` of the
span is the same logical element in a parameter, its gradient and its state as long as all three
share strides; ``check_span_layout`` enforces that and ``match_layout_`` re-lays state once.

Norms are deterministic: each program writes the partial sum of its block, then one program per
tensor adds its blocks' partials in a fixed order (no atomics), so a resumed run reproduces an
uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import launch

_MAX_BLOCKS_PER_TENSOR = 1 << 20
ALIGN = 16  # bytes: a table pointer on this boundary lets the full-block path use 128-bit accesses


def block_size(family: str, device: torch.device) -> int:
    """Elements per program of ``family``'s multi-tensor launches on ``device`` (see ``launch``)."""
    return launch.settings(family, device)["BLOCK"]


def num_warps(family: str, device: torch.device) -> int:
    return launch.settings(family, device)["num_warps"]


def aligned(*ptr_lists) -> bool:
    """Every pointer on an ``ALIGN``-byte boundary (then the kernels may promise it to the compiler)."""
    return all(p % ALIGN == 0 for ptrs in ptr_lists for p in ptrs)

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def device_int_tensor(values, device, dtype=torch.int64) -> torch.Tensor:
    """A small host list on the device without a stream sync (pinned + non_blocking on CUDA).

    Never inside a CUDA-graph capture: the graph would replay the copy from a temporary pinned buffer
    that is freed and reused after this call. Plans and pointer tables are built in the eager warm-up
    steps; one built during a capture means the warm-up did not reach the steady state."""
    if capturing(device):
        raise RuntimeError("a fused kernel built its pointer tables inside a CUDA-graph capture (its plan missed "
                           "the cache: a tensor moved, or more plans than the cache keeps); the graph would replay a "
                           "copy from freed host memory. Capture only after warm-up steps that run the same step")
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class BlockMap:
    """Static block map and per-tensor tables for an ordered list of same-dtype tensors."""

    def __init__(self, tensors: list[torch.Tensor], device: torch.device, block: int):
        self.block = block
        self.sizes_list = [t.numel() for t in tensors]
        blk_tensor, blk_start, first = [], [], []
        for i, n in enumerate(self.sizes_list):
            first.append(len(blk_tensor))
            nb = max(1, triton.cdiv(n, block))
            if nb > _MAX_BLOCKS_PER_TENSOR:
                raise ValueError(f"tensor {i} has {n} elements; at most {_MAX_BLOCKS_PER_TENSOR * block} are supported")
            blk_tensor += [i] * nb
            blk_start += [j * block for j in range(nb)]
        first.append(len(blk_tensor))
        self.num_tensors = len(tensors)
        self.num_blocks = len(blk_tensor)
        self.numel = sum(self.sizes_list)
        self.sizes = device_int_tensor(self.sizes_list, device)
        self.blk_tensor = device_int_tensor(blk_tensor, device, torch.int32)
        self.blk_start = device_int_tensor(blk_start, device)
        self.first_blk = device_int_tensor(first, device, torch.int32)
        self.max_blocks = max(b - a for a, b in zip(first[:-1], first[1:]))


def is_dense(t: torch.Tensor) -> bool:
    """Dense and non-overlapping in *some* dimension order (contiguous, channels-last, any permutation).

    Such a tensor fills ``[data_ptr, data_ptr + numel * itemsize)`` exactly, so a kernel can sweep
    its storage span as a flat array whatever the layout.
    """
    if t.numel() <= 1:
        return True
    expect = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expect:
            return False
        expect *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and the same strides on every dimension of size > 1: span element k is the same index."""
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def check_span_layout(who: str, index: int, p: torch.Tensor, others: dict) -> None:
    """Raise a clear error unless ``p`` is dense and every tensor in ``others`` shares its layout.

    Called for every tensor before a fused step writes anything. ``index`` is the parameter's
    position in the optimizer's (or EMA's) flattened list.
    """
    if not is_dense(p):
        raise RuntimeError(f"{who}: parameter {index} (shape {tuple(p.shape)}, strides {p.stride()}) is not dense "
                           "and non-overlapping; the fused kernels sweep each tensor's storage span")
    for name, t in others.items():
        if not same_layout(p, t):
            raise RuntimeError(f"{who}: parameter {index} (shape {tuple(p.shape)}, strides {p.stride()}): its {name} "
                               f"has shape {tuple(t.shape)}, strides {t.stride()}; the fused kernels need the "
                               "same layout as the parameter")


def match_layout_(state: dict, key: str, p: torch.Tensor) -> torch.Tensor:
    """Optimizer state in its parameter's layout (a one-time re-layout after, e.g., loading a
    contiguous checkpoint into a channels-last model); values are unchanged."""
    t = state[key]
    if not same_layout(p, t):
        new = torch.empty_like(p, dtype=t.dtype)  # preserve_format: p's strides
        new.copy_(t)
        state[key] = t = new
    return t


def ptr_list(tensors) -> list[int]:
    return [t.data_ptr() for t in tensors]


def ptr_table(tensors: list[torch.Tensor], device) -> torch.Tensor:
    return device_int_tensor(ptr_list(tensors), device)


def signature(t: torch.Tensor) -> tuple:
    """What a plan assumes of a tensor: address, strides, shape, dtype. A plan is reused only while
    every tensor still has its signature, so a view, ``.data = ...``, ``resize_`` or ``as_strided``
    at the same address is validated again instead of swept with stale assumptions."""
    return t.data_ptr(), t.stride(), t.shape, t.dtype


_PAIR_PLANS: dict = {}  # key -> plan, least recently used first
PAIR_PLANS_MAX = 16


def pair_plan(family: str, a: list[torch.Tensor], b: list[torch.Tensor], device, validate, dtypes):
    """The launches of a paired sweep (EMA teacher/student, restore destination/source), cached.

    Keyed by every tensor's ``signature`` (address, strides, shape, dtype), so a cached plan's
    checks still hold and a call pays only for reading them. ``validate(a, b)`` raises before
    anything is written. The plan is a list of (dtype, indices into the lists, block map, pointer
    tables, whether every pointer is 16-byte aligned), one launch each; a dtype outside ``dtypes``
    gets (dtype, indices, None, None, None, None) for the caller's fallback. Plans hold pointers,
    not tensors: a tensor freed and reallocated elsewhere changes the key.
    """
    block = block_size(family, device)
    key = (family, block, tuple(map(signature, a)), tuple(map(signature, b)))
    plan = _PAIR_PLANS.pop(key, None)
    if plan is not None:
        _PAIR_PLANS[key] = plan  # the most recently used last: the oldest goes first when the cache is full
    else:
        validate(a, b)
        by_dtype: dict = {}
        for i, x in enumerate(a):
            by_dtype.setdefault(x.dtype, []).append(i)
        plan = []
        for dt, idx in by_dtype.items():
            if dt not in dtypes:
                plan.append((dt, idx, None, None, None, None))
                continue
            px, py = ptr_list([a[i] for i in idx]), ptr_list([b[i] for i in idx])
            plan.append((dt, idx, BlockMap([a[i] for i in idx], device, block), device_int_tensor(px, device),
                         device_int_tensor(py, device), aligned(px, py)))
        if len(_PAIR_PLANS) >= PAIR_PLANS_MAX:  # least recently used out (clearing all rebuilt the live ones too)
            del _PAIR_PLANS[next(iter(_PAIR_PLANS))]
        _PAIR_PLANS[key] = plan
    note_capture(plan, device)
    return plan


def params_key(family: str, device, groups: list, extra=()) -> tuple:
    """An optimizer plan's key: block size, and per parameter its identity (the plan holds it, so
    the id cannot be reused while the plan lives), ``signature`` and whether it has a gradient."""
    return (block_size(family, device),
            tuple((id(p), signature(p), p.grad is None) for g in groups for p in g["params"]), extra)


def state_current(state, plan: dict) -> bool:
    """True while every state tensor the plan points to is still the optimizer's, with the memory,
    strides, shape and dtype the plan saw (a state reset by hand, ``state.clear()``, a replaced
    buffer or one given new memory through ``.data``/``set_`` makes the plan stale)."""
    return all((t := state.get(p, {}).get(k)) is t0 and signature(t) == sig for p, k, t0, sig in plan["state"])


_KEEPERS: list = []  # the keep-alive lists of the captures in progress (keep_captured_plans), innermost last
_CAPTURED: list = []  # plans captured outside keep_captured_plans(): kept while the process lives


@contextlib.contextmanager
def keep_captured_plans():
    """Around a CUDA-graph capture: yields a list that holds every plan (pointer tables, scratch) a
    fused kernel uses inside the capture, so the plans live exactly as long as whoever keeps the
    list with the graph (``vssl_fast.step.TrainStep``) and no longer."""
    kept: list = []
    _KEEPERS.append(kept)
    try:
        yield kept
    finally:
        _KEEPERS.remove(kept)


def capturing(device) -> bool:
    """Is a CUDA-graph capture recording on ``device``'s current stream? (patched by tests)"""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def note_capture(plan, device) -> None:
    """Keep ``plan`` (its tables and scratch) alive while a graph that captured it may replay its
    pointers: in the innermost ``keep_captured_plans()`` list, or, for a capture made without one,
    for the rest of the process (evicting it from a cache must not free what a graph reads)."""
    if not capturing(device):
        return
    kept = _KEEPERS[-1] if _KEEPERS else _CAPTURED
    if not any(p is plan for p in kept):
        kept.append(plan)


def check_state(who: str, index: int, p: torch.Tensor, name: str, t: torch.Tensor) -> None:
    """Optimizer state a fused kernel reads as the parameter's dtype must have its dtype and shape."""
    if t.dtype != p.dtype or t.shape != p.shape:
        raise RuntimeError(f"{who}: parameter {index} ({p.dtype}, shape {tuple(p.shape)}): its state '{name}' is "
                           f"{t.dtype} of shape {tuple(t.shape)}; the fused kernels need the parameter's dtype and shape")


def grouped_params(who: str, groups: list, state, state_keys: tuple) -> list:
    """The parameters with a gradient as (group index, dtype, parameters), one launch list each,
    after every check a fused optimizer makes before anything is written, each naming the
    parameter: a sparse gradient, a dtype the kernels do not take, a gradient of another layout,
    existing state (``state_keys``) of another dtype or shape."""
    lists, index = [], -1
    for gi, group in enumerate(groups):
        by_dtype: dict = {}
        for p in group["params"]:
            index += 1
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{who} does not support sparse gradients (parameter {index})")
            if p.dtype not in TL_DTYPES:
                raise RuntimeError(f"{who} supports float32, float16 and bfloat16 parameters, got {p.dtype} "
                                   f"(parameter {index})")
            check_span_layout(who, index, p, {"gradient": p.grad})
            st = state.get(p, {})
            for name in state_keys:
                if name in st:
                    check_state(who, index, p, name, st[name])
            by_dtype.setdefault(p.dtype, []).append(p)
        lists += [(gi, dt, ps) for dt, ps in by_dtype.items()]
    return lists


def ensure_state(state, ps: list, keys: tuple, plan: dict) -> list:
    """Each key's state tensors for ``ps`` (created as zeros in the parameter's layout, or re-laid
    once into it), recorded in ``plan["state"]`` for ``state_current``; one list per key."""
    out = []
    for name in keys:
        ts = []
        for p in ps:
            st = state[p]
            if name not in st:
                st[name] = torch.zeros_like(p)  # preserve_format: the parameter's layout
            ts.append(match_layout_(st, name, p))
        plan["state"] += [(p, name, t, signature(t)) for p, t in zip(ps, ts)]
        out.append(ts)
    return out


def grad_signature(groups: list) -> tuple:
    """(address, strides) of every gradient, None where there is none (shape and dtype are
    enforced by autograd on assignment)."""
    return tuple(None if (g := p.grad) is None or g.is_sparse else (g.data_ptr(), g.stride())
                 for grp in groups for p in grp["params"])


def refresh_grads(who: str, plan: dict, groups: list, device) -> None:
    """Gradient pointer tables of an optimizer's plan, rebuilt (and the gradients' layouts checked,
    before anything is written) only when a gradient's address or strides changed.

    With persistent gradients (``zero_grad(set_to_none=False)``, as the product's step does) the
    pointers never change and no table is sent after the first step; with ``set_to_none=True``
    each step's fresh gradients need new tables (one small pinned copy per list).
    """
    key = grad_signature(groups)
    if key == plan["gkey"]:
        return
    index = {id(p): i for i, p in enumerate(q for g in groups for q in g["params"])}
    for _, _, tab in plan["lists"]:
        for p in tab["ps"]:
            if p.grad is None:
                raise RuntimeError(f"{who}: parameter {index[id(p)]} lost its gradient after the step's plan was made")
            if p.grad.is_sparse:
                raise RuntimeError(f"{who} does not support sparse gradients (parameter {index[id(p)]})")
            check_span_layout(who, index[id(p)], p, {"gradient": p.grad})
    for _, _, tab in plan["lists"]:
        ptrs = ptr_list([p.grad for p in tab["ps"]])
        tab["g"], tab["g_aligned"] = device_int_tensor(ptrs, device), aligned(ptrs)
    plan["gkey"] = key


# ---------------------------------------------------------------------------------- device helpers
# A program's block is "full" when all BLOCK elements lie inside its tensor: it is swept without a
# mask, so with aligned pointers (ALIGNED) the compiler emits 128-bit loads and stores (a mask
# computed from a size read from memory would keep every access scalar). Only the last block of
# each tensor takes the masked path. Kernels branch once per program on ``full``.
@triton.jit
def _block_coords(blk_tensor, blk_start, sizes, BLOCK: tl.constexpr):
    """(program id, tensor index, element offsets, tail mask, full)."""
    pid = tl.program_id(0).to(tl.int64)
    ti = tl.load(blk_tensor + pid).to(tl.int64)
    start = tl.multiple_of(tl.load(blk_start + pid), BLOCK)  # blocks start at multiples of BLOCK
    n = tl.load(sizes + ti)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    return pid, ti, offs, offs < n, start + BLOCK <= n


@triton.jit
def _tensor_ptr(ptrs, ti, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``ti``'s base pointer from a table; ALIGNED promises 16-byte alignment (checked on the host)."""
    p = tl.load(ptrs + ti).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _ld(p, offs, mask, MASKED: tl.constexpr):
    """fp32 values of a block: masked (a tensor's tail) or not (a full block)."""
    if MASKED:
        x = tl.load(p + offs, mask=mask, other=0.0)
    else:
        x = tl.load(p + offs)
    return x.to(tl.float32)


@triton.jit
def _st(p, offs, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(p + offs, x.to(p.dtype.element_ty), mask=mask)
    else:
        tl.store(p + offs, x.to(p.dtype.element_ty))


@triton.jit
def _sumsq_body(a_ptrs, b_ptrs, ti, offs, mask, DTYPE_A: tl.constexpr, DTYPE_B: tl.constexpr,
                ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    a = _ld(_tensor_ptr(a_ptrs, ti, DTYPE_A, ALIGNED), offs, mask, MASKED)
    b = _ld(_tensor_ptr(b_ptrs, ti, DTYPE_B, ALIGNED), offs, mask, MASKED)
    return tl.sum(a * a, axis=0), tl.sum(b * b, axis=0)


@triton.jit
def _sumsq_partials_kernel(a_ptrs, b_ptrs, blk_tensor, blk_start, sizes, part, NB,
                           DTYPE_A: tl.constexpr, DTYPE_B: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Per block: sum(a^2) into part[pid] and sum(b^2) into part[NB + pid] (fp32).

    One pass: reads a and b once (8 B per fp32 element pair, 4 B for bf16), writes 8 B per block.
    """
    pid, ti, offs, mask, full = _block_coords(blk_tensor, blk_start, sizes, BLOCK)
    if full:
        sa, sb = _sumsq_body(a_ptrs, b_ptrs, ti, offs, mask, DTYPE_A, DTYPE_B, ALIGNED, False)
    else:
        sa, sb = _sumsq_body(a_ptrs, b_ptrs, ti, offs, mask, DTYPE_A, DTYPE_B, ALIGNED, True)
    tl.store(part + pid, sa)
    tl.store(part + NB + pid, sb)


@triton.jit
def _reduce_partials_kernel(part, first_blk, out_a, out_b, NB, MAX_BLOCKS: tl.constexpr, CHUNK: tl.constexpr):
    """out_w[t] = sum of part[w NB + first_blk[t] : w NB + first_blk[t+1]] for w = program_id(1),
    in a fixed order (deterministic, no atomics). Reads 4 B per block; negligible beside a sweep."""
    t = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)
    lo = tl.load(first_blk + t).to(tl.int64)
    hi = tl.load(first_blk + t + 1).to(tl.int64)
    base = part + which.to(tl.int64) * NB
    acc = tl.zeros((CHUNK,), dtype=tl.float32)
    for start in range(0, MAX_BLOCKS, CHUNK):
        idx = lo + start + tl.arange(0, CHUNK).to(tl.int64)
        acc += tl.load(base + idx, mask=idx < hi, other=0.0)
    total = tl.sum(acc, axis=0)
    if which == 0:
        tl.store(out_a + t, total)
    else:
        tl.store(out_b + t, total)


def sumsq_buffers(tab: dict, bm: BlockMap, device) -> None:
    """Persistent scratch for the per-tensor norms: partials [2 x blocks] and sums [2 x tensors].

    Allocated with the plan and reused every step (stream order makes that safe, and a CUDA graph
    needs fixed addresses)."""
    tab["part"] = torch.empty(2 * bm.num_blocks, device=device, dtype=torch.float32)
    sq = torch.empty(2, bm.num_tensors, device=device, dtype=torch.float32)
    tab["sq0"], tab["sq1"] = sq[0], sq[1]  # views made once: indexing is a dispatched op per call


def per_tensor_sumsq(tab: dict, bm: BlockMap, a_ptrs, b_ptrs, dtype_a, dtype_b, device, is_aligned: bool,
                     warps: int, out_a=None):
    """(sum a^2, sum b^2) per tensor, fp32 [T] each, in two launches (sweep, then both reductions).

    ``out_a``: where the first sums go (a slice of a larger buffer), by default the table's own."""
    part = tab["part"]  # allocated with the plan (sumsq_buffers)
    out_a = tab["sq0"] if out_a is None else out_a
    _sumsq_partials_kernel[(bm.num_blocks,)](a_ptrs, b_ptrs, bm.blk_tensor, bm.blk_start, bm.sizes, part,
                                             bm.num_blocks, DTYPE_A=TL_DTYPES[dtype_a], DTYPE_B=TL_DTYPES[dtype_b],
                                             ALIGNED=is_aligned, BLOCK=bm.block, num_warps=warps)
    reduce_partials(bm, part, out_a, tab["sq1"], 2)
    return out_a, tab["sq1"]


def reduce_partials(bm: BlockMap, part: torch.Tensor, out_a: torch.Tensor, out_b: torch.Tensor, count: int) -> None:
    """Per-tensor sums of ``count`` (1 or 2) partial arrays laid end to end in ``part``."""
    chunk = min(1024, triton.next_power_of_2(max(bm.max_blocks, 1)))
    _reduce_partials_kernel[(bm.num_tensors, count)](part, bm.first_blk, out_a, out_b, bm.num_blocks,
                                                     MAX_BLOCKS=triton.cdiv(bm.max_blocks, chunk) * chunk, CHUNK=chunk)


class DeviceLR:
    """Learning rates the kernels read from device memory, for a step replayed as a CUDA graph.

    By default a launch takes each group's ``lr`` as a scalar argument, which a captured graph
    would freeze. With ``lr_on_device = True`` the kernels read ``lr_tensor(gi)`` instead and the
    host refreshes it with ``set_device_lrs()`` (a fill per group, outside the graph) whenever the
    schedule moves. Same fp32 value either way, so both paths give the same bits.
    """

    lr_on_device = False

    def lr_tensor(self, gi: int, device) -> torch.Tensor:
        store = self.__dict__.setdefault("_lr_dev", {})
        if gi not in store:
            store[gi] = torch.full((1,), float(self.param_groups[gi]["lr"]), dtype=torch.float32, device=device)
        return store[gi]

    def bind_device_lr(self, gi: int, t: torch.Tensor) -> None:
        """Group ``gi`` reads its LR from ``t`` (one fp32 element, e.g. a row of a device schedule
        table the step refreshes on the device)."""
        if t.numel() != 1 or t.dtype != torch.float32:
            raise ValueError(f"bind_device_lr: group {gi}: need one fp32 element, got {t.dtype} of shape {tuple(t.shape)}")
        self.__dict__.setdefault("_lr_dev", {})[gi] = t

    def set_device_lrs(self) -> None:
        for gi, group in enumerate(self.param_groups):
            if group["params"]:
                self.lr_tensor(gi, group["params"][0].device).fill_(float(group["lr"]))

    def _lr_args(self, gi: int, group: dict, device, dummy: torch.Tensor):
        """(pointer, value, LR_IS_PTR) for a launch."""
        if self.lr_on_device:
            return self.lr_tensor(gi, device), 0.0, True
        return dummy, float(group["lr"]), False


_NO_SKIP: dict = {}  # device -> a zero flag that is never written


def skip_flag(skip, device) -> tuple[torch.Tensor, bool]:
    """A device int32 flag (1 = skip the step) and whether one was given."""
    if skip is None:
        flag = _NO_SKIP.get(device)
        if flag is None:
            flag = _NO_SKIP[device] = torch.zeros(1, dtype=torch.int32, device=device)
        return flag, False
    if not isinstance(skip, torch.Tensor) or skip.numel() != 1:
        raise ValueError("skip must be None or a one-element tensor on the parameters' device (nonzero = skip)")
    return int_flag(skip, device), True


def int_flag(t: torch.Tensor, device) -> torch.Tensor:
    """A one-element tensor as the int32 [1] device flag the kernels read: any nonzero value is set
    (0.5 included, as in the references); an int32 flag is used as it is, with no op."""
    flag = t.reshape(1).to(device=device)
    return flag if flag.dtype == torch.int32 else (flag != 0).to(torch.int32)
