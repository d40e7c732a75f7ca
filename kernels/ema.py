"""Multi-tensor EMA of the teacher: theta_t <- tau theta_t + (1 - tau) theta_s in one launch per dtype.

Why a pointer table and not flat buffers: flat buffers would force every model, optimizer,
checkpoint and DDP bucket to agree on one storage layout. A table of (pointer, size) per tensor
and a block table (tensor index, start) lets one launch sweep all 66 tensors of the ResNet-18
teacher wherever they live, with no copies; the tables are built once per parameter list and
cached (parameters never move during training).

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
from ._multi_tensor import TL_DTYPES, check_span_layout, pair_tables, pairs_by_dtype

__all__ = ["ema_update_", "ema_update_reference_", "ema_update_loop_"]


@triton.jit
def _ema_fwd_kernel(t_ptrs, s_ptrs, sizes, blk_tensor, blk_start, tau_ptr, tau_val,
                    TAU_IS_PTR: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    ti = tl.load(blk_tensor + pid).to(tl.int64)
    start = tl.load(blk_start + pid)
    n = tl.load(sizes + ti)
    tp = tl.load(t_ptrs + ti).to(tl.pointer_type(DTYPE))
    sp = tl.load(s_ptrs + ti).to(tl.pointer_type(DTYPE))
    if TAU_IS_PTR:
        tau = tl.load(tau_ptr).to(tl.float32)
    else:
        tau = tau_val  # a Python float arrives as an fp32 scalar
    w = 1.0 - tau
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    t = tl.load(tp + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sp + offs, mask=mask, other=0.0).to(tl.float32)
    diff = s - t
    # torch's lerp as nvcc contracts it: fma(w, diff, t) or fma(-diff, 1 - w, s)
    out = tl.where(w < 0.5, tl.fma(w, diff, t), tl.fma(-diff, 1.0 - w, s))
    tl.store(tp + offs, out.to(DTYPE), mask=mask)


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
    teacher, student = _check_lists("ema_update_", teacher, student)
    if not teacher:
        return
    if isinstance(tau, torch.Tensor) and tau.numel() != 1:
        raise ValueError(f"ema_update_: tau must be a float or a 0-d tensor, got shape {tuple(tau.shape)}")
    device = teacher[0].device
    use = impl == "triton" or (impl == "auto" and triton_available(device))
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"ema_update_: impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if not use:
        return ema_update_reference_(teacher, student, tau)
    require_triton("ema_update_", device)
    for i, (t, s) in enumerate(zip(teacher, student)):  # before anything is written
        check_span_layout("ema_update_", i, t, {"student tensor": s})
    groups = pairs_by_dtype(teacher, student)
    tau_is_ptr = isinstance(tau, torch.Tensor)
    tau_t = tau.reshape(()).to(device=device) if tau_is_ptr else teacher[0]
    for dt, (ts, ss) in groups.items():
        if dt not in TL_DTYPES:
            ema_update_reference_(ts, ss, tau)
            continue
        bm, t_ptrs, s_ptrs = pair_tables(ts, ss, device)
        _ema_fwd_kernel[(bm.num_blocks,)](t_ptrs, s_ptrs, bm.sizes, bm.blk_tensor, bm.blk_start, tau_t,
                                          0.0 if tau_is_ptr else float(tau), TAU_IS_PTR=tau_is_ptr,
                                          DTYPE=TL_DTYPES[dt], BLOCK=bm.block)


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
