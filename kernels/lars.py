"""Fused multi-tensor LARS with solo-learn's semantics (METHOD.md §3.1), and its plain reference.

Per parameter p with gradient g, group lr and weight decay wd:
- ``p.ndim == 1`` with ``exclude_bias_n_norm`` (biases, BN weights): plain SGD-momentum on g,
  no LARS scaling and no weight decay;
- else, when ||p|| != 0 and ||g|| != 0: r = eta ||p|| / (||g|| + wd ||p|| + eps), with
  ``clip_lr`` r = min(r / lr, 1), and the direction is (g + wd p) r; otherwise g alone;
- buf = momentum buf + d (the first buf is d), p = p - lr buf (no Nesterov, no dampening).

Common SSL code runs this as a Python loop with two host synchronizations per tensor
(``p_norm != 0``). Here, per group and dtype, three launches: the norm sweep (reads g and p: 8 B
per fp32 element), the per-tensor reductions of both norms (deterministic, no atomics), and the
update (reads g, p, buf, writes buf and p: 20 B): 28 B per element in two sweeps, the fewest a
norm-before-update dependency allows; bf16 halves every figure. No host sync. Plans (validated
lists, pointer tables, scratch) are built once and reused while no parameter moves.
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
    _ld,
    _st,
    _tensor_ptr,
    aligned,
    device_int_tensor,
    ensure_state,
    grouped_params,
    note_capture,
    num_warps,
    params_key,
    per_tensor_sumsq,
    ptr_list,
    refresh_grads,
    skip_flag,
    state_current,
    sumsq_buffers,
)

__all__ = ["FusedLARS", "LARSReference"]


@triton.jit
def _lars_body(gp, pp, bp, offs, mask, r, adapt, wd, momentum, lr, MASKED: tl.constexpr):
    g = _ld(gp, offs, mask, MASKED)
    p = _ld(pp, offs, mask, MASKED)
    buf = _ld(bp, offs, mask, MASKED)
    d = tl.where(adapt, (g + wd * p) * r, g)
    buf = buf * momentum + d
    _st(bp, offs, buf, mask, MASKED)
    _st(pp, offs, p - lr * buf, mask, MASKED)


@triton.jit
def _lars_kernel(g_ptrs, p_ptrs, buf_ptrs, blk_tensor, blk_start, sizes, p_sumsq, g_sumsq, exclude, skip_ptr,
                 lr_ptr, lr_val, wd, eta, eps, momentum, LR_IS_PTR: tl.constexpr, CLIP_LR: tl.constexpr,
                 DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """One pass: reads g, p, buf and writes buf, p (20 B per fp32 element, 10 per bf16); nothing when skipped."""
    if tl.load(skip_ptr) == 0:
        pid, ti, offs, mask, full = _block_coords(blk_tensor, blk_start, sizes, BLOCK)
        if LR_IS_PTR:
            lr = tl.load(lr_ptr)
        else:
            lr = lr_val
        pn = tl.sqrt(tl.load(p_sumsq + ti))
        gn = tl.sqrt(tl.load(g_sumsq + ti))
        # the same operation order as the reference: p / (g + p wd + eps) * eta, then min(r / lr, 1)
        r = pn / (gn + pn * wd + eps)
        r = r * eta
        if CLIP_LR:
            q = r / lr
            r = tl.where(1.0 < q, 1.0, q)  # Python's min(q, 1): NaN stays NaN
        adapt = (tl.load(exclude + ti) == 0) & (pn != 0.0) & (gn != 0.0)
        gp = _tensor_ptr(g_ptrs, ti, DTYPE, ALIGNED)
        pp = _tensor_ptr(p_ptrs, ti, DTYPE, ALIGNED)
        bp = _tensor_ptr(buf_ptrs, ti, DTYPE, ALIGNED)
        if full:
            _lars_body(gp, pp, bp, offs, mask, r, adapt, wd, momentum, lr, False)
        else:
            _lars_body(gp, pp, bp, offs, mask, r, adapt, wd, momentum, lr, True)


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
        self._plans: dict = {}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._plans.clear()

    def _plan(self, device) -> dict:
        """Validated launch lists and tables for the current parameters and state, cached.

        Built on the first step, and again whenever a parameter's address, strides, shape or dtype
        changed, gradients appeared or vanished, a group changed its exclusion rule, or a momentum
        buffer is no longer the one the plan points to: every check before anything is written,
        momentum buffers created (or re-laid once) in their parameter's layout, then per (group,
        dtype) a block map, pointer tables and scratch for the norms.
        """
        groups = self.param_groups
        key = params_key("lars", device, groups, tuple(bool(g["exclude_bias_n_norm"]) for g in groups))
        plan = self._plans.get(key)
        if plan is not None and state_current(self.state, plan):
            return plan
        lists = grouped_params("FusedLARS", groups, self.state, ("momentum_buffer",))
        block = key[0]
        plan = {"lists": [], "gkey": None, "state": []}
        for gi, dt, ps in lists:
            (bufs,) = ensure_state(self.state, ps, ("momentum_buffer",), plan)
            excl = [int(p.ndim == 1 and groups[gi]["exclude_bias_n_norm"]) for p in ps]
            pp, bp = ptr_list(ps), ptr_list(bufs)
            bm = BlockMap(ps, device, block)
            tab = dict(bm=bm, ps=ps, p=device_int_tensor(pp, device), buf=device_int_tensor(bp, device),
                       excl=device_int_tensor(excl, device, torch.int32), aligned=aligned(pp, bp))
            sumsq_buffers(tab, bm, device)
            plan["lists"].append((gi, dt, tab))
        self._plans.clear()  # one plan at a time: old tables hold pointers to memory that may be freed
        self._plans[key] = plan
        return plan

    @torch.no_grad()
    def step(self, closure=None, *, skip=None):
        loss = run_closure(closure)
        first = next((p for g in self.param_groups for p in g["params"] if p.grad is not None), None)
        if first is None:
            return loss
        device = first.device
        if not triton_available(device):
            LARSReference.step(self, skip=skip)
            return loss
        plan = self._plan(device)
        note_capture(plan, device)
        refresh_grads("FusedLARS", plan, self.param_groups, device)
        flag, _ = skip_flag(skip, device)
        warps = num_warps("lars", device)
        for gi, dt, tab in plan["lists"]:
            group = self.param_groups[gi]
            bm, is_aligned = tab["bm"], tab["aligned"] and tab["g_aligned"]
            gsq, psq = per_tensor_sumsq(tab, bm, tab["g"], tab["p"], dt, dt, device, is_aligned, warps)
            lr_ptr, lr_val, lr_is_ptr = self._lr_args(gi, group, device, flag)
            _lars_kernel[(bm.num_blocks,)](
                tab["g"], tab["p"], tab["buf"], bm.blk_tensor, bm.blk_start, bm.sizes, psq, gsq, tab["excl"], flag,
                lr_ptr, lr_val, float(group["weight_decay"]), float(group["eta"]), float(group["eps"]),
                float(group["momentum"]), LR_IS_PTR=lr_is_ptr, CLIP_LR=bool(group["clip_lr"]), DTYPE=TL_DTYPES[dt],
                ALIGNED=is_aligned, BLOCK=bm.block, num_warps=warps)
        return loss
