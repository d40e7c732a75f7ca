"""Fused multi-tensor LAMB, a drop-in for ``apex.optimizers.FusedLAMB``, and its plain reference.

The math is apex's (``multi_tensor_lamb.cu``): one global gradient norm over every group,
clipping by ``max(||g|| / max_grad_norm, 1)``, Adam moments (``beta3 = 1 - beta1`` with
``grad_averaging``), bias correction ``1 - beta^step``, L2 (``adam_w_mode=False``: ``g + wd p``
enters the moments) or decoupled decay (``u = m^/(sqrt(v^) + eps) + wd p``), then the per-tensor
trust ratio ``lr ||p|| / ||u||`` (``||p||`` taken before the update) when ``weight_decay != 0`` or
``use_nvlamb``, falling back to ``lr`` when either norm is 0. As in apex, ``p`` is not read when
``weight_decay == 0`` (so an inf parameter does not turn ``0 * p`` into NaN).

Differences from apex, both deliberate: the update ``u`` goes to a workspace instead of
overwriting ``p.grad``; the step counter is a device tensor per group, so ``step(skip=flag)``
can make the whole step a no-op (parameters, moments and counter untouched) with no host sync.

Launches per step: 2 for the per-tensor norms of grads and params (all groups, one dtype), a
tiny torch op for the global norm, then per group and dtype 3 (moments + update, update norms,
parameter update). No host synchronization.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from ._common import require_triton, run_closure, triton_available
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
    reduce_partials,
    skip_flag,
)

__all__ = ["FusedLAMB", "LAMBReference"]


@triton.jit
def _bias_correction(beta, step):
    """1 - beta^step in fp64 (apex: std::pow in double on the fp32 beta), returned as fp32.

    ``beta`` arrives already rounded to fp32 by the host; adding the fp64 ``0 * step`` promotes
    the scalar to fp64 both compiled and under the interpreter (where scalars are Python floats).
    """
    s = step.to(tl.float64)
    b = beta + s * 0.0
    return (1.0 - tl.exp(s * tl.log(b))).to(tl.float32)


@triton.jit
def _lamb_stage1_kernel(g_ptrs, p_ptrs, m_ptrs, v_ptrs, ws, ws_off, blk_tensor, blk_start, sizes, part_u,
                        clip_ptr, step_ptr, skip_ptr, beta1, beta2, beta3, eps, wd,
                        BIAS_CORRECTION: tl.constexpr, ADAM_W: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid, ti, offs, mask = _block_coords(blk_tensor, blk_start, sizes, BLOCK)
    write = mask & (tl.load(skip_ptr) == 0)
    step = tl.load(step_ptr) + 1
    if BIAS_CORRECTION:
        bc1 = _bias_correction(beta1, step)
        bc2 = _bias_correction(beta2, step)
    else:
        bc1 = 1.0
        bc2 = 1.0
    clip = tl.load(clip_ptr)
    g = _load_block(g_ptrs, ti, offs, mask, DTYPE) / clip
    p = _load_block(p_ptrs, ti, offs, mask & (wd != 0.0), DTYPE)  # apex reads p only when decay != 0
    m_p = tl.load(m_ptrs + ti).to(tl.pointer_type(DTYPE))
    v_p = tl.load(v_ptrs + ti).to(tl.pointer_type(DTYPE))
    m = tl.load(m_p + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_p + offs, mask=mask, other=0.0).to(tl.float32)
    if not ADAM_W:
        g = g + wd * p
    m = m * beta1 + beta3 * g
    v = v * beta2 + (1 - beta2) * g * g
    u = (m / bc1) / (tl.sqrt(v / bc2) + eps)
    if ADAM_W:
        u = u + wd * p
    tl.store(m_p + offs, m.to(DTYPE), mask=write)
    tl.store(v_p + offs, v.to(DTYPE), mask=write)
    u = tl.where(mask, u, 0.0)
    tl.store(ws + tl.load(ws_off + ti) + offs, u, mask=mask)
    tl.store(part_u + pid, tl.sum(u * u, axis=0))


@triton.jit
def _lamb_stage2_kernel(p_ptrs, ws, ws_off, blk_tensor, blk_start, sizes, p_sumsq, u_sumsq, step_ptr, skip_ptr,
                        lr_ptr, lr_val, wd, LR_IS_PTR: tl.constexpr, USE_NVLAMB: tl.constexpr, DTYPE: tl.constexpr,
                        BLOCK: tl.constexpr):
    pid, ti, offs, mask = _block_coords(blk_tensor, blk_start, sizes, BLOCK)
    keep = tl.load(skip_ptr) == 0
    if LR_IS_PTR:
        lr = tl.load(lr_ptr)
    else:
        lr = lr_val
    pn = tl.sqrt(tl.load(p_sumsq + ti))
    un = tl.sqrt(tl.load(u_sumsq + ti))
    trust = tl.where((un != 0.0) & (pn != 0.0), lr * (pn / un), lr)
    if USE_NVLAMB:
        ratio = trust
    else:  # the trust ratio applies only to groups with weight decay
        ratio = tl.where(wd != 0.0, trust, lr)
    pp = tl.load(p_ptrs + ti).to(tl.pointer_type(DTYPE))
    p = tl.load(pp + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(ws + tl.load(ws_off + ti) + offs, mask=mask, other=0.0)
    tl.store(pp + offs, (p - ratio * u).to(DTYPE), mask=mask & keep)
    if pid == 0:
        # the group's last launch advances its counter (unless skipped)
        tl.store(step_ptr, tl.load(step_ptr) + keep.to(tl.int64))


def _f32(x: float) -> float:
    """The fp32 value of a hyperparameter, as apex's kernels receive it."""
    return float(np.float32(x))


def _check_lamb_args(lr, betas, eps, weight_decay, max_grad_norm, amsgrad, who):
    if amsgrad:
        raise RuntimeError(f"{who} does not support the AMSGrad variant.")
    if not lr >= 0.0:
        raise ValueError(f"{who}: invalid learning rate lr={lr}")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"{who}: invalid betas={betas}; each must be in [0, 1)")
    if not eps >= 0.0:
        raise ValueError(f"{who}: invalid eps={eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"{who}: invalid weight_decay={weight_decay}")
    if not max_grad_norm > 0.0:
        raise ValueError(f"{who}: invalid max_grad_norm={max_grad_norm}; must be > 0")


class _LAMBBase(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 amsgrad=False, adam_w_mode=True, grad_averaging=True, set_grad_none=True, max_grad_norm=1.0,
                 use_nvlamb=False):
        _check_lamb_args(lr, betas, eps, weight_decay, max_grad_norm, amsgrad, type(self).__name__)
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.set_grad_none = set_grad_none
        self.use_nvlamb = use_nvlamb

    def zero_grad(self, set_to_none: bool | None = None):
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else set_to_none)

    def _grads(self):
        out = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (group {gi})")
                if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                    raise RuntimeError(f"{type(self).__name__} supports float32, float16 and bfloat16 parameters, got {p.dtype}")
                out.append(p)
        return out


class LAMBReference(_LAMBBase):
    """Per-parameter LAMB in plain PyTorch with apex's math (the reference the fused one is tested against).

    ``step(skip=flag)`` reads the flag on the host (a sync: this is the readable version).
    """

    @torch.no_grad()
    def step(self, closure=None, *, skip=None):
        loss = run_closure(closure)
        if skip is not None and bool(skip):
            return loss
        params = self._grads()
        if not params:
            return loss
        # global gradient norm over every group (apex: norm of the per-dtype norms)
        gnorm = torch.sqrt(sum(torch.sum(p.grad.float() ** 2) for p in params))
        max_norm = self.defaults["max_grad_norm"]
        clip = torch.where(gnorm > max_norm, gnorm / max_norm, torch.ones_like(gnorm))
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            step = group["step"]
            b1, b2 = group["betas"]
            # apex takes float betas and computes 1 - pow(beta, step) in double
            bc1 = _f32(1 - math.pow(_f32(b1), step)) if group["bias_correction"] else 1.0
            bc2 = _f32(1 - math.pow(_f32(b2), step)) if group["bias_correction"] else 1.0
            beta3 = 1 - b1 if group["grad_averaging"] else 1.0
            wd, lr, eps = group["weight_decay"], group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                pf = p.float()
                p_used = pf if wd != 0 else torch.zeros_like(pf)
                m, v = st["exp_avg"].float(), st["exp_avg_sq"].float()
                g = p.grad.float() / clip
                if not self.adam_w_mode:
                    g = g + wd * p_used
                m = m * b1 + beta3 * g
                v = v * b2 + (1 - b2) * g * g
                u = (m / bc1) / (torch.sqrt(v / bc2) + eps)
                if self.adam_w_mode:
                    u = u + wd * p_used
                ratio = torch.tensor(lr, dtype=torch.float32, device=p.device)
                if self.use_nvlamb or wd != 0:
                    pn, un = torch.linalg.vector_norm(pf), torch.linalg.vector_norm(u)
                    ratio = torch.where((un != 0) & (pn != 0), lr * (pn / un), ratio)
                p.copy_(pf - ratio * u)
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
        return loss


class FusedLAMB(DeviceLR, _LAMBBase):
    """Multi-tensor LAMB with apex FusedLAMB's constructor, defaults and math; no host syncs in ``step``.

    ``step(closure=None, *, skip=None)``: ``skip`` is an optional one-element device tensor;
    nonzero makes the step a no-op for parameters, moments and step counters. On a device where
    Triton cannot run (CPU without TRITON_INTERPRET=1) it falls back to ``LAMBReference``'s math.
    Parameters may have any dense, non-overlapping layout (channels-last included); gradient and
    moments share the parameter's strides (checked before anything is written).
    """

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 amsgrad=False, adam_w_mode=True, grad_averaging=True, set_grad_none=True, max_grad_norm=1.0,
                 use_nvlamb=False):
        super().__init__(params, lr, bias_correction, betas, eps, weight_decay, amsgrad, adam_w_mode, grad_averaging,
                         set_grad_none, max_grad_norm, use_nvlamb)
        self._cache: dict = {}

    def _group_step(self, group, device):
        st = group.get("step")
        if not isinstance(st, torch.Tensor):
            st = torch.tensor([int(st or 0)], dtype=torch.int64, device=device)
        elif st.device != device or st.dim() != 1:
            st = st.reshape(1).to(device=device, dtype=torch.int64)
        group["step"] = st
        return st

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._cache.clear()
        for group in self.param_groups:  # the counters live on the parameters' device
            if isinstance(group.get("step"), torch.Tensor):
                group["step"] = group["step"].reshape(1).to(device=group["params"][0].device, dtype=torch.int64)

    def _static(self, key, ps, ms, vs, device):
        tab = self._cache.get(key)
        if tab is None:
            bm = BlockMap(ps, device)
            offs, acc = [], 0
            for n in bm.sizes_list:
                offs.append(acc)
                acc += n
            tab = dict(bm=bm, p=ptr_table(ps, device), m=ptr_table(ms, device), v=ptr_table(vs, device),
                       ws_off=device_int_tensor(offs, device),
                       ws=torch.empty(max(acc, 1), dtype=torch.float32, device=device))
            self._cache[key] = tab
        return tab

    @torch.no_grad()
    def step(self, closure=None, *, skip=None):
        loss = run_closure(closure)
        params = self._grads()
        if not params:
            return loss
        device = params[0].device
        if not triton_available(device):
            return self._fallback(skip, loss)
        require_triton("FusedLAMB.step", device)
        # every check before anything is written
        index = {p: i for i, p in enumerate(q for g in self.param_groups for q in g["params"])}
        for p in params:
            check_span_layout("FusedLAMB", index[p], p, {"gradient": p.grad})
        flag, _ = skip_flag(skip, device)
        for p in params:
            st = self.state[p]
            if not st:  # preserve_format: moments in the parameter's layout
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            else:
                match_layout_(st, "exp_avg", p)
                match_layout_(st, "exp_avg_sq", p)

        # 1) per-tensor sum of squares of grads and params, per (group, dtype) list
        lists = []
        for gi, group in enumerate(self.param_groups):
            by_dtype: dict = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_dtype.setdefault(p.dtype, []).append(p)
            for dt, ps in by_dtype.items():
                ms = [self.state[p]["exp_avg"] for p in ps]
                vs = [self.state[p]["exp_avg_sq"] for p in ps]
                key = (gi, dt, tuple(t.data_ptr() for t in ps + ms + vs))
                tab = self._static(key, ps, ms, vs, device)
                g_ptrs = grad_table(tab, ps, device)
                gsq, psq = per_tensor_sumsq(tab["bm"], g_ptrs, tab["p"], dt, dt, device)
                lists.append((group, dt, tab, g_ptrs, gsq, psq))

        # 2) global gradient norm and clip divisor, on the device
        gnorm = torch.sqrt(torch.cat([x[4] for x in lists]).sum())
        max_norm = float(self.defaults["max_grad_norm"])
        clip = torch.where(gnorm > max_norm, gnorm / max_norm, torch.ones_like(gnorm)).reshape(1)

        # 3) per group and dtype: moments + update, update norms, parameter update
        steps = {}
        for group, dt, tab, g_ptrs, _gsq, psq in lists:
            gid = id(group)
            if gid not in steps:
                steps[gid] = (self._group_step(group, device), [])
            steps[gid][1].append((dt, tab, g_ptrs, psq))
        for gi, group in enumerate(self.param_groups):
            if id(group) not in steps:
                continue
            step_t, items = steps[id(group)]
            lr_ptr, lr_val, lr_is_ptr = self._lr_args(gi, group, device, flag)
            b1, b2 = group["betas"]
            beta3 = 1 - b1 if group["grad_averaging"] else 1.0
            for i, (dt, tab, g_ptrs, psq) in enumerate(items):
                bm = tab["bm"]
                part_u = torch.empty(bm.num_blocks, device=device, dtype=torch.float32)
                _lamb_stage1_kernel[(bm.num_blocks,)](
                    g_ptrs, tab["p"], tab["m"], tab["v"], tab["ws"], tab["ws_off"], bm.blk_tensor, bm.blk_start, bm.sizes,
                    part_u, clip, step_t, flag, _f32(b1), _f32(b2), float(beta3), float(group["eps"]),
                    float(group["weight_decay"]), BIAS_CORRECTION=bool(group["bias_correction"]),
                    ADAM_W=bool(self.adam_w_mode), DTYPE=TL_DTYPES[dt], BLOCK=bm.block)
                usq = reduce_partials(bm, part_u, device)
                # only the group's last launch advances the counter
                last = i == len(items) - 1
                _lamb_stage2_kernel[(bm.num_blocks,)](
                    tab["p"], tab["ws"], tab["ws_off"], bm.blk_tensor, bm.blk_start, bm.sizes, psq, usq,
                    step_t if last else step_t.clone(), flag, lr_ptr, lr_val, float(group["weight_decay"]),
                    LR_IS_PTR=lr_is_ptr, USE_NVLAMB=bool(self.use_nvlamb), DTYPE=TL_DTYPES[dt], BLOCK=bm.block)
        return loss

    def _fallback(self, skip, loss):
        """CPU without the interpreter: the reference math, with int step counters kept as tensors."""
        for group in self.param_groups:
            if isinstance(group.get("step"), torch.Tensor):
                group["step"] = int(group["step"].item())
        LAMBReference.step(self, skip=skip)
        return loss
