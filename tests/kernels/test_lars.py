"""FusedLARS against solo-learn's LARS as written, step by step (20 steps, 5 shapes, 2 groups)."""

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
from vssl_fast.kernels import FusedLARS, LARSReference

CASES = {
    "paper_recipe": ({"lr": 1.0, "weight_decay": 1e-5}, {"lr": 0.1, "weight_decay": 0.0}),  # clip active (eta/lr small)
    "clip_inactive": ({"lr": 0.01, "weight_decay": 1e-4}, {}),  # r / lr > 1 for most tensors
    "no_clip_no_exclude": ({"lr": 0.1, "weight_decay": 1e-3, "clip_lr": False, "exclude_bias_n_norm": False}, {}),
    "no_wd": ({"lr": 0.5, "weight_decay": 0.0}, {"momentum": 0.5}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lockstep_with_reference(case, kernel_device):
    kwargs, second = CASES[case]
    lockstep(FusedLARS, LARSReference, kernel_device, kwargs, second)


def test_zero_norm_tensors_take_plain_sgd(kernel_device):
    pf = make_params(kernel_device)
    with torch.no_grad():
        pf[3].zero_()  # ||p|| = 0: direction is g alone
    pr = [p.detach().clone().requires_grad_() for p in pf]
    of, orf = FusedLARS(groups(pf, {}), lr=0.5, weight_decay=1e-3), LARSReference(groups(pr, {}), lr=0.5, weight_decay=1e-3)
    for opt, ps in ((of, pf), (orf, pr)):
        gr = grads_for_step(ps, 0)
        gr[4].zero_()  # ||g|| = 0
        set_grads(ps, gr)
        opt.step()
    for a, b in zip(pf, pr):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def test_state_dict_roundtrip_is_exact(kernel_device):
    roundtrip_exact(FusedLARS, kernel_device, {"lr": 1.0, "weight_decay": 1e-5}, {"lr": 0.1, "weight_decay": 0.0})


def test_skip_flag_is_a_device_noop(kernel_device):
    p = make_params(kernel_device)
    opt = FusedLARS(groups(p, {}), lr=0.3, weight_decay=1e-5)
    set_grads(p, grads_for_step(p, 0))
    opt.step()
    before = [x.detach().clone() for x in p] + [x.clone() for x in state_tensors(opt)]
    set_grads(p, grads_for_step(p, 1))
    opt.step(skip=torch.tensor(True, device=kernel_device))
    assert all(torch.equal(a, b) for a, b in zip(before, [x.detach() for x in p] + state_tensors(opt)))


def test_nonfinite_grads_behave_as_reference(kernel_device):
    pf = make_params(kernel_device)
    pr = [x.detach().clone().requires_grad_() for x in pf]
    of, orf = FusedLARS(groups(pf, {}), lr=1.0, weight_decay=1e-5), LARSReference(groups(pr, {}), lr=1.0, weight_decay=1e-5)
    for opt, ps in ((of, pf), (orf, pr)):
        gr = grads_for_step(ps, 0)
        gr[1][2] = float("nan")
        gr[3][0, 0] = float("inf")
        set_grads(ps, gr)
        opt.step()
    assert_nonfinite_match(pf + state_tensors(of), pr + state_tensors(orf))
    # an inf grad makes ||g|| inf, so r = 0 and only the inf element turns NaN (inf * 0); the 1-D
    # tensor takes plain SGD, so only its NaN element is NaN
    assert torch.isnan(pf[3][0, 0]) and torch.isnan(pf[3]).sum() == 1
    assert torch.isnan(pf[1]).sum() == 1 and torch.isfinite(pf[0]).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="invalid momentum"):
        FusedLARS([torch.zeros(2, requires_grad=True)], lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="invalid learning rate"):
        FusedLARS([torch.zeros(2, requires_grad=True)], lr=-1)
