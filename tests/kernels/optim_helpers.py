"""Lockstep harness for the fused optimizers: same parameters, same gradients, compare every step."""

from __future__ import annotations

import copy

import torch

SHAPES = [(1,), (7,), (1000,), (33, 17), (4, 3, 5, 5)]


def make_params(device, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * scale).to(device).requires_grad_() for s in SHAPES]


def groups(params, second_group: dict):
    """Two parameter groups: 1-D tensors first (with the size-1 one), the rest with overrides."""
    return [{"params": params[:3]}, {"params": params[3:], **second_group}]


def grads_for_step(params, step, scale=1.0, seed=100):
    g = torch.Generator().manual_seed(seed + step)
    return [torch.randn(p.shape, generator=g).to(p.device) * scale for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def state_tensors(opt):
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out += [v for _, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor)]
    return out


def assert_params_close(a, b, rtol, atol, what=""):
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m, i=i: f"{what} tensor {i}: {m}")


def lockstep(fused_cls, ref_cls, device, kwargs, second_group, steps=20, grad_scale=1.0, rtol=1e-5, atol=1e-6):
    pf = make_params(device)
    pr = [p.detach().clone().requires_grad_() for p in pf]
    of = fused_cls(groups(pf, second_group), **kwargs)
    orf = ref_cls(groups(pr, second_group), **kwargs)
    for k in range(steps):
        gr = grads_for_step(pf, k, grad_scale)
        set_grads(pf, gr)
        set_grads(pr, gr)
        of.step()
        orf.step()
        assert_params_close(pf, pr, rtol, atol, f"step {k} params")
        assert_params_close(state_tensors(of), state_tensors(orf), rtol, atol, f"step {k} state")
    return pf, of


def roundtrip_exact(fused_cls, device, kwargs, second_group, steps=10, grad_scale=1.0):
    """k steps, state_dict into a fresh optimizer on a copy of the parameters, k more: bit-equal."""
    pa = make_params(device)
    oa = fused_cls(groups(pa, second_group), **kwargs)
    for k in range(steps):
        set_grads(pa, grads_for_step(pa, k, grad_scale))
        oa.step()
    sd = copy.deepcopy(oa.state_dict())
    pb = [p.detach().clone().requires_grad_() for p in pa]
    ob = fused_cls(groups(pb, second_group), **kwargs)
    ob.load_state_dict(sd)
    for k in range(steps, 2 * steps):
        gr = grads_for_step(pa, k, grad_scale)
        set_grads(pa, gr)
        set_grads(pb, gr)
        oa.step()
        ob.step()
        for x, y in zip(pa, pb):
            assert torch.equal(x, y), f"step {k}: resumed optimizer diverged"
        for x, y in zip(state_tensors(oa), state_tensors(ob)):
            assert torch.equal(x, y), f"step {k}: resumed state diverged"


def assert_nonfinite_match(got, want, rtol=1e-5, atol=1e-6):
    """NaN and inf positions identical (checked apart from values), finite values close."""
    for a, b in zip(got, want):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN positions differ"
        assert torch.equal(torch.isinf(a), torch.isinf(b)), "inf positions differ"
        fin = torch.isfinite(b)
        torch.testing.assert_close(a[fin].detach(), b[fin].detach(), rtol=rtol, atol=atol)
