"""Fused multi-tensor LARS with solo-learn's semantics (METHOD.md §3.1), and its plain reference.

Per parameter p with gradient g, group lr and weight decay wd:
- ``p.ndim == 1`` with ``exclude_bias_n_norm`` (biases, BN weights): plain SGD-momentum on g,
  no LARS scaling and no weight decay;
- else, when ||p|| != 0 and ||g|| != 0: r = eta ||p|| / (||g|| + wd ||p|| + eps), with
  ``clip_lr`` r = min(r / lr, 1), and the direction is (g + wd p) r; otherwise g alone;
- buf = momentum buf + d (the first buf is d), p = p - lr buf (no Nesterov, no dampening).

Common SSL code runs this as a Python loop with two host synchronizations per tensor
(``p_norm != 0``). Here: two launches for the per-tensor norms (deterministic, no atomics), then
one launch per group and dtype for direction, momentum and update; no host sync.
``step(skip=flag)`` makes the step a no-op on the device (parameters and buffers untouched).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import run_closure, triton_available
from ._multi_tensor import (
    TL_DTYPES,
    BlockMap,
    DeviceLR,
    _block_coords,
    _load_block,
    check_span_layout,
    device_int_tensor,
    grad_table,
    match_layout_,
    per_tensor_sumsq,
    ptr_table,
    skip_flag,
)

__all__ = ["FusedLARS", "LARSReference"]


@triton.jit
def _lars_kernel(g_ptrs, p_ptrs, buf_ptrs, blk_tensor, blk_start, sizes, p_sumsq, g_sumsq, exclude, skip_ptr,
                 lr_ptr, lr_val, wd, eta, eps, momentum, LR_IS_PTR: tl.constexpr, CLIP_LR: tl.constexpr,
                 DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid, ti, offs, mask = _block_coords(blk_tensor, blk_start, sizes, BLOCK)
    if LR_IS_PTR:
        lr = tl.load(lr_ptr)
    else:
        lr = lr_val
    keep = tl.load(skip_ptr) == 0
    pn = tl.sqrt(tl.load(p_sumsq + ti))
    gn = tl.sqrt(tl.load(g_sumsq + ti))
    # the same operation order as the reference: p / (g + p wd + eps) * eta, then min(r / lr, 1)
    r = pn / (gn + pn * wd + eps)
    r = r * eta
    if CLIP_LR:
        q = r / lr
        r = tl.where(1.0 < q, 1.0, q)  # Python's min(q, 1): NaN stays NaN
    adapt = (tl.load(exclude + ti) == 0) & (pn != 0.0) & (gn != 0.0)
    g = _load_block(g_ptrs, ti, offs, mask, DTYPE)
    pp = tl.load(p_ptrs + ti).to(tl.pointer_type(DTYPE))
    p = tl.load(pp + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.where(adapt, (g + wd * p) * r, g)
    bp = tl.load(buf_ptrs + ti).to(tl.pointer_type(DTYPE))
    buf = tl.load(bp + offs, mask=mask, other=0.0).to(tl.float32)
    buf = buf * momentum + d
    tl.store(bp + offs, buf.to(DTYPE), mask=mask & keep)
    tl.store(pp + offs, (p - lr * buf).to(DTYPE), mask=mask & keep)


class _LARSBase(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02,
                 eps: float = 1e-8, clip_lr: bool = True, exclude_bias_n_norm: bool = True):
        who = type(self).__name__
        if not lr >= 0.0:
            raise ValueError(f"{who}: invalid learning rate lr={lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"{who}: invalid momentum={momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"{who}: invalid weight_decay={weight_decay}")
        if not eta > 0.0:
            raise ValueError(f"{who}: invalid eta={eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps, clip_lr=clip_lr,
                        exclude_bias_n_norm=exclude_bias_n_norm)
        super().__init__(params, defaults)


class LARSReference(_LARSBase):
    """solo-learn's LARS as written (a Python loop; two host syncs per tensor). The readable reference."""

    @torch.no_grad()
    def step(self, closure=None, *, skip=None):
        loss = run_closure(closure)
        if skip is not None and bool(skip):
            return loss
        for group in self.param_groups:
            wd, mom, lr = group["weight_decay"], group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                p_norm, g_norm = torch.norm(p), torch.norm(p.grad)
                if p.ndim != 1 or not group["exclude_bias_n_norm"]:
                    if p_norm != 0 and g_norm != 0:
                        lars_lr = p_norm / (g_norm + p_norm * wd + group["eps"])
                        lars_lr = lars_lr * group["eta"]
                        if group["clip_lr"]:
                            lars_lr = min(lars_lr / lr, 1)
                        d_p = d_p.add(p, alpha=wd)
                        d_p = d_p * lars_lr
                st = self.state[p]
                if "momentum_buffer" not in st:
                    buf = st["momentum_buffer"] = torch.clone(d_p).detach()
                else:
                    buf = st["momentum_buffer"]
                    buf.mul_(mom).add_(d_p)
                p.add_(buf, alpha=-lr)
        return loss


class FusedLARS(DeviceLR, _LARSBase):
    """Multi-tensor LARS (no host syncs). ``step(closure=None, *, skip=None)``: nonzero ``skip`` = no-op.

    Momentum buffers start at zero (``0.9 * 0 + d == d`` exactly, the reference's first clone) in
    their parameter's layout. Parameters may have any dense, non-overlapping layout (channels-last
    conv weights included): the kernels sweep each tensor's storage span, so parameter, gradient and
    buffer only need the same strides; anything else is an error naming the parameter, raised
    before anything is written.
    On a device where Triton cannot run it falls back to the reference.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cache: dict = {}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._cache.clear()

    @torch.no_grad()
    def step(self, closure=None, *, skip=None):
        loss = run_closure(closure)
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return loss
        device = params[0].device
        if not triton_available(device):
            LARSReference.step(self, skip=skip)
            return loss
        # every check before anything is written
        lists = []
        index = 0
        for gi, group in enumerate(self.param_groups):
            by_dtype: dict = {}
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.dtype not in TL_DTYPES:
                    raise RuntimeError(f"FusedLARS supports float32, float16 and bfloat16 parameters, got {p.dtype} "
                                       f"(parameter {index - 1})")
                check_span_layout("FusedLARS", index - 1, p, {"gradient": p.grad})
                by_dtype.setdefault(p.dtype, []).append(p)
            lists += [(gi, group, dt, ps) for dt, ps in by_dtype.items()]
        flag, _ = skip_flag(skip, device)
        for gi, group, dt, ps in lists:
            for p in ps:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p)  # preserve_format: the parameter's layout
                else:
                    match_layout_(st, "momentum_buffer", p)
            key = (gi, dt, tuple(p.data_ptr() for p in ps), tuple(self.state[p]["momentum_buffer"].data_ptr() for p in ps))
            tab = self._cache.get(key)
            if tab is None:
                excl = [int(p.ndim == 1 and group["exclude_bias_n_norm"]) for p in ps]
                tab = dict(bm=BlockMap(ps, device), p=ptr_table(ps, device),
                           excl=device_int_tensor(excl, device, torch.int32),
                           buf=ptr_table([self.state[p]["momentum_buffer"] for p in ps], device))
                self._cache[key] = tab
            bm = tab["bm"]
            g_ptrs = grad_table(tab, ps, device)
            gsq, psq = per_tensor_sumsq(bm, g_ptrs, tab["p"], dt, dt, device)
            lr_ptr, lr_val, lr_is_ptr = self._lr_args(gi, group, device, flag)
            _lars_kernel[(bm.num_blocks,)](
                g_ptrs, tab["p"], tab["buf"], bm.blk_tensor, bm.blk_start, bm.sizes, psq, gsq, tab["excl"], flag,
                lr_ptr, lr_val, float(group["weight_decay"]), float(group["eta"]), float(group["eps"]),
                float(group["momentum"]), LR_IS_PTR=lr_is_ptr, CLIP_LR=bool(group["clip_lr"]), DTYPE=TL_DTYPES[dt],
                BLOCK=bm.block)
        return loss
