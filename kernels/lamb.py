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

Memory, per fp32 element (bf16 parameters and moments: 2 B each instead of 4; u stays fp32), three
sweeps, the fewest LAMB's dependencies allow (every ||g|| before any moment, ||u|| before the update):
norms read g and p (8 B); stage 1 reads g, p, m, v and writes m, v and u (28 B; 24 without weight
decay, where p is not read); stage 2 reads p and u and writes p (12 B): 48 B per element. Writing u
(4 + 4 B) is cheaper than recomputing it from g, m, v in stage 2 (12 B). The global gradient norm is
reduced inside stage 1 from the per-tensor sums (T floats per program, L2 hits).

Launches per step, per (group, dtype): 5 (norm sweep, both per-tensor reductions in one launch,
stage 1, the ||u|| reduction, stage 2); no other op and no host synchronization. Plans (validated
lists, pointer tables, workspace, scratch) are built once and reused while no parameter moves.
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
    reduce_partials,
    refresh_grads,
    skip_flag,
    state_current,
    sumsq_buffers,
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
def _global_clip(gsq_all, T_ALL, max_norm, T_CHUNK: tl.constexpr, T_PAD: tl.constexpr):
    """max(||g|| / max_norm, 1) from every tensor's sum of squares (all groups), in a fixed order.

    Each program reads the T floats itself (T ~ 100: L2 hits) instead of a separate launch."""
    acc = tl.zeros((T_CHUNK,), dtype=tl.float32)
    for i in range(0, T_PAD, T_CHUNK):
        idx = i + tl.arange(0, T_CHUNK)
        acc += tl.load(gsq_all + idx, mask=idx < T_ALL, other=0.0)
    gnorm = tl.sqrt(tl.sum(acc, axis=0))
    return tl.where(gnorm > max_norm, gnorm / max_norm, 1.0)


@triton.jit
def _lamb1_body(gp, pp, mp, vp, wp, offs, mask, clip, beta1, beta2, beta3, eps, wd, bc1, bc2,
                ADAM_W: tl.constexpr, HAS_WD: tl.constexpr, MASKED: tl.constexpr):
    g = _ld(gp, offs, mask, MASKED) / clip
    if HAS_WD:
        p = _ld(pp, offs, mask, MASKED)
    else:  # apex reads p only when decay != 0 (an inf parameter must not turn 0 * p into NaN)
        p = tl.zeros_like(g)
    m = _ld(mp, offs, mask, MASKED)
    v = _ld(vp, offs, mask, MASKED)
    if not ADAM_W:
        g = g + wd * p
    m = m * beta1 + beta3 * g
    v = v * beta2 + (1 - beta2) * g * g
    u = (m / bc1) / (tl.sqrt(v / bc2) + eps)
    if ADAM_W:
        u = u + wd * p
    _st(mp, offs, m, mask, MASKED)
    _st(vp, offs, v, mask, MASKED)
    if MASKED:
        u = tl.where(mask, u, 0.0)
    _st(wp, offs, u, mask, MASKED)
    return tl.sum(u * u, axis=0)


@triton.jit
def _lamb_stage1_kernel(g_ptrs, p_ptrs, m_ptrs, v_ptrs, ws, ws_off, blk_tensor, blk_start, sizes, part_u,
                        gsq_all, T_ALL, max_norm, step_ptr, skip_ptr, beta1, beta2, beta3, eps, wd,
                        BIAS_CORRECTION: tl.constexpr, ADAM_W: tl.constexpr, HAS_WD: tl.constexpr, DTYPE: tl.constexpr,
                        ALIGNED: tl.constexpr, T_CHUNK: tl.constexpr, T_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Moments and update direction. One pass: reads g, m, v (and p with decay), writes m, v and the
    fp32 update u to the workspace: 28 B per fp32 element with decay (24 without). Per block it
    also writes sum(u^2) for the trust ratio. Nothing is written when the step is skipped."""
    pid = tl.program_id(0).to(tl.int64)
    if tl.load(skip_ptr) == 0:
        _, ti, offs, mask, full = _block_coords(blk_tensor, blk_start, sizes, BLOCK)
        step = tl.load(step_ptr) + 1
        if BIAS_CORRECTION:
            bc1 = _bias_correction(beta1, step)
            bc2 = _bias_correction(beta2, step)
        else:
            bc1 = 1.0
            bc2 = 1.0
        clip = _global_clip(gsq_all, T_ALL, max_norm, T_CHUNK, T_PAD)
        gp = _tensor_ptr(g_ptrs, ti, DTYPE, ALIGNED)
        pp = _tensor_ptr(p_ptrs, ti, DTYPE, ALIGNED)
        mp = _tensor_ptr(m_ptrs, ti, DTYPE, ALIGNED)
        vp = _tensor_ptr(v_ptrs, ti, DTYPE, ALIGNED)
        wp = ws + tl.multiple_of(tl.load(ws_off + ti), 16)  # offsets padded to 16 elements on the host
        if full:
            usq = _lamb1_body(gp, pp, mp, vp, wp, offs, mask, clip, beta1, beta2, beta3, eps, wd, bc1, bc2,
                              ADAM_W, HAS_WD, False)
        else:
            usq = _lamb1_body(gp, pp, mp, vp, wp, offs, mask, clip, beta1, beta2, beta3, eps, wd, bc1, bc2,
                              ADAM_W, HAS_WD, True)
        tl.store(part_u + pid, usq)
    else:
        tl.store(part_u + pid, 0.0)


@triton.jit
def _lamb2_body(pp, wp, offs, mask, ratio, MASKED: tl.constexpr):
    p = _ld(pp, offs, mask, MASKED)
    u = _ld(wp, offs, mask, MASKED)
    _st(pp, offs, p - ratio * u, mask, MASKED)


@triton.jit
def _lamb_stage2_kernel(p_ptrs, ws, ws_off, blk_tensor, blk_start, sizes, p_sumsq, u_sumsq, step_ptr, skip_ptr,
                        lr_ptr, lr_val, wd, LR_IS_PTR: tl.constexpr, USE_NVLAMB: tl.constexpr, ADVANCE: tl.constexpr,
                        DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Trust-ratio update. One pass: reads p and u, writes p (12 B per fp32 element, 8 per bf16).
    ADVANCE: this launch (the group's last) adds one to the group's step counter unless skipped."""
    keep = tl.load(skip_ptr) == 0
    if keep:
        _, ti, offs, mask, full = _block_coords(blk_tensor, blk_start, sizes, BLOCK)
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
        pp = _tensor_ptr(p_ptrs, ti, DTYPE, ALIGNED)
        wp = ws + tl.multiple_of(tl.load(ws_off + ti), 16)
        if full:
            _lamb2_body(pp, wp, offs, mask, ratio, False)
        else:
            _lamb2_body(pp, wp, offs, mask, ratio, True)
    if ADVANCE:
        if tl.program_id(0) == 0:
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
        self._plans: dict = {}

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
        self._plans.clear()
        for group in self.param_groups:  # the counters live on the parameters' device
            if isinstance(group.get("step"), torch.Tensor):
                group["step"] = group["step"].reshape(1).to(device=group["params"][0].device, dtype=torch.int64)

    def _plan(self, device) -> dict:
        """Validated launch lists and tables for the current parameters and state, cached.

        Built on the first step, and again whenever a parameter's address, strides, shape or dtype
        changed, gradients appeared or vanished, or a moment is no longer the one the plan points
        to: every check before anything is written, moments created (or re-laid once) in their
        parameter's layout, then per (group, dtype) a block map, pointer tables, the fp32 update
        workspace (offsets padded to 16 elements: 64-byte aligned rows) and scratch for the norms;
        one buffer holds every tensor's gradient sum of squares for the global clip.
        """
        groups = self.param_groups
        key = params_key("lamb", device, groups)
        plan = self._plans.get(key)
        if plan is not None and state_current(self.state, plan):
            return plan
        lists = grouped_params("FusedLAMB", groups, self.state, ("exp_avg", "exp_avg_sq"))
        block, plan, total = key[0], {"lists": [], "gkey": None, "state": []}, sum(len(ps) for _, _, ps in lists)
        plan["gsq"] = torch.empty(max(total, 1), dtype=torch.float32, device=device)
        t_off = 0
        for k, (gi, dt, ps) in enumerate(lists):
            ms, vs = ensure_state(self.state, ps, ("exp_avg", "exp_avg_sq"), plan)
            bm = BlockMap(ps, device, block)
            offs, acc = [], 0
            for n in bm.sizes_list:
                offs.append(acc)
                acc += -(-n // 16) * 16
            pp, mp, vp = ptr_list(ps), ptr_list(ms), ptr_list(vs)
            tab = dict(bm=bm, ps=ps, p=device_int_tensor(pp, device), m=device_int_tensor(mp, device),
                       v=device_int_tensor(vp, device), aligned=aligned(pp, mp, vp),
                       ws_off=device_int_tensor(offs, device), ws=torch.empty(max(acc, 1), dtype=torch.float32, device=device),
                       part_u=torch.empty(bm.num_blocks, dtype=torch.float32, device=device),
                       usq=torch.empty(bm.num_tensors, dtype=torch.float32, device=device),
                       gsq=plan["gsq"][t_off:t_off + len(ps)],
                       last=all(g != gi for g, _, _ in lists[k + 1:]))  # the group's last list advances its counter
            t_off += len(ps)
            sumsq_buffers(tab, bm, device)
            plan["lists"].append((gi, dt, tab))
        # groups without a gradient this step: apex still advances their counters (LAMBReference does)
        plan["idle"] = [gi for gi in range(len(groups)) if all(g != gi for g, _, _ in lists)]
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
            return self._fallback(skip, loss)
        require_triton("FusedLAMB.step", device)
        plan = self._plan(device)
        note_capture(plan, device)
        refresh_grads("FusedLAMB", plan, self.param_groups, device)
        flag, _ = skip_flag(skip, device)
        warps = num_warps("lamb", device)
        # 1) per-tensor sums of squares of gradients (into one buffer for the global clip) and parameters
        for _gi, dt, tab in plan["lists"]:
            per_tensor_sumsq(tab, tab["bm"], tab["g"], tab["p"], dt, dt, device, tab["aligned"] and tab["g_aligned"],
                             warps, out_a=tab["gsq"])
        # 2) per group and dtype: moments + update (clip computed in-kernel), update norms, parameter update
        gsq = plan["gsq"]
        t_all = gsq.numel()
        t_chunk = min(1024, triton.next_power_of_2(t_all))
        max_norm = _f32(self.defaults["max_grad_norm"])
        for gi, dt, tab in plan["lists"]:
            group = self.param_groups[gi]
            step_t = self._group_step(group, device)
            lr_ptr, lr_val, lr_is_ptr = self._lr_args(gi, group, device, flag)
            b1, b2 = group["betas"]
            beta3 = 1 - b1 if group["grad_averaging"] else 1.0
            wd = float(group["weight_decay"])
            bm, is_aligned = tab["bm"], tab["aligned"] and tab["g_aligned"]
            _lamb_stage1_kernel[(bm.num_blocks,)](
                tab["g"], tab["p"], tab["m"], tab["v"], tab["ws"], tab["ws_off"], bm.blk_tensor, bm.blk_start, bm.sizes,
                tab["part_u"], gsq, t_all, max_norm, step_t, flag, _f32(b1), _f32(b2), float(beta3),
                float(group["eps"]), wd, BIAS_CORRECTION=bool(group["bias_correction"]), ADAM_W=bool(self.adam_w_mode),
                HAS_WD=wd != 0.0, DTYPE=TL_DTYPES[dt], ALIGNED=is_aligned, T_CHUNK=t_chunk,
                T_PAD=triton.cdiv(t_all, t_chunk) * t_chunk, BLOCK=bm.block, num_warps=warps)
            reduce_partials(bm, tab["part_u"], tab["usq"], tab["usq"], 1)
            _lamb_stage2_kernel[(bm.num_blocks,)](
                tab["p"], tab["ws"], tab["ws_off"], bm.blk_tensor, bm.blk_start, bm.sizes, tab["sq1"], tab["usq"],
                step_t, flag, lr_ptr, lr_val, wd, LR_IS_PTR=lr_is_ptr, USE_NVLAMB=bool(self.use_nvlamb),
                ADVANCE=tab["last"], DTYPE=TL_DTYPES[dt], ALIGNED=is_aligned, BLOCK=bm.block, num_warps=warps)
        for gi in plan["idle"]:
            self._group_step(self.param_groups[gi], device).add_((flag == 0).to(torch.int64))
        return loss

    def _fallback(self, skip, loss):
        """CPU without the interpreter: the reference math, with int step counters kept as tensors."""
        for group in self.param_groups:
            if isinstance(group.get("step"), torch.Tensor):
                group["step"] = int(group["step"].item())
        LAMBReference.step(self, skip=skip)
        return loss
