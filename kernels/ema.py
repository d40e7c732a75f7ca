"""Multi-tensor EMA of the teacher: theta_t <- tau theta_t + (1 - tau) theta_s in one launch per dtype.

Why a pointer table and not flat buffers: flat buffers would force every model, optimizer,
checkpoint and DDP bucket to agree on one storage layout. A table of (pointer, size) per tensor
and a block table (tensor index, start) lets one launch sweep all 66 tensors of the ResNet-18
teacher wherever they live, with no copies; the tables are built once per parameter list and
cached (parameters never move during training).

Memory: one pass, reading teacher and student and writing the teacher: 12 B per fp32 element (6 per
bf16), exactly what a flat-buffer ``lerp_`` moves. Full blocks go unmasked with 128-bit accesses
(16-byte aligned pointers, checked once per plan); a tensor's last block is masked.

The arithmetic is torch's ``lerp`` (weight w = 1 - tau): ``t + w (s - t)`` for w < 0.5, else
``s - (s - t)(1 - w)`` (as FMAs), so tau = 1 leaves the teacher bit-identical and tau = 0 copies
the student, and results match ``torch._foreach_lerp_`` to within one ulp of the operands
(FMA contraction may differ between torch's and Triton's builds by one rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import require_triton, triton_available
from ._multi_tensor import (
    TL_DTYPES,
    _block_coords,
    _ld,
    _st,
    _tensor_ptr,
    check_span_layout,
    num_warps,
    pair_plan,
)

__all__ = ["ema_update_", "ema_update_reference_", "ema_update_loop_"]


@triton.jit
def _ema_body(tp, sp, offs, mask, w, MASKED: tl.constexpr):
    t = _ld(tp, offs, mask, MASKED)
    s = _ld(sp, offs, mask, MASKED)
    diff = s - t
    # torch's lerp as nvcc contracts it: fma(w, diff, t) or fma(-diff, 1 - w, s)
    _st(tp, offs, tl.where(w < 0.5, tl.fma(w, diff, t), tl.fma(-diff, 1.0 - w, s)), mask, MASKED)


@triton.jit
def _ema_fwd_kernel(t_ptrs, s_ptrs, sizes, blk_tensor, blk_start, tau_ptr, tau_val,
                    TAU_IS_PTR: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """One pass: reads teacher and student, writes teacher (12 B per fp32 element, 6 B per bf16)."""
    pid, ti, offs, mask, full = _block_coords(blk_tensor, blk_start, sizes, BLOCK)
    tp = _tensor_ptr(t_ptrs, ti, DTYPE, ALIGNED)
    sp = _tensor_ptr(s_ptrs, ti, DTYPE, ALIGNED)
    if TAU_IS_PTR:
        tau = tl.load(tau_ptr).to(tl.float32)
    else:
        tau = tau_val  # a Python float arrives as an fp32 scalar
    w = 1.0 - tau
    if full:
        _ema_body(tp, sp, offs, mask, w, False)
    else:
        _ema_body(tp, sp, offs, mask, w, True)


def _check_lists(fn, teacher, student):
    teacher, student = list(teacher), list(student)
    if len(teacher) != len(student):
        raise ValueError(f"{fn}: {len(teacher)} teacher tensors but {len(student)} student tensors")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.shape != s.shape:
            raise ValueError(f"{fn}: tensor {i}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")
        if t.dtype != s.dtype or t.device != s.device:
            raise ValueError(f"{fn}: tensor {i}: teacher {t.dtype}@{t.device} vs student {s.dtype}@{s.device}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: tensor {i} is {t.dtype}; EMA averages floating-point parameters only")
    return teacher, student


@torch.no_grad()
def ema_update_(teacher, student, tau, impl: str = "auto") -> None:
    """In place over all tensors: teacher <- tau * teacher + (1 - tau) * student.

    ``tau``: a Python float or a 0-d tensor on the parameters' device (read in the kernel: no
    host sync and no recompilation when it changes). ``impl``: 'auto' (Triton where it can run,
    else ``_foreach_lerp_``), 'triton', or 'reference'. Any dense, non-overlapping layout works
    (channels-last included: each tensor is swept as its storage span) as long as teacher and
    student tensor share strides; otherwise a clear error names the tensor before anything is written.
    """
    teacher, student = list(teacher), list(student)
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"ema_update_: impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if isinstance(tau, torch.Tensor) and tau.numel() != 1:
        raise ValueError(f"ema_update_: tau must be a float or a 0-d tensor, got shape {tuple(tau.shape)}")
    if not teacher or not student:
        _check_lists("ema_update_", teacher, student)
        return
    device = teacher[0].device
    if not (impl == "triton" or (impl == "auto" and triton_available(device))):
        return ema_update_reference_(*_check_lists("ema_update_", teacher, student), tau)
    require_triton("ema_update_", device)
    tau_is_ptr = isinstance(tau, torch.Tensor)
    tau_t = tau.reshape(()).to(device=device) if tau_is_ptr else teacher[0]
    warps = num_warps("ema", device)
    for dt, idx, bm, t_ptrs, s_ptrs, is_aligned in pair_plan("ema", teacher, student, device, _validate, TL_DTYPES):
        if bm is None:  # float64 and other dtypes the kernel does not take
            ema_update_reference_([teacher[i] for i in idx], [student[i] for i in idx], tau)
            continue
        _ema_fwd_kernel[(bm.num_blocks,)](t_ptrs, s_ptrs, bm.sizes, bm.blk_tensor, bm.blk_start, tau_t,
                                          0.0 if tau_is_ptr else float(tau), TAU_IS_PTR=tau_is_ptr,
                                          DTYPE=TL_DTYPES[dt], ALIGNED=is_aligned, BLOCK=bm.block, num_warps=warps)


def _validate(teacher, student) -> None:
    """Every check before anything is written."""
    teacher, student = _check_lists("ema_update_", teacher, student)
    for i, (t, s) in enumerate(zip(teacher, student)):
        check_span_layout("ema_update_", i, t, {"student tensor": s})


@torch.no_grad()
def ema_update_reference_(teacher, student, tau) -> None:
    """Reference: ``torch._foreach_lerp_(teacher, student, 1 - tau)`` (tau float or 0-d tensor)."""
    teacher, student = list(teacher), list(student)
    if not teacher:
        return
    w = 1.0 - tau
    if isinstance(w, torch.Tensor):
        w = w.to(device=teacher[0].device, dtype=torch.float32).reshape(())
    torch._foreach_lerp_(teacher, student, w)


@torch.no_grad()
def ema_update_loop_(teacher, student, tau) -> None:
    """What common SSL code does: one lerp launch per parameter (benchmark baseline)."""
    for t, s in zip(teacher, student):
        t.lerp_(s, 1.0 - tau)
