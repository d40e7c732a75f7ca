"""Multi-tensor conditional restore: ``dst[i] <- src[i]`` for every tensor when a device flag is set.

What it is for: a skipped (non-finite) training step must change nothing, yet its forward pass
has already updated every BatchNorm's running statistics (student, teacher, heads: ~120 buffers
in the ResNet-18 model). The step snapshots them before the forward (one ``_foreach_copy_``) and,
after the non-finite check, restores them where the flag says so, in one launch per dtype, with no
host sync. A plain ``where`` per buffer would cost one launch each at CIFAR size, where launches
are the step's cost. One pass: reads src and writes dst only when the flag is set (8 or 12 B per
element when restoring, 0 otherwise beyond the flag).

Any dtype (float statistics, int64 batch counters): the kernel moves bits, it does no arithmetic,
so NaN and inf are restored exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import triton_available
from ._multi_tensor import TL_DTYPES, _block_coords, _tensor_ptr, check_span_layout, int_flag, num_warps, pair_plan

__all__ = ["restore_where_", "restore_where_reference_"]

_DTYPES = {**TL_DTYPES, torch.int64: tl.int64, torch.int32: tl.int32}  # bits are moved, so integers too


@triton.jit
def _restore_fwd_kernel(d_ptrs, s_ptrs, blk_tensor, blk_start, sizes, flag_ptr, DTYPE: tl.constexpr,
                        ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Flag set: reads the source and writes the destination (8 B per fp32 element); clear: nothing."""
    if tl.load(flag_ptr) != 0:
        pid, ti, offs, mask, full = _block_coords(blk_tensor, blk_start, sizes, BLOCK)
        dp = _tensor_ptr(d_ptrs, ti, DTYPE, ALIGNED)
        sp = _tensor_ptr(s_ptrs, ti, DTYPE, ALIGNED)
        if full:
            tl.store(dp + offs, tl.load(sp + offs))
        else:
            tl.store(dp + offs, tl.load(sp + offs, mask=mask, other=0), mask=mask)


def _flag(flag, device) -> torch.Tensor:
    if not isinstance(flag, torch.Tensor) or flag.numel() != 1:
        raise ValueError("restore_where_: flag must be a one-element tensor on the tensors' device (nonzero = restore)")
    return int_flag(flag, device)


def _check(dst, src):
    dst, src = list(dst), list(src)
    if len(dst) != len(src):
        raise ValueError(f"restore_where_: {len(dst)} destination tensors but {len(src)} sources")
    for i, (d, s) in enumerate(zip(dst, src)):
        if d.dtype != s.dtype or d.device != s.device:
            raise ValueError(f"restore_where_: tensor {i}: {d.dtype}@{d.device} vs source {s.dtype}@{s.device}")
    return dst, src


@torch.no_grad()
def restore_where_(dst, src, flag, impl: str = "auto") -> None:
    """In place: every ``dst[i] = src[i]`` when ``flag`` (a one-element device tensor) is nonzero.

    ``impl``: 'auto' (Triton where it can run, else the reference), 'triton' or 'reference'.
    Tensors of any dense layout; each source shares its destination's strides.
    """
    dst, src = list(dst), list(src)
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"restore_where_: impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if not dst or not src or impl == "reference" or not triton_available(dst[0].device):
        return restore_where_reference_(dst, src, flag)
    device = dst[0].device
    f = _flag(flag, device)
    warps = num_warps("restore", device)
    for dt, idx, bm, d_ptrs, s_ptrs, is_aligned in pair_plan("restore", dst, src, device, _validate, _DTYPES):
        if bm is None:  # dtypes the kernel does not take
            restore_where_reference_([dst[i] for i in idx], [src[i] for i in idx], f)
            continue
        _restore_fwd_kernel[(bm.num_blocks,)](d_ptrs, s_ptrs, bm.blk_tensor, bm.blk_start, bm.sizes, f,
                                              DTYPE=_DTYPES[dt], ALIGNED=is_aligned, BLOCK=bm.block, num_warps=warps)


def _validate(dst, src) -> None:
    """Every check before anything is written."""
    dst, src = _check(dst, src)
    for i, (d, s) in enumerate(zip(dst, src)):
        check_span_layout("restore_where_", i, d, {"source": s})


@torch.no_grad()
def restore_where_reference_(dst, src, flag) -> None:
    """Reference: ``d.copy_(torch.where(flag, s, d))`` per tensor (one launch each)."""
    dst, src = _check(dst, src)
    if not dst:
        return
    f = _flag(flag, dst[0].device).reshape(()).bool()
    for d, s in zip(dst, src):
        d.copy_(torch.where(f, s, d))

