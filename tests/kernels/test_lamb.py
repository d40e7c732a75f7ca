"""FusedLAMB against the per-parameter apex-math reference, step by step (20 steps, 5 shapes, 2 groups)."""

import inspect

import pytest
import torch
from optim_helpers import (
    assert_nonfinite_match,
    grads_for_step,
    groups,
    lockstep,
    make_params,
    roundtrip_exact,
    set_grads,
    state_tensors,
)
from vssl_fast.kernels import FusedLAMB, LAMBReference

CASES = {
    "default": ({}, {}),  # weight_decay 0.01, adam_w, clipping at 1.0 active (grad norm ~40)
    "no_wd_no_clip": ({"weight_decay": 0.0, "max_grad_norm": 1e6}, {}),
    "l2_mode": ({"adam_w_mode": False, "weight_decay": 0.05}, {"weight_decay": 0.0}),
    "nvlamb_no_wd": ({"weight_decay": 0.0, "use_nvlamb": True}, {"lr": 0.02}),
    "no_bias_corr_no_avg": ({"bias_correction": False, "grad_averaging": False, "lr": 0.003}, {"weight_decay": 0.1}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lockstep_with_reference(case, kernel_device):
    kwargs, second = CASES[case]
    lockstep(FusedLAMB, LAMBReference, kernel_device, {"lr": 0.01, **kwargs}, second)


def test_state_dict_roundtrip_is_exact(kernel_device):
    roundtrip_exact(FusedLAMB, kernel_device, {"lr": 0.01}, {"weight_decay": 0.0})


def test_constructor_matches_apex_signature():
    sig = inspect.signature(FusedLAMB.__init__)
    want = dict(lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, amsgrad=False,
                adam_w_mode=True, grad_averaging=True, set_grad_none=True, max_grad_norm=1.0, use_nvlamb=False)
    assert list(sig.parameters)[1:] == ["params", *want]
    for k, v in want.items():
        assert sig.parameters[k].default == v, k
    with pytest.raises(RuntimeError, match="AMSGrad"):
        FusedLAMB([torch.zeros(2, requires_grad=True)], amsgrad=True)
    with pytest.raises(ValueError, match="invalid betas"):
        FusedLAMB([torch.zeros(2, requires_grad=True)], betas=(1.0, 0.9))


def test_skip_flag_is_a_device_noop(kernel_device):
    p = make_params(kernel_device)
    opt = FusedLAMB(groups(p, {}), lr=0.01)
    for k in range(3):
        set_grads(p, grads_for_step(p, k))
        opt.step()
    before = [x.detach().clone() for x in p] + [x.clone() for x in state_tensors(opt)]
    steps_before = [g["step"].clone() for g in opt.param_groups]
    set_grads(p, grads_for_step(p, 99))
    opt.step(skip=torch.tensor(1, device=kernel_device))
    after = [x.detach() for x in p] + state_tensors(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(g["step"], s) for g, s in zip(opt.param_groups, steps_before))
    opt.step(skip=torch.tensor(0, device=kernel_device))
    assert not torch.equal(p[2], before[2])
    assert all(int(g["step"]) == 4 for g in opt.param_groups)


def test_nonfinite_grads_behave_as_reference(kernel_device):
    pf = make_params(kernel_device)
    pr = [x.detach().clone().requires_grad_() for x in pf]
    of, orf = FusedLAMB(groups(pf, {}), lr=0.01), LAMBReference(groups(pr, {}), lr=0.01)
    for opt, ps in ((of, pf), (orf, pr)):
        gr = grads_for_step(ps, 0)
        gr[2][5] = float("nan")
        gr[3][0, 0] = float("inf")
        set_grads(ps, gr)
        opt.step()
    assert_nonfinite_match(pf + state_tensors(of), pr + state_tensors(orf))
    # as in apex: a NaN global norm fails `norm > max_grad_norm`, so there is no clipping; the
    # trust ratio spreads NaN over the tensors that hold one, the others step normally
    assert torch.isnan(pf[2]).all() and torch.isnan(pf[3]).all() and torch.isfinite(pf[0]).all()
