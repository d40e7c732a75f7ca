"""Multi-tensor plumbing shared by the fused optimizers: pointer tables, block maps, norms.

A multi-tensor launch sweeps many tensors in one grid. Program ``i`` handles elements
``[blk_start[i], blk_start[i] + BLOCK)`` of tensor ``blk_tensor[i]``; per-tensor pointers come
from int64 tables. Tables of parameters and optimizer state never change after the first step
and are cached; gradient pointers change whenever ``zero_grad(set_to_none=True)`` frees them,
so their table is rebuilt when they moved and sent with a pinned, non-blocking copy (a pageable
host-to-device copy would synchronize the stream).

Layouts: every tensor is swept as its storage span ``[data_ptr, data_ptr + numel)``, which is
exact for any dense, non-overlapping layout (contiguous, channels-last, ...). Element ``k`` of the
span is the same logical element in a parameter, its gradient and its state as long as all three
share strides; ``check_span_layout`` enforces that and ``match_layout_`` re-lays state once.

Norms are deterministic: each program writes the partial sum of its block, then one program per
tensor adds its blocks' partials in a fixed order (no atomics), so a resumed run reproduces an
uninterrupted one bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements per program on CUDA: 15.4M params -> ~3.8k programs for 132 SMs; untuned on GPU yet
# Under TRITON_INTERPRET=1 a program costs Python overhead whatever its size, so CPU runs take
# large blocks (a channels-last ResNet-18 launch: ~230 programs instead of ~2,800; measured
# 11 s vs 20 s per LARS step at 1 << 18, per-element cost rising past that). Tests lower it
# to cover many blocks per tensor on small shapes.
INTERPRETER_BLOCK = 1 << 16
_MAX_BLOCKS_PER_TENSOR = 1 << 20


def block_size(device: torch.device) -> int:
    """Elements per program for a multi-tensor launch on ``device``."""
    return BLOCK if device.type == "cuda" else INTERPRETER_BLOCK

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def device_int_tensor(values, device, dtype=torch.int64) -> torch.Tensor:
    """A small host list on the device without a stream sync (pinned + non_blocking on CUDA)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class BlockMap:
    """Static block map and per-tensor tables for an ordered list of same-dtype tensors."""

    def __init__(self, tensors: list[torch.Tensor], device: torch.device):
        self.block = block = block_size(device)
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


def ptr_table(tensors: list[torch.Tensor], device) -> torch.Tensor:
    return device_int_tensor([t.data_ptr() for t in tensors], device)


def pairs_by_dtype(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    """{dtype: (tensors of ``a``, their partners in ``b``)}: one launch per dtype for paired sweeps."""
    groups: dict = {}
    for x, y in zip(a, b):
        xs, ys = groups.setdefault(x.dtype, ([], []))
        xs.append(x)
        ys.append(y)
    return groups


_PAIR_TABLES: dict = {}


def pair_tables(a: list[torch.Tensor], b: list[torch.Tensor], device):
    """(block map over ``a``, pointers of ``a``, pointers of ``b``) for two same-shape tensor lists
    swept together (EMA teacher/student, restore destination/source); built once and cached."""
    key = tuple((x.data_ptr(), y.data_ptr(), x.numel()) for x, y in zip(a, b))
    tab = _PAIR_TABLES.get(key)
    if tab is None:
        if len(_PAIR_TABLES) > 64:
            _PAIR_TABLES.clear()
        tab = _PAIR_TABLES[key] = (BlockMap(a, device), ptr_table(a, device), ptr_table(b, device))
    return tab


def grad_table(tab: dict, params: list[torch.Tensor], device) -> torch.Tensor:
    """The gradient pointer table, rebuilt only when a gradient moved.

    With persistent gradients (``zero_grad(set_to_none=False)``, as the product's step does) the
    pointers never change and no table is sent after the first step; with ``set_to_none=True``
    each step's fresh gradients need a new table (one small pinned copy).
    """
    ptrs = tuple(p.grad.data_ptr() for p in params)
    if tab.get("g_key") != ptrs:
        tab["g_key"], tab["g"] = ptrs, device_int_tensor(list(ptrs), device)
    return tab["g"]


@triton.jit
def _load_block(ptrs, ti, offs, mask, DTYPE: tl.constexpr):
    p = tl.load(ptrs + ti).to(tl.pointer_type(DTYPE))
    return tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _block_coords(blk_tensor, blk_start, sizes, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    ti = tl.load(blk_tensor + pid).to(tl.int64)
    offs = tl.load(blk_start + pid) + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < tl.load(sizes + ti)
    return pid, ti, offs, mask


@triton.jit
def _sumsq_partials_kernel(a_ptrs, b_ptrs, blk_tensor, blk_start, sizes, part_a, part_b,
                           DTYPE_A: tl.constexpr, DTYPE_B: tl.constexpr, BLOCK: tl.constexpr):
    """Per block: sum(a^2) and sum(b^2) (fp32) into part_a[pid], part_b[pid]."""
    pid, ti, offs, mask = _block_coords(blk_tensor, blk_start, sizes, BLOCK)
    a = _load_block(a_ptrs, ti, offs, mask, DTYPE_A)
    b = _load_block(b_ptrs, ti, offs, mask, DTYPE_B)
    tl.store(part_a + pid, tl.sum(a * a, axis=0))
    tl.store(part_b + pid, tl.sum(b * b, axis=0))


@triton.jit
def _reduce_partials_kernel(part, first_blk, out, MAX_BLOCKS: tl.constexpr, CHUNK: tl.constexpr):
    """out[t] = sum of part[first_blk[t] : first_blk[t+1]], in a fixed order (deterministic)."""
    t = tl.program_id(0).to(tl.int64)
    lo = tl.load(first_blk + t).to(tl.int64)
    hi = tl.load(first_blk + t + 1).to(tl.int64)
    acc = tl.zeros((CHUNK,), dtype=tl.float32)
    for start in range(0, MAX_BLOCKS, CHUNK):
        idx = lo + start + tl.arange(0, CHUNK).to(tl.int64)
        acc += tl.load(part + idx, mask=idx < hi, other=0.0)
    tl.store(out + t, tl.sum(acc, axis=0))


def per_tensor_sumsq(bm: BlockMap, a_ptrs, b_ptrs, dtype_a, dtype_b, device):
    """(sum a^2, sum b^2) per tensor, fp32 [T] each, in two launches + one per output."""
    part_a = torch.empty(bm.num_blocks, device=device, dtype=torch.float32)
    part_b = torch.empty(bm.num_blocks, device=device, dtype=torch.float32)
    _sumsq_partials_kernel[(bm.num_blocks,)](a_ptrs, b_ptrs, bm.blk_tensor, bm.blk_start, bm.sizes, part_a, part_b,
                                             DTYPE_A=TL_DTYPES[dtype_a], DTYPE_B=TL_DTYPES[dtype_b], BLOCK=bm.block)
    return reduce_partials(bm, part_a, device), reduce_partials(bm, part_b, device)


def reduce_partials(bm: BlockMap, part: torch.Tensor, device) -> torch.Tensor:
    out = torch.empty(bm.num_tensors, device=device, dtype=torch.float32)
    chunk = min(1024, triton.next_power_of_2(max(bm.max_blocks, 1)))
    _reduce_partials_kernel[(bm.num_tensors,)](part, bm.first_blk, out, MAX_BLOCKS=triton.cdiv(bm.max_blocks, chunk) * chunk,
                                               CHUNK=chunk)
    return out


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

    def set_device_lrs(self) -> None:
        for gi, group in enumerate(self.param_groups):
            if group["params"]:
                self.lr_tensor(gi, group["params"][0].device).fill_(float(group["lr"]))

    def _lr_args(self, gi: int, group: dict, device, dummy: torch.Tensor):
        """(pointer, value, LR_IS_PTR) for a launch."""
        if self.lr_on_device:
            return self.lr_tensor(gi, device), 0.0, True
        return dummy, float(group["lr"]), False


def skip_flag(skip, device) -> tuple[torch.Tensor, bool]:
    """A device int32 flag (1 = skip the step) and whether one was given."""
    if skip is None:
        return torch.zeros(1, dtype=torch.int32, device=device), False
    if not isinstance(skip, torch.Tensor) or skip.numel() != 1:
        raise ValueError("skip must be None or a one-element tensor on the parameters' device (nonzero = skip)")
    return skip.reshape(1).to(device=device, dtype=torch.int32), True
