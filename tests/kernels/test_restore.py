"""Multi-tensor conditional restore against the per-tensor ``where`` reference: exact, any dtype."""

import pytest
import torch
from vssl_fast.kernels import restore_where_, restore_where_reference_

SHAPES = [(1,), (7,), (1000,), (33, 17), (64,)]


def _pairs(device, seed):
    g = torch.Generator().manual_seed(seed)
    dst = [torch.randn(s, generator=g) for s in SHAPES] + [torch.randint(0, 1000, (1,), generator=g)]
    src = [torch.randn(s, generator=g) for s in SHAPES] + [torch.randint(0, 1000, (1,), generator=g)]
    src[2][::7] = float("nan")
    src[3][0, :5] = float("inf")
    dst[1][3] = float("-inf")
    dst[4] = dst[4].to(torch.bfloat16)
    src[4] = src[4].to(torch.bfloat16)
    return [t.to(device) for t in dst], [t.to(device) for t in src]


@pytest.mark.parametrize("flag", [0, 1])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_bit_for_bit(flag, seed, kernel_device):
    d, s = _pairs(kernel_device, seed)
    d_ref = [t.clone() for t in d]
    f = torch.tensor([flag], device=kernel_device)
    restore_where_(d, s, f, impl="triton")
    restore_where_reference_(d_ref, s, f)
    for a, b in zip(d, d_ref):
        assert a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8) if a.is_floating_point() else a,
                                                  b.view(-1).view(torch.uint8) if b.is_floating_point() else b)
    if flag:
        assert all(torch.equal(a.nan_to_num(), x.nan_to_num()) for a, x in zip(d, s))


def test_many_blocks_and_bad_input(kernel_device, monkeypatch):
    from vssl_fast.kernels import launch

    monkeypatch.setattr(launch, "_overrides", [{f: {"BLOCK": 16} for f in ("ema", "restore", "lars", "lamb")}])
    d, s = _pairs(kernel_device, 3)
    restore_where_(d, s, torch.ones(1, dtype=torch.int32, device=kernel_device), impl="triton")
    assert all(torch.equal(a.nan_to_num(), x.nan_to_num()) for a, x in zip(d, s))
    with pytest.raises(ValueError, match="tensor 0: torch.float32.* vs source torch.int64"):
        restore_where_([d[0]], [d[-1]], torch.ones(1, device=kernel_device))
    with pytest.raises(ValueError, match="flag must be a one-element tensor"):
        restore_where_(d, s, 1)
