"""The VSSL step and the BYOL control on a tiny model (METHOD.md §1.5-§1.7)."""

import pytest
import torch
from helpers import tiny_model

from vssl_fast import losses as L
from vssl_fast.method import MethodConfig, compute_loss, train_step


def _batch(B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, 8, 8, generator=g)
    x1 = x + 0.1 * torch.randn(x.shape, generator=g)
    x2 = x.flip(-1) + 0.1 * torch.randn(x.shape, generator=g)
    return x1, x2, torch.randint(0, 3, (B,), generator=g)


FLAG_CASES = [
    {},
    {"same_view_pairs": True},
    {"teacher_predictor": True},
    {"denoiser_input": "params"},
    {"ll_target": "student_detached"},
    {"ll_sign": -1},
    {"head": "separate_mlps"},
    {"var_param": "logvar"},
    {"var_param": "softplus", "abs_noise": False},
    {"divergence": "gaussian", "var_param": "logvar"},
    {"divergence": "gaussian", "var_param": "softplus", "gaussian_reduction": "mean"},
    {"method": "byol"},
]


@pytest.mark.parametrize("flags", FLAG_CASES, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "default")
def test_twenty_steps_lower_the_loss_and_teacher_moves_only_by_ema(flags):
    torch.manual_seed(0)
    cfg = MethodConfig(proj_output_dim=4, impl="reference", **flags)
    model = tiny_model(cfg)
    opt = torch.optim.SGD([p for g in model.parameter_groups(0.05, 0.0, 0.05) for p in g["params"]], lr=0.05, momentum=0.9)
    x1, x2, y = _batch()
    eps = torch.randn(16, 4)  # fixed noise: a deterministic objective on a fixed batch
    first = None
    for _ in range(20):
        t_before = [p.detach().clone() for p in model.teacher.parameters()]
        out = compute_loss(model, x1, x2, y, cfg, eps=eps)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        assert all(p.grad is None for p in model.teacher.parameters())  # no gradient reaches the teacher
        opt.step()
        for t, tb in zip(model.teacher.parameters(), t_before):
            assert torch.equal(t, tb)  # the optimizer never moves it
        model.ema_update(0.9, impl="reference")
        _, s_params = model.ema_param_lists()
        for t, tb, s in zip(model.teacher.parameters(), t_before, s_params):
            torch.testing.assert_close(t, torch.lerp(tb, s.detach(), 0.1), rtol=0, atol=1e-7)
        first = out.parts["loss"].item() if first is None else first
    final = compute_loss(model, x1, x2, y, cfg, eps=eps).parts["loss"].item()
    assert final < first, (flags, first, final)


def test_tau_one_freezes_teacher():
    cfg = MethodConfig(proj_output_dim=4, impl="reference")
    model = tiny_model(cfg)
    opt = torch.optim.SGD([p for g in model.parameter_groups(0.1, 0.0, 0.1) for p in g["params"]], lr=0.1)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items() if v.is_floating_point()}
    for _ in range(3):
        train_step(model, opt, *_batch(), cfg, tau=torch.tensor(1.0))
    after = {k: v for k, v in model.teacher.state_dict().items() if v.is_floating_point() and "running" not in k}
    for k, v in after.items():
        assert torch.equal(v, before[k]), k
    # and the student did move
    assert not torch.equal(model.backbone[0].weight, model.teacher["backbone"][0].weight)


def test_loss_parts_and_definition():
    """Recompute the default loss by hand from the module outputs: KL + LL + CE, pairs summed."""
    torch.manual_seed(1)
    cfg = MethodConfig(proj_output_dim=4, impl="reference")
    model = tiny_model(cfg)
    x1, x2, y = _batch(B=6)
    eps = torch.randn(12, 4, dtype=torch.float32)
    torch.manual_seed(2)
    out = compute_loss(model, x1, x2, y, cfg, eps=eps)
    for k in ("loss", "kl", "ll", "ce", "cos_mu", "cos_var", "cos_m", "cos_r", "z_std", "var_norm", "acc1"):
        assert k in out.parts and out.parts[k].dim() == 0
    torch.manual_seed(2)
    model2 = tiny_model(cfg)
    model2.load_state_dict(model.state_dict())
    st = [model2.student_forward(x) for x in (x1, x2)]
    tg = [model2.teacher_forward(x) for x in (x1, x2)]
    kl = ll = 0.0
    for v, w in [(0, 1), (1, 0)]:
        mu, u = st[v][2][:, :4], st[v][2][:, 4:]
        mt, ut = tg[w][:, :4], tg[w][:, 4:]
        e = eps[v * 6:(v + 1) * 6]
        z = mu + u * e.abs()
        kl = kl + L.cosine_kl(mu, mt, u, ut, 3.0).mean()
        ll = ll + L.cosine_ll(model2.denoiser_mu(z), mt, model2.denoiser_var(z), ut, 1.0).mean()
    ce = 0.5 * sum(torch.nn.functional.cross_entropy(s[3], y) for s in st)
    torch.testing.assert_close(out.parts["kl"], kl.detach())
    torch.testing.assert_close(out.parts["ll"], ll.detach())
    torch.testing.assert_close(out.loss.detach(), (kl + ll + ce).detach())


def test_byol_control_loss():
    torch.manual_seed(3)
    cfg = MethodConfig(method="byol", proj_output_dim=4)
    model = tiny_model(cfg)
    x1, x2, y = _batch(B=5)
    out = compute_loss(model, x1, x2, None, cfg)
    torch.manual_seed(3)
    p = [model.student_forward(x)[2] for x in (x1, x2)]
    t = [model.teacher_forward(x) for x in (x1, x2)]
    cos = torch.nn.functional.cosine_similarity
    want = (2 - 2 * cos(p[0], t[1])).mean() + (2 - 2 * cos(p[1], t[0])).mean()
    torch.testing.assert_close(out.loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    assert p[0].shape == (5, 4) and "ce" not in out.parts


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match=r"method.divergence: invalid value 'l2'"):
        MethodConfig(divergence="l2")
    with pytest.raises(ValueError, match=r"method.var_param: divergence='gaussian' needs a positive variance"):
        MethodConfig(divergence="gaussian")  # var_param defaults to raw
    with pytest.raises(ValueError, match=r"method.ll_sign"):
        MethodConfig(ll_sign=0)
    with pytest.raises(ValueError, match=r"method.impl: invalid value 'cuda'"):
        MethodConfig(impl="cuda")
    cfg = MethodConfig(proj_output_dim=4)
    model = tiny_model(cfg)
    x1, x2, y = _batch(B=4)
    with pytest.raises(ValueError, match=r"the two views differ in shape"):
        compute_loss(model, x1, x2[:, :, :4], y, cfg)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        compute_loss(model, x1, x2, y[:3], cfg)
    with pytest.raises(ValueError, match=r"eps must have shape \(8, 4\)"):
        compute_loss(model, x1, x2, y, cfg, eps=torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"impl='fused' covers only divergence='cosine'"):
        compute_loss(model, x1, x2, y, MethodConfig(proj_output_dim=4, impl="fused", var_param="logvar"))
