"""Fused cosine KL + reparameterization and cosine LL against the float64 references.

Runs on the CPU under TRITON_INTERPRET=1 (set in conftest) and on CUDA when present.
"""

import math

import pytest
import torch
from helpers import REGIMES, make_inputs

from vssl_fast import kernels as K

SHAPES = [(B, d) for B in (1, 7, 256) for d in (1, 3, 200, 256)]


def _close(name, got, want, rtol, atol_rel, term_scale=0.0):
    """Value check relative to the tensor's scale; NaN/inf positions are checked separately.

    ``term_scale``: the size of the terms a gradient is the difference of. At d=1 or near
    alignment dc/da = b/(na nb) - c a/na^2 cancels to ~0, so fp32 round-off is relative to the
    terms (|g| kappa / |a|), not to the tiny result.
    """
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, name
    scale = want[torch.isfinite(want)].abs().max().item() if torch.isfinite(want).any() else 1.0
    scale = max(scale, term_scale)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol_rel * max(scale, 1e-30), equal_nan=True,
                               msg=lambda m, name=name: f"{name}: {m}")


def _run_both(B, d, dtype, regime, device, seed=11, abs_noise=True, with_gz=True):
    mu, mu_t, var, var_t = make_inputs(regime, 2 * B, d, dtype=torch.float64, seed=B * 1000 + d)
    ins = [t.to(dtype=dtype, device=device) for t in (mu, var, mu_t, var_t)]
    x = [t.clone().requires_grad_() for t in ins[:2]]
    ref = [t.detach().double().cpu().requires_grad_() for t in ins[:2]]
    tt = [t.detach().double().cpu() for t in ins[2:]]
    g = torch.Generator().manual_seed(5)
    g_kl = torch.randn(2 * B, generator=g, dtype=torch.float64)
    g_z = torch.randn(2 * B, d, generator=g, dtype=torch.float64) if with_gz else None
    g_ll = torch.randn(2 * B, generator=g, dtype=torch.float64)

    kl, z = K.cosine_kl_sample(x[0], x[1], ins[2], ins[3], beta=3.0, seed=seed, abs_noise=abs_noise)
    eps = K.sample_noise(seed, (2 * B, d), device).double().cpu()
    kl_r, z_r = K.cosine_kl_sample_reference(ref[0], ref[1], tt[0], tt[1], eps, beta=3.0, abs_noise=abs_noise)
    outs = [kl, z] if with_gz else [kl]
    torch.autograd.backward(outs, [g_kl.to(device).float()] + ([g_z.to(device=device, dtype=dtype)] if with_gz else []))
    torch.autograd.backward([kl_r, z_r] if with_gz else [kl_r], [g_kl] + ([g_z] if with_gz else []))
    kl_res = dict(kl=(kl, kl_r), z=(z, z_r), dmu=(x[0].grad, ref[0].grad), dvar=(x[1].grad, ref[1].grad))
    # |kappa| <= 8 |g| for both losses at their betas; terms are kappa * O(1 / |row|)
    terms = {n: (8 * g_kl.abs().max() / t.detach().norm(dim=-1).min()).item() for n, t in zip(("dmu", "dvar"), ref)}
    terms.update({n: (8 * g_ll.abs().max() / t.detach().norm(dim=-1).min()).item() for n, t in zip(("dm", "dr"), ref)})

    # LL on the same tensors (student side = m, r)
    y = [t.clone().requires_grad_() for t in ins[:2]]
    yr = [t.detach().double().cpu().requires_grad_() for t in ins[:2]]
    ll = K.cosine_ll(y[0], y[1], ins[2], ins[3], beta=1.0)
    ll_r = K.cosine_ll_reference(yr[0], yr[1], tt[0], tt[1], beta=1.0)
    ll.backward(g_ll.to(device).float())
    ll_r.backward(g_ll)
    ll_res = dict(ll=(ll, ll_r), dm=(y[0].grad, yr[0].grad), dr=(y[1].grad, yr[1].grad))
    return kl_res, ll_res, terms


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,d", SHAPES)
def test_matches_float64_reference(B, d, dtype, regime, kernel_device):
    kl_res, ll_res, terms = _run_both(B, d, dtype, regime, kernel_device)
    # fp32 math throughout; outputs stored in the input dtype (bf16 keeps ~3 significant digits)
    vec_rtol, vec_atol = (1e-4, 1e-6) if dtype == torch.float32 else (1e-2, 1e-2)
    for name, (got, want) in {**kl_res, **ll_res}.items():
        assert got.dtype == (torch.float32 if name in ("kl", "ll") else dtype), name
        if name in ("kl", "ll"):  # per-row fp32 values, from (rounded) inputs the reference also sees
            _close(name, got, want, rtol=1e-5, atol_rel=1e-6)
        else:
            _close(name, got, want, rtol=vec_rtol, atol_rel=vec_atol, term_scale=terms.get(name, 0.0))


@pytest.mark.parametrize("abs_noise", [True, False])
def test_normal_noise_and_no_grad_z(abs_noise, kernel_device):
    kl_res, _, _ = _run_both(7, 200, torch.float32, "random", kernel_device, abs_noise=abs_noise, with_gz=abs_noise)
    for name, (got, want) in kl_res.items():
        _close(name, got, want, rtol=1e-4, atol_rel=1e-6)


def test_nan_and_inf_propagate_as_in_reference(kernel_device):
    B, d = 4, 16
    mu, mu_t, var, var_t = make_inputs("random", 2 * B, d, dtype=torch.float32, seed=2)
    mu[0, 3] = float("nan")
    var[1, 0] = float("inf")
    mu_t[2, 5] = float("-inf")
    var_t[3, :] = float("nan")
    mu[4, 1] = float("inf")
    var[5, 2] = float("nan")
    mu, mu_t, var, var_t = (t.to(kernel_device) for t in (mu, mu_t, var, var_t))
    x = [mu.clone().requires_grad_(), var.clone().requires_grad_()]
    xr = [t.detach().double().cpu().requires_grad_() for t in (mu, var)]
    kl, z = K.cosine_kl_sample(x[0], x[1], mu_t, var_t, seed=1)
    eps = K.sample_noise(1, (2 * B, d), kernel_device).double().cpu()
    kl_r, z_r = K.cosine_kl_sample_reference(xr[0], xr[1], mu_t.double().cpu(), var_t.double().cpu(), eps)
    (kl.sum() + z.sum()).backward()
    (kl_r.sum() + z_r.sum()).backward()
    ll = K.cosine_ll(mu, var, mu_t, var_t)
    ll_r = K.cosine_ll_reference(mu.double().cpu(), var.double().cpu(), mu_t.double().cpu(), var_t.double().cpu())
    pairs = dict(kl=(kl, kl_r), z=(z, z_r), dmu=(x[0].grad, xr[0].grad), dvar=(x[1].grad, xr[1].grad), ll=(ll, ll_r))
    for name, (got, want) in pairs.items():
        got = got.detach().double().cpu()
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN positions differ"
        assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{name}: inf positions differ"
        assert torch.equal(got[torch.isinf(got)], want[torch.isinf(want)]), f"{name}: inf signs differ"
        fin = torch.isfinite(want)
        torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name} (finite part): {m}")
    assert torch.isnan(kl_r).any() and torch.isinf(z_r).any()  # the case really exercises both


def test_seed_determinism_and_noise_statistics(kernel_device):
    R, d = 400, 500
    mu = torch.zeros(R, d, device=kernel_device)
    var = torch.ones(R, d, device=kernel_device)
    t = torch.randn(R, d, device=kernel_device)
    _, z1 = K.cosine_kl_sample(mu, var, t, t, seed=123)
    _, z2 = K.cosine_kl_sample(mu, var, t, t, seed=torch.tensor(123, device=kernel_device))
    _, z3 = K.cosine_kl_sample(mu, var, t, t, seed=124)
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)
    eps = K.sample_noise(123, (R, d), kernel_device)
    assert torch.equal(z1, eps.abs())  # z = 0 + 1 * |eps|: exactly the exposed noise
    n = z1.numel()
    mean = z1.double().mean().item()
    sd_of_mean = math.sqrt((1 - 2 / math.pi) / n)  # half-normal variance 1 - 2/pi
    assert abs(mean - math.sqrt(2 / math.pi)) < 5 * sd_of_mean, (mean, sd_of_mean)
    assert abs(eps.double().mean().item()) < 5 / math.sqrt(n) and abs(eps.double().std().item() - 1) < 0.01
    # element noise does not depend on the launch tiling: row r's noise equals the same row of a bigger draw
    assert torch.equal(K.sample_noise(123, (7, d), kernel_device), eps[:7])


def test_compiled_graph_equals_eager(kernel_device):
    B, d = 6, 24
    mu, mu_t, var, var_t = (t.float().to(kernel_device) for t in make_inputs("random", 2 * B, d, seed=9))
    w = torch.randn(2 * B, d, device=kernel_device)
    seed = torch.tensor([77], device=kernel_device)

    def f(mu, var):
        kl, z = K.cosine_kl_sample(mu, var, mu_t, var_t, beta=3.0, seed=seed)
        ll = K.cosine_ll(z * w, var * 0.5, mu_t, var_t, beta=1.0)
        return kl.sum() + ll.mean() + (z * w).square().mean()

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="inductor")):
        x = [mu.clone().requires_grad_(), var.clone().requires_grad_()]
        loss = fn(*x)
        loss.backward()
        grads.append((loss.detach(), x[0].grad, x[1].grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_opcheck_registrations(kernel_device):
    mu, mu_t, var, var_t = (t.float().to(kernel_device) for t in make_inputs("random", 4, 8, seed=1))
    seed = torch.tensor([3], device=kernel_device)
    torch.library.opcheck(torch.ops.vssl_fast.cosine_kl_sample.default,
                          (mu.requires_grad_(), var.requires_grad_(), mu_t, var_t, seed, 3.0, True))
    torch.library.opcheck(torch.ops.vssl_fast.cosine_ll.default, (mu, var, mu_t, var_t, 1.0))


def test_bad_inputs(kernel_device):
    a = torch.randn(4, 8, device=kernel_device)
    with pytest.raises(ValueError, match=r"cosine_kl_sample: teacher input 'mu_t' requires grad"):
        K.cosine_kl_sample(a, a, a.clone().requires_grad_(), a, seed=0)
    with pytest.raises(TypeError, match=r"cosine_ll: argument 'm' must be float32, bfloat16 or float16"):
        K.cosine_ll(a.double(), a.double(), a.double(), a.double())
    with pytest.raises(ValueError, match=r"cosine_ll: argument 'var_t' has shape \(4, 7\)"):
        K.cosine_ll(a, a, a, a[:, :7])
    with pytest.raises(ValueError, match=r"inputs must be 2-D"):
        K.cosine_ll(a[0], a[0], a[0], a[0])
    with pytest.raises(TypeError, match=r"seed must be an int"):
        K.cosine_kl_sample(a, a, a, a, seed=1.5)
    with pytest.raises(ValueError, match=r"seed must be"):
        K.cosine_kl_sample(a, a, a, a, seed=-1)


def _philox_normals(seed: int, counters):
    """Reference for the noise definition: Philox-4x32-10 at 64-bit ``counters`` with key ``seed``,
    the four words mapped to uniforms and two Box-Muller pairs (Triton's randn4x), in float64."""
    import numpy as np

    M = np.uint64(0xFFFFFFFF)
    c = np.asarray(counters, dtype=np.uint64)
    c0, c1 = c & M, c >> np.uint64(32)
    c2 = c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed) & M, np.uint64(seed) >> np.uint64(32)
    A, B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        p0, p1 = B * c2, A * c0  # < 2**64: exact
        c0, c1, c2, c3 = ((p0 >> np.uint64(32)) ^ c1 ^ k0), p0 & M, ((p1 >> np.uint64(32)) ^ c3 ^ k1), p1 & M
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & M, (k1 + np.uint64(0xBB67AE85)) & M
    words = []
    for w in (c0, c1, c2, c3):
        x = w.astype(np.uint32).view(np.int32).astype(np.int64)
        x = np.where(x < 0, ~x, x)
        words.append(x * 4.6566127342e-10)
    out = []
    for u1, u2 in ((words[0], words[1]), (words[2], words[3])):
        r = np.sqrt(-2.0 * np.log(np.maximum(1e-7, u1)))
        out += [r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)]
    return out


@pytest.mark.parametrize("d", [1, 3, 8, 13, 300])
def test_noise_is_the_documented_philox_function_of_seed_row_col(kernel_device, d):
    """eps[r, c] = normal c % 4 of Philox(seed) at counter r * ceil(d / 4) + c // 4, whatever the tiling."""
    import numpy as np
    from vssl_fast.kernels import launch

    R, seed = 5, (3 << 40) + 12345  # a seed above 2**32 exercises both key words
    eps = K.sample_noise(seed, (R, d), kernel_device).double().cpu().numpy()
    r, c = np.meshgrid(np.arange(R), np.arange(d), indexing="ij")
    normals = _philox_normals(seed, r * ((d + 3) // 4) + c // 4)
    want = np.choose(c % 4, normals)
    np.testing.assert_allclose(eps, want, rtol=2e-5, atol=2e-5)
    with launch.override(cosine={"TILE": 8}):  # one or two rows per program instead of all five: another tiling
        assert torch.equal(K.sample_noise(seed, (R, d), kernel_device).double().cpu(), torch.from_numpy(eps))


def test_noise_lanes_are_uncorrelated_normals(kernel_device):
    """The four normals of one Philox call (adjacent columns) are independent N(0, 1) draws."""
    R, d = 2048, 64
    eps = K.sample_noise(7, (R, d), kernel_device).double().cpu()
    lanes = [eps[:, k::4].reshape(-1) for k in range(4)]
    n = lanes[0].numel()
    for k, x in enumerate(lanes):
        assert abs(x.mean().item()) < 5 / math.sqrt(n) and abs(x.std().item() - 1) < 0.02, k
    for a in range(4):
        for b in range(a + 1, 4):
            corr = torch.corrcoef(torch.stack([lanes[a], lanes[b]]))[0, 1].item()
            assert abs(corr) < 5 / math.sqrt(n), (a, b, corr)
    # and |eps| pairs (what z uses) too: a Box-Muller pair's radii are shared, so check magnitudes
    for a, b in ((0, 1), (2, 3)):
        corr = torch.corrcoef(torch.stack([lanes[a].abs(), lanes[b].abs()]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), (a, b, corr)
