"""Multi-tensor plumbing shared by the fused optimizers: pointer tables, block maps, norms.

A multi-tensor launch sweeps many tensors in one grid. Program ``i`` handles elements
``[blk_start[i], blk_start[i] + BLOCK)`` of tensor ``blk_tensor[i]``; per-tensor pointers come
from int64 tables. Tables of parameters and optimizer state never change after the first step
and are cached; gradient pointers change whenever ``zero_grad(set_to_none=True)`` frees them,
so their table is rebuilt every step and sent with a pinned, non-blocking copy (a pageable
host-to-device copy would synchronize the stream).

Norms are deterministic: each program writes the partial sum of its block, then one program per
tensor adds its blocks' partials in a fixed order (no atomics), so a resumed run reproduces an
uninterrupted one bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements per program: 15.4M params -> ~3.8k programs for 132 SMs; untuned on GPU yet
_MAX_BLOCKS_PER_TENSOR = 1 << 20

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
        self.sizes_list = [t.numel() for t in tensors]
        blk_tensor, blk_start, first = [], [], []
        for i, n in enumerate(self.sizes_list):
            first.append(len(blk_tensor))
            nb = max(1, triton.cdiv(n, BLOCK))
            if nb > _MAX_BLOCKS_PER_TENSOR:
                raise ValueError(f"tensor {i} has {n} elements; at most {_MAX_BLOCKS_PER_TENSOR * BLOCK} are supported")
            blk_tensor += [i] * nb
            blk_start += [j * BLOCK for j in range(nb)]
        first.append(len(blk_tensor))
        self.num_tensors = len(tensors)
        self.num_blocks = len(blk_tensor)
        self.numel = sum(self.sizes_list)
        self.sizes = device_int_tensor(self.sizes_list, device)
        self.blk_tensor = device_int_tensor(blk_tensor, device, torch.int32)
        self.blk_start = device_int_tensor(blk_start, device)
        self.first_blk = device_int_tensor(first, device, torch.int32)
        self.max_blocks = max(b - a for a, b in zip(first[:-1], first[1:]))


def ptr_table(tensors: list[torch.Tensor], device) -> torch.Tensor:
    return device_int_tensor([t.data_ptr() for t in tensors], device)


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
                                             DTYPE_A=TL_DTYPES[dtype_a], DTYPE_B=TL_DTYPES[dtype_b], BLOCK=BLOCK)
    return reduce_partials(bm, part_a, device), reduce_partials(bm, part_b, device)


def reduce_partials(bm: BlockMap, part: torch.Tensor, device) -> torch.Tensor:
    out = torch.empty(bm.num_tensors, device=device, dtype=torch.float32)
    chunk = min(1024, triton.next_power_of_2(max(bm.max_blocks, 1)))
    _reduce_partials_kernel[(bm.num_tensors,)](part, bm.first_blk, out, MAX_BLOCKS=triton.cdiv(bm.max_blocks, chunk) * chunk,
                                               CHUNK=chunk)
    return out


def skip_flag(skip, device) -> tuple[torch.Tensor, bool]:
    """A device int32 flag (1 = skip the step) and whether one was given."""
    if skip is None:
        return torch.zeros(1, dtype=torch.int32, device=device), False
    if not isinstance(skip, torch.Tensor) or skip.numel() != 1:
        raise ValueError("skip must be None or a one-element tensor on the parameters' device (nonzero = skip)")
    return skip.reshape(1).to(device=device, dtype=torch.int32), True
