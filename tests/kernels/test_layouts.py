"""Fused LARS, LAMB and EMA on any dense layout: channels-last ResNet-18 and mixed layouts, in
lockstep with the references; layouts that cannot work are refused before anything is written."""

import copy

import pytest
import torch
from optim_helpers import assert_params_close, state_tensors
from vssl_fast.kernels import FusedLAMB, FusedLARS, LAMBReference, LARSReference, ema_update_, ema_update_reference_

from vssl_fast.models import build_backbone

OPTS = {
    "lars": (FusedLARS, LARSReference, {"lr": 1.0, "weight_decay": 1e-5}),
    "lamb": (FusedLAMB, LAMBReference, {"lr": 1e-2, "weight_decay": 1e-2}),
}


def _mixed_params(device, seed=0):
    """Contiguous, channels-last, a transposed 2-D (dense, not contiguous), a permuted 3-D and a
    storage-offset view: every dense, non-overlapping layout the kernels must sweep as a span."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    base = r(40)
    ps = [
        r(6, 5, 3, 3),
        r(6, 5, 3, 3).to(memory_format=torch.channels_last),
        r(1, 7, 1, 1).to(memory_format=torch.channels_last),  # degenerate strides: size-1 dims
        r(17, 33).t(),
        r(3, 4, 5).permute(2, 0, 1),
        base[13:13 + 27].view(3, 9),  # a view with a storage offset
        r(1),
    ]
    return [p.detach().to(device) for p in ps]


def _leaves(ps):
    return [p.detach().requires_grad_() for p in ps]


def _grads_like(ps, step):
    """Gradients in each parameter's own layout, as autograd makes them."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for p in ps:
        v = torch.empty_like(p)  # preserve_format: the parameter's strides
        v.copy_(torch.randn(p.shape, generator=g))
        out.append(v)
    return out


@pytest.mark.parametrize("name", list(OPTS))
def test_mixed_layouts_lockstep(name, kernel_device):
    fused_cls, ref_cls, kw = OPTS[name]
    pf = _leaves(_mixed_params(kernel_device))
    pr = [p.detach().clone(memory_format=torch.contiguous_format).requires_grad_() for p in pf]  # plain contiguous copies
    of, orf = fused_cls(pf, **kw), ref_cls(pr, **kw)
    for k in range(5):
        for a, b, gr in zip(pf, pr, _grads_like(pf, k)):
            a.grad, b.grad = gr, gr.contiguous()
        of.step()
        orf.step()
        assert_params_close(pf, pr, 1e-5, 1e-6, f"step {k} params")
        assert_params_close(state_tensors(of), state_tensors(orf), 1e-5, 1e-6, f"step {k} state")
    for p in pf:  # layouts kept, state in the parameter's layout
        for t in of.state[p].values():
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                assert t.stride() == p.stride(), (p.shape, p.stride(), t.stride())


@pytest.mark.parametrize("name", list(OPTS))
def test_contiguous_state_loaded_into_channels_last_params(name, kernel_device):
    """A checkpoint from a contiguous model resumed on a channels-last one: state re-laid once, same steps."""
    fused_cls, _, kw = OPTS[name]
    pa = _leaves([p.contiguous() for p in _mixed_params(kernel_device)])
    oa = fused_cls(pa, **kw)
    for k in range(3):
        for p, gr in zip(pa, _grads_like(pa, k)):
            p.grad = gr
        oa.step()
    sd = copy.deepcopy(oa.state_dict())
    pb = _leaves([p.detach().clone().to(memory_format=torch.channels_last) if p.dim() == 4 else p.detach().clone()
                  for p in pa])
    ob = fused_cls(pb, **kw)
    ob.load_state_dict(sd)
    for k in range(3, 6):
        grs = _grads_like(pa, k)
        for a, b, gr in zip(pa, pb, grs):
            a.grad = gr
            b.grad = torch.empty_like(b).copy_(gr)
        oa.step()
        ob.step()
        # per-tensor norms sum in storage order, which the layout changes: equal up to that round-off
        assert_params_close(pa, pb, 1e-5, 1e-6, f"step {k} params")
        assert_params_close(state_tensors(oa), state_tensors(ob), 1e-5, 1e-6, f"step {k} state")
    for p in pb:
        assert all(t.stride() == p.stride() for t in ob.state[p].values() if isinstance(t, torch.Tensor) and t.dim())


@pytest.mark.parametrize("name", list(OPTS))
def test_layouts_that_cannot_work_are_refused_before_writing(name, kernel_device):
    fused_cls, _, kw = OPTS[name]
    ps = _leaves([torch.randn(4, 3, 3, 3, device=kernel_device).to(memory_format=torch.channels_last),
                  torch.randn(5, device=kernel_device)])
    opt = fused_cls(ps, **kw)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in ps] + [t.clone() for t in state_tensors(opt)]
    ps[0].grad = ps[0].grad.contiguous()  # a gradient in another layout than its parameter
    with pytest.raises(RuntimeError, match=r"parameter 0 \(shape \(4, 3, 3, 3\), strides \(27, 1, 9, 3\)\).*gradient"):
        opt.step()
    after = [p.detach() for p in ps] + state_tensors(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a refused step wrote something"

    over = torch.randn(1, 3, device=kernel_device).expand(4, 3).requires_grad_()  # overlapping
    over.grad = torch.randn(1, 3, device=kernel_device).expand(4, 3)
    with pytest.raises(RuntimeError, match=r"parameter 0 \(shape \(4, 3\), strides \(0, 1\)\) is not dense"):
        fused_cls([over], **kw).step()


def test_ema_any_layout_and_mismatch_refused(kernel_device):
    t = _mixed_params(kernel_device, seed=1)
    s = [torch.empty_like(x).copy_(torch.randn(x.shape)) for x in t]
    t_ref = [x.clone(memory_format=torch.contiguous_format) for x in t]
    ema_update_(t, s, 0.9, impl="triton")
    ema_update_reference_(t_ref, [x.contiguous() for x in s], 0.9)
    for a, b in zip(t, t_ref):
        torch.testing.assert_close(a.contiguous(), b, rtol=2e-7, atol=2e-7)
    bad_s = [x.contiguous() for x in s]
    before = [x.clone() for x in t]
    with pytest.raises(RuntimeError, match=r"ema_update_: parameter 1 .*student tensor"):
        ema_update_(t, bad_s, 0.9, impl="triton")
    assert all(torch.equal(a, b) for a, b in zip(before, t))


@pytest.mark.parametrize("name", list(OPTS))
def test_channels_last_resnet18_lockstep(name, kernel_device):
    """The product's default GPU model: a channels-last ResNet-18 (CIFAR stem), fused vs reference.

    The reference steps a contiguous copy; conv weights keep their channels-last strides through
    the fused step. The interpreter takes ~10 s per step over 11M parameters: LARS (the recipes'
    optimizer) two steps, so momentum is exercised, LAMB one.
    """
    fused_cls, ref_cls, kw = OPTS[name]
    torch.manual_seed(0)
    net = build_backbone("resnet18", cifar_stem=True).to(kernel_device).to(memory_format=torch.channels_last)
    ref = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    pf, pr = list(net.parameters()), list(ref.parameters())
    assert sum(not p.is_contiguous() for p in pf) >= 15, "expected channels-last conv weights"
    x = torch.randn(4, 3, 16, 16, device=kernel_device)
    of, orf = fused_cls(pf, **kw), ref_cls(pr, **kw)
    for k in range(2 if name == "lars" else 1):
        for model, opt, xx in ((net, of, x.to(memory_format=torch.channels_last)), (ref, orf, x)):
            opt.zero_grad(set_to_none=True)
            model(xx).square().mean().backward()
        for a in pf:
            assert a.grad.stride() == a.stride()
        # the two nets' gradients differ by conv round-off; step both on the same gradient
        for a, b in zip(pf, pr):
            b.grad = a.grad.contiguous()
        of.step()
        orf.step()
        assert_params_close(pf, pr, 1e-5, 1e-6, f"{name} step {k}")
    assert all(p.stride() == q.stride() for p, q in zip(pf, net.parameters()))
    teacher = copy.deepcopy(net)
    t_ref = [p.detach().contiguous() for p in teacher.parameters()]
    ema_update_(list(teacher.parameters()), pf, 0.99, impl="triton")
    ema_update_reference_(t_ref, [p.detach().contiguous() for p in pf], 0.99)
    assert_params_close([p.contiguous() for p in teacher.parameters()], t_ref, 2e-7, 2e-7, "ema")


@pytest.mark.parametrize("name", list(OPTS))
def test_many_blocks_per_tensor(name, kernel_device, monkeypatch):
    """Blocks of 16 elements: every tensor spans many programs (partial sums, offsets, masks)."""
    from vssl_fast.kernels import launch

    monkeypatch.setattr(launch, "_overrides", [{f: {"BLOCK": 16} for f in ("ema", "restore", "lars", "lamb")}])
    test_mixed_layouts_lockstep(name, kernel_device)
    test_ema_any_layout_and_mismatch_refused(kernel_device)


@pytest.mark.parametrize("name", list(OPTS))
def test_learning_rate_read_from_device_memory_gives_the_same_bits(name, kernel_device):
    """lr_on_device (for a step replayed as a CUDA graph): the kernels read each group's LR from a
    device tensor the host refreshes; the same fp32 value as the scalar path, so the same bits."""
    fused_cls, _, kw = OPTS[name]
    pa = _leaves(_mixed_params(kernel_device))
    pb = [p.detach().clone().requires_grad_() for p in pa]
    oa, ob = fused_cls([{"params": pa[:3]}, {"params": pa[3:]}], **kw), fused_cls([{"params": pb[:3]}, {"params": pb[3:]}], **kw)
    ob.lr_on_device = True
    for k in range(4):
        for i, o in enumerate((oa, ob)):
            for g in o.param_groups:
                g["lr"] = kw["lr"] * (0.5 + 0.1 * k + 0.05 * i * 0)  # a moving schedule, the same for both
        ob.set_device_lrs()
        ob.param_groups[0]["lr"] = 123.0  # ignored by the device path until set_device_lrs()
        for a, b, gr in zip(pa, pb, _grads_like(pa, k)):
            a.grad, b.grad = gr, gr.clone()
        oa.step()
        ob.step()
        ob.param_groups[0]["lr"] = oa.param_groups[0]["lr"]
        assert all(torch.equal(a, b) for a, b in zip(pa, pb)), f"step {k}"
