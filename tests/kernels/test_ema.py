"""Multi-tensor EMA against torch._foreach_lerp_ (within one ulp), tau as float or device tensor."""

import pytest
import torch
from vssl_fast.kernels import ema_update_, ema_update_reference_

SHAPES = [(1,), (7,), (1000,), (33, 17), (4, 3, 5, 5), (5000,)]


def _lists(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in SHAPES]
    s = [torch.randn(sh, generator=g).to(device=device, dtype=dtype) for sh in SHAPES]
    return t, s


def _within_one_ulp(a, b, t_old, s):
    """|a - b| <= one ulp of the operands max(|t|, |s|), per element.

    A lerp's error is a rounding of its operands' scale; measured in ulps of a result that
    cancels to ~0 it would be unbounded, and FMA contraction may differ by one rounding.
    """
    scale = torch.maximum(t_old.abs(), s.abs()).float()
    ulp = torch.nextafter(scale, torch.full_like(scale, float("inf"))) - scale
    return bool(((a.float() - b.float()).abs() <= ulp).all())


@pytest.mark.parametrize("tau", [0.99, 0.5, 0.3, 0.996, "tensor"])
def test_matches_foreach_lerp_within_one_ulp(tau, kernel_device):
    t, s = _lists(kernel_device)
    t_old = [x.clone() for x in t]
    t_ref = [x.clone() for x in t]
    tau_v = torch.tensor(0.987, device=kernel_device) if tau == "tensor" else tau
    ema_update_(t, s, tau_v, impl="triton")
    ema_update_reference_(t_ref, s, tau_v)
    for a, b, t0, s0 in zip(t, t_ref, t_old, s):
        assert _within_one_ulp(a, b, t0, s0)


def test_tau_one_is_identity_and_tau_zero_copies(kernel_device):
    t, s = _lists(kernel_device, seed=1)
    before = [x.clone() for x in t]
    ema_update_(t, s, 1.0, impl="triton")
    assert all(torch.equal(a, b) for a, b in zip(t, before))
    ema_update_(t, s, torch.tensor(1.0, device=kernel_device), impl="triton")
    assert all(torch.equal(a, b) for a, b in zip(t, before))
    ema_update_(t, s, 0.0, impl="triton")
    assert all(torch.equal(a, b) for a, b in zip(t, s))


def test_tensor_tau_changes_without_new_tables(kernel_device):
    from vssl_fast.kernels import _multi_tensor as mt

    t, s = _lists(kernel_device, seed=2)
    mt._PAIR_PLANS.clear()
    tau = torch.tensor(0.9, device=kernel_device)
    for k in range(3):
        tau.fill_(0.9 + 0.03 * k)
        ema_update_(t, s, tau, impl="triton")
    assert len(mt._PAIR_PLANS) == 1


def test_bf16_and_mixed_dtype_lists(kernel_device):
    t32, s32 = _lists(kernel_device, seed=3)
    t16, s16 = _lists(kernel_device, dtype=torch.bfloat16, seed=4)
    t, s = t32[:3] + t16[:3], s32[:3] + s16[:3]
    ref = [x.clone() for x in t]
    ema_update_(t, s, 0.9, impl="triton")
    ema_update_reference_(ref, s, 0.9)
    for a, b in zip(t, ref):  # one bf16 / fp32 rounding of the operands' scale at most
        tol = 2**-7 if a.dtype == torch.bfloat16 else 2**-22
        assert (a.float() - b.float()).abs().max() <= tol * max(b.float().abs().max().item(), 1.0)


def test_nan_propagates_like_lerp(kernel_device):
    t, s = _lists(kernel_device, seed=5)
    s[1][3] = float("nan")
    t[2][0] = float("inf")
    ref = [x.clone() for x in t]
    ema_update_(t, s, 0.9, impl="triton")
    ema_update_reference_(ref, s, 0.9)
    for a, b in zip(t, ref):
        assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b))


def test_bad_inputs(kernel_device):
    t, s = _lists(kernel_device)
    with pytest.raises(ValueError, match="6 teacher tensors but 5 student tensors"):
        ema_update_(t, s[:5], 0.9)
    with pytest.raises(ValueError, match=r"tensor 1: teacher shape \(7,\) != student shape \(8,\)"):
        ema_update_(t[:2], [s[0], torch.zeros(8, device=kernel_device)], 0.9)
    with pytest.raises(ValueError, match="tau must be a float or a 0-d tensor"):
        ema_update_(t, s, torch.ones(2, device=kernel_device))
    with pytest.raises(ValueError, match="impl must be"):
        ema_update_(t, s, 0.9, impl="cuda")
