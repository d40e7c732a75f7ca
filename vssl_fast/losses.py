"""Reference VSSL losses in plain PyTorch (METHOD.md §2).

These functions are the specification the fused Triton kernels in ``vssl_fast.kernels`` are
tested against. They favour clarity over speed, always compute in (at least) float32 with
autocast disabled, and return one value per row: reduction over the batch is the caller's.

Conventions (METHOD.md §2.1): for a row pair ``(a, b)`` the cosine is
``c = a / max(|a|, 1e-8) . b / max(|b|, 1e-8)`` (the clamp of ``F.cosine_similarity``), and
``S_beta(a, b) = softplus_beta(-c) = log(1 + exp(-beta c)) / beta``. ``c`` is never clamped to
[-1, 1]: a clamp would zero the gradient at perfect alignment.

The analytic per-row gradients of §2.2 / §2.3 (``cosine_kl_grads``, ``cosine_ll_grads``) are
what the fused backward kernel implements; tests hold them to autograd at 1e-10 in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "COS_EPS",
    "cosine",
    "softplus_beta",
    "cosine_kl",
    "cosine_ll",
    "gaussian_kl",
    "gaussian_nll",
    "reparameterize",
    "reparameterize_logvar",
    "cosine_kl_grads",
    "cosine_ll_grads",
    "check_rows",
]

COS_EPS = 1e-8  # F.cosine_similarity's default eps, clamped per vector
LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- validation
def check_rows(fn: str, **tensors: torch.Tensor) -> None:
    """Every tensor is floating point, at least 1-D, and all share one shape and device.

    Raises ``TypeError`` / ``ValueError`` naming the function and the argument at fault.
    """
    ref_name, ref = None, None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: argument '{name}' must be a floating-point tensor, got {t.dtype}")
        if t.dim() < 1:
            raise ValueError(f"{fn}: argument '{name}' must have at least one dimension [.., d], got a scalar")
        if ref is None:
            ref_name, ref = name, t
            continue
        if t.shape != ref.shape:
            raise ValueError(
                f"{fn}: argument '{name}' has shape {tuple(t.shape)} but '{ref_name}' has shape "
                f"{tuple(ref.shape)}; all inputs must have the same shape [.., d]"
            )
        if t.device != ref.device:
            raise ValueError(f"{fn}: argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}")


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    """float32, or float64 if any input is float64 (gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _upcast(*ts: torch.Tensor) -> list[torch.Tensor]:
    dt = _compute_dtype(*ts)
    return [t.to(dt) for t in ts]


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


# --------------------------------------------------------------------------- primitives
def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = COS_EPS) -> torch.Tensor:
    """Row cosine with each norm clamped at ``eps`` (F.cosine_similarity semantics).

    Written as normalize-then-dot with ``clamp_min`` so that autograd gives the exact
    derivative in the clamped branch (the norm is then a constant, METHOD.md §2.1).
    """
    na = torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min(eps)
    nb = torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp_min(eps)
    return ((a / na) * (b / nb)).sum(-1)


def softplus_beta(x: torch.Tensor, beta: float) -> torch.Tensor:
    """log(1 + exp(beta x)) / beta; |beta c| <= beta so torch's threshold never triggers."""
    return F.softplus(x, beta=beta, threshold=1e30)


def _check_beta(fn: str, beta: float) -> float:
    beta = float(beta)
    if not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"{fn}: beta must be a positive finite number, got {beta}")
    return beta


# --------------------------------------------------------------------------- cosine losses
def cosine_kl(
    mu_q: torch.Tensor, mu_p: torch.Tensor, var_q: torch.Tensor, var_p: torch.Tensor, beta: float = 3.0
) -> torch.Tensor:
    """Cosine-softplus KL, eq. (9): 0.5 [log s + m^2 + s - 1] per row, in [-2.5533, 0.5325] at beta=3.

    ``m = S_beta(mu_q, mu_p)``, ``s = S_beta(var_q, var_p)``. The arguments are symmetric; by
    convention ``q`` is the student posterior and ``p`` the (detached) teacher prior.
    """
    check_rows("cosine_kl", mu_q=mu_q, mu_p=mu_p, var_q=var_q, var_p=var_p)
    beta = _check_beta("cosine_kl", beta)
    with _no_autocast(mu_q.device):
        mu_q, mu_p, var_q, var_p = _upcast(mu_q, mu_p, var_q, var_p)
        m = softplus_beta(-cosine(mu_q, mu_p), beta)
        s = softplus_beta(-cosine(var_q, var_p), beta)
        return 0.5 * (torch.log(s) + m * m + s - 1.0)


def cosine_ll(
    mu_m: torch.Tensor, mu_d: torch.Tensor, var_m: torch.Tensor, var_d: torch.Tensor, beta: float = 1.0
) -> torch.Tensor:
    """Cosine expected log-likelihood cost, eq. (10): log s + 4 s + m^2 s per row.

    ``m = S_beta(mu_m, mu_d)``, ``s = S_beta(var_m, var_d)``; in [0.12307, 7.79049] at beta=1.
    ``_m`` is the model (denoiser output), ``_d`` the data Gaussian (the detached teacher).
    It grows with misalignment, hence it is added as a cost by default (METHOD.md A3).
    """
    check_rows("cosine_ll", mu_m=mu_m, mu_d=mu_d, var_m=var_m, var_d=var_d)
    beta = _check_beta("cosine_ll", beta)
    with _no_autocast(mu_m.device):
        mu_m, mu_d, var_m, var_d = _upcast(mu_m, mu_d, var_m, var_d)
        m = softplus_beta(-cosine(mu_m, mu_d), beta)
        s = softplus_beta(-cosine(var_m, var_d), beta)
        return torch.log(s) + 4.0 * s + m * m * s


# --------------------------------------------------------------------------- Gaussian losses
def _reduce_dims(x: torch.Tensor, reduction: str, fn: str) -> torch.Tensor:
    if reduction == "sum":
        return x.sum(-1)
    if reduction == "mean":
        return x.mean(-1)
    raise ValueError(f"{fn}: reduction must be 'sum' or 'mean', got {reduction!r}")


def _clamp(x: torch.Tensor, clamp: tuple[float, float] | None) -> torch.Tensor:
    return x if clamp is None else x.clamp(clamp[0], clamp[1])


def gaussian_kl(
    mu_q: torch.Tensor,
    logvar_q: torch.Tensor,
    mu_p: torch.Tensor,
    logvar_p: torch.Tensor,
    *,
    reduction: str = "sum",
    logvar_clamp: tuple[float, float] | None = (-10.0, 10.0),
) -> torch.Tensor:
    """KL(N(mu_q, e^lq) || N(mu_p, e^lp)) = 0.5 sum_j [lp - lq + (e^lq + (mu_q-mu_p)^2) e^-lp - 1].

    Ratios are formed as e^(lq - lp), never e^lq / e^lp (METHOD.md §2.5).
    """
    check_rows("gaussian_kl", mu_q=mu_q, logvar_q=logvar_q, mu_p=mu_p, logvar_p=logvar_p)
    with _no_autocast(mu_q.device):
        mu_q, logvar_q, mu_p, logvar_p = _upcast(mu_q, logvar_q, mu_p, logvar_p)
        lq, lp = _clamp(logvar_q, logvar_clamp), _clamp(logvar_p, logvar_clamp)
        delta = mu_q - mu_p
        per_dim = 0.5 * (lp - lq + torch.exp(lq - lp) + delta * delta * torch.exp(-lp) - 1.0)
        return _reduce_dims(per_dim, reduction, "gaussian_kl")


def gaussian_nll(
    mu_m: torch.Tensor,
    logvar_m: torch.Tensor,
    mu_d: torch.Tensor,
    logvar_d: torch.Tensor,
    *,
    reduction: str = "sum",
    logvar_clamp: tuple[float, float] | None = (-10.0, 10.0),
) -> torch.Tensor:
    """-E_{y ~ N(mu_d, e^ld)} log N(y | mu_m, e^lm) = 0.5 sum_j [log 2pi + lm + (e^ld + delta^2) e^-lm]."""
    check_rows("gaussian_nll", mu_m=mu_m, logvar_m=logvar_m, mu_d=mu_d, logvar_d=logvar_d)
    with _no_autocast(mu_m.device):
        mu_m, logvar_m, mu_d, logvar_d = _upcast(mu_m, logvar_m, mu_d, logvar_d)
        lm, ld = _clamp(logvar_m, logvar_clamp), _clamp(logvar_d, logvar_clamp)
        delta = mu_m - mu_d
        per_dim = 0.5 * (LOG_2PI + lm + torch.exp(ld - lm) + delta * delta * torch.exp(-lm))
        return _reduce_dims(per_dim, reduction, "gaussian_nll")


# --------------------------------------------------------------------------- reparameterizations
def reparameterize(mu: torch.Tensor, var: torch.Tensor, eps: torch.Tensor, abs_noise: bool = True) -> torch.Tensor:
    """Paper form (§2.6): z = mu + var * |eps| (``abs_noise``) or mu + var * eps; var is the raw head output.

    ``eps`` is passed in (standard normal) so tests can fix it; no gradient flows to it.
    """
    check_rows("reparameterize", mu=mu, var=var, eps=eps)
    noise = eps.detach().abs() if abs_noise else eps.detach()
    return mu + var * noise


def reparameterize_logvar(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Classical form (§2.6): z = mu + exp(logvar / 2) * eps."""
    check_rows("reparameterize_logvar", mu=mu, logvar=logvar, eps=eps)
    return mu + torch.exp(0.5 * logvar) * eps.detach()


# --------------------------------------------------------------------------- analytic gradients
def _cos_parts(a: torch.Tensor, b: torch.Tensor):
    """c, 1/n_a, 1/n_b and the 'norm above eps' indicators of §2.1, per row (keepdim)."""
    na_raw = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    nb_raw = torch.linalg.vector_norm(b, dim=-1, keepdim=True)
    ia, ib = 1.0 / na_raw.clamp_min(COS_EPS), 1.0 / nb_raw.clamp_min(COS_EPS)
    c = (a * b).sum(-1, keepdim=True) * ia * ib
    return c, ia, ib, (na_raw > COS_EPS).to(a.dtype), (nb_raw > COS_EPS).to(a.dtype)


def _cos_vec_grads(kappa, a, b, c, ia, ib, ind_a, ind_b):
    """kappa * dc/da and kappa * dc/db (§2.1): b/(na nb) - c 1[|a|>eps] a/na^2, and symmetric."""
    ga = kappa * (b * (ia * ib) - c * ind_a * a * (ia * ia))
    gb = kappa * (a * (ia * ib) - c * ind_b * b * (ib * ib))
    return ga, gb


def _grad_setup(fn, mu1, mu2, u1, u2, grad_out):
    check_rows(fn, mu1=mu1, mu2=mu2, u1=u1, u2=u2)
    mu1, mu2, u1, u2 = _upcast(mu1, mu2, u1, u2)
    g = torch.ones(mu1.shape[:-1], dtype=mu1.dtype, device=mu1.device) if grad_out is None else grad_out
    return mu1, mu2, u1, u2, g.to(mu1.dtype).unsqueeze(-1)


def cosine_kl_grads(mu1, mu2, u1, u2, beta: float = 3.0, grad_out: torch.Tensor | None = None):
    """Analytic gradients of ``grad_out * cosine_kl(mu1, mu2, u1, u2, beta)`` (§2.2).

    kappa_mu = -g m sigm(-beta c_mu), kappa_u = -g (1 + 1/s)/2 sigm(-beta c_u).
    Returns (d/dmu1, d/dmu2, d/du1, d/du2).
    """
    beta = _check_beta("cosine_kl_grads", beta)
    mu1, mu2, u1, u2, g = _grad_setup("cosine_kl_grads", mu1, mu2, u1, u2, grad_out)
    cm, iam, ibm, jam, jbm = _cos_parts(mu1, mu2)
    cu, iau, ibu, jau, jbu = _cos_parts(u1, u2)
    m = softplus_beta(-cm, beta)
    s = softplus_beta(-cu, beta)
    k_mu = -g * m * torch.sigmoid(-beta * cm)
    k_u = -g * 0.5 * (1.0 + 1.0 / s) * torch.sigmoid(-beta * cu)
    g_mu1, g_mu2 = _cos_vec_grads(k_mu, mu1, mu2, cm, iam, ibm, jam, jbm)
    g_u1, g_u2 = _cos_vec_grads(k_u, u1, u2, cu, iau, ibu, jau, jbu)
    return g_mu1, g_mu2, g_u1, g_u2


def cosine_ll_grads(mu1, mu2, u1, u2, beta: float = 1.0, grad_out: torch.Tensor | None = None):
    """Analytic gradients of ``grad_out * cosine_ll(mu1, mu2, u1, u2, beta)`` (§2.3).

    kappa_mu = -g 2 m s sigm(-beta c_mu), kappa_u = -g (1/s + 4 + m^2) sigm(-beta c_u).
    Returns (d/dmu1, d/dmu2, d/du1, d/du2).
    """
    beta = _check_beta("cosine_ll_grads", beta)
    mu1, mu2, u1, u2, g = _grad_setup("cosine_ll_grads", mu1, mu2, u1, u2, grad_out)
    cm, iam, ibm, jam, jbm = _cos_parts(mu1, mu2)
    cu, iau, ibu, jau, jbu = _cos_parts(u1, u2)
    m = softplus_beta(-cm, beta)
    s = softplus_beta(-cu, beta)
    k_mu = -g * 2.0 * m * s * torch.sigmoid(-beta * cm)
    k_u = -g * (1.0 / s + 4.0 + m * m) * torch.sigmoid(-beta * cu)
    g_mu1, g_mu2 = _cos_vec_grads(k_mu, mu1, mu2, cm, iam, ibm, jam, jbm)
    g_u1, g_u2 = _cos_vec_grads(k_u, u1, u2, cu, iau, ibu, jau, jbu)
    return g_mu1, g_mu2, g_u1, g_u2
