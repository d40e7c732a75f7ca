"""The VSSL objective and the BYOL control (METHOD.md §1.5-§1.7), and one training step.

``compute_loss`` is the forward of one step on two views; ``train_step`` adds backward, the
optimizer step and the EMA update. Both are plain PyTorch apart from the loss core, which runs
either the reference losses of ``vssl_fast.losses`` (``impl='reference'``) or the fused Triton
ops of ``vssl_fast.kernels`` (``impl='fused'``; ``'auto'`` = fused on CUDA for the cosine
divergence with ``var_param='raw'``, reference otherwise).

Fused coverage: the fused ops implement the default cosine divergence with the paper's raw
variance (``var_param='raw'``) and half-normal or normal noise. ``divergence='gaussian'`` and
``var_param`` in {logvar, softplus} always run the reference path, also under ``impl='auto'``;
``impl='fused'`` with them is an error that says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from vssl_fast import losses
from vssl_fast.typed import check_choices

__all__ = ["MethodConfig", "compute_loss", "train_step", "LossOutput"]

@dataclass
class MethodConfig:
    """Every flag of METHOD.md §1.7 (defaults = the spec's recommended reading)."""

    method: Literal["vssl", "byol"] = "vssl"  # byol: the control (same backbone/projector/predictor, loss 2 - 2cos)
    proj_hidden_dim: int = 4096  # projector hidden width H_p
    proj_output_dim: int = 256  # latent d; VSSL heads output 2d
    pred_hidden_dim: int = 4096  # predictor hidden width H_q (8192 for imagenet-100)
    denoiser_hidden_dim: int = 4096  # hidden width H_n of the two denoisers
    divergence: Literal["cosine", "gaussian"] = "cosine"  # the KL term (gaussian is never fused)
    var_param: Literal["raw", "logvar", "softplus"] = "raw"  # the variance head's output; gaussian needs logvar or softplus
    abs_noise: bool | None = None  # eps ~ |N(0,1)|; none: true for cosine, false for gaussian
    kl_beta: float = 3.0  # the softplus sharpness of the cosine KL
    ll_beta: float = 1.0  # the softplus sharpness of the cosine log-likelihood
    lambda_kl: float = 1.0  # the weight of the KL term
    lambda_ll: float = 1.0  # the weight of the log-likelihood term
    ll_sign: Literal[1, -1] = 1  # +1: eq.(10) is a cost (A3); -1: literal L_KL - L_ll
    teacher_predictor: bool = False  # A1: the teacher has an EMA predictor too
    same_view_pairs: bool = False  # A2: also pair each view with itself
    denoiser_input: Literal["sample", "params"] = "sample"  # A4: what the denoisers read
    ll_target: Literal["teacher", "student_detached"] = "teacher"  # A4: what the log-likelihood scores against
    head: Literal["shared_split", "separate_mlps"] = "shared_split"  # one MLP split into mean and variance, or two
    gaussian_reduction: Literal["sum", "mean"] = "sum"  # A11: over dims
    logvar_clamp: tuple[float, float] = (-10.0, 10.0)  # the log-variance range of var_param=logvar
    teacher_buffers: Literal["own", "copy"] = "own"  # the teacher's BatchNorm buffers (see vssl_fast.models)
    impl: Literal["auto", "fused", "reference"] = "auto"  # the loss core: fused Triton ops or the reference losses

    def __post_init__(self):
        self.validate()

    def validate(self) -> MethodConfig:
        check_choices(self, "method")
        for key in ("kl_beta", "ll_beta"):
            if not float(getattr(self, key)) > 0:
                raise ValueError(f"method.{key}: must be > 0, got {getattr(self, key)!r}")
        for key in ("proj_hidden_dim", "proj_output_dim", "pred_hidden_dim", "denoiser_hidden_dim"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"method.{key}: must be a positive integer, got {getattr(self, key)!r}")
        lo, hi = self.logvar_clamp
        if not lo < hi:
            raise ValueError(f"method.logvar_clamp: need low < high, got {self.logvar_clamp!r}")
        if self.divergence == "gaussian" and self.var_param == "raw":
            raise ValueError(
                "method.var_param: divergence='gaussian' needs a positive variance; set var_param to "
                "'logvar' or 'softplus' (the raw head output may be negative, METHOD.md A6)"
            )
        return self

    @property
    def noise_is_abs(self) -> bool:
        return self.divergence == "cosine" if self.abs_noise is None else bool(self.abs_noise)

    def model_kwargs(self) -> dict:
        keys = ("method", "proj_hidden_dim", "proj_output_dim", "pred_hidden_dim", "denoiser_hidden_dim",
                "denoiser_input", "head", "teacher_predictor", "teacher_buffers")
        return {k: getattr(self, k) for k in keys}

    def replace(self, **kw) -> MethodConfig:
        return dataclasses.replace(self, **kw)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backpropagate
    parts: dict[str, torch.Tensor]  # detached scalars: kl, ll, ce, diagnostics (no host sync)


# ---------------------------------------------------------------------------- helpers
def _use_fused(cfg: MethodConfig, device: torch.device) -> bool:
    fusable = cfg.method == "vssl" and cfg.divergence == "cosine" and cfg.var_param == "raw"
    if cfg.impl == "reference":
        return False
    if cfg.impl == "fused":
        if not fusable:
            raise ValueError(
                "method.impl='fused' covers only divergence='cosine' with var_param='raw'; "
                f"got divergence={cfg.divergence!r}, var_param={cfg.var_param!r}: use impl='reference' or 'auto'"
            )
        return True
    return fusable and device.type == "cuda"


def variance(cfg: MethodConfig, v: torch.Tensor) -> torch.Tensor:
    """The 'variance' vector u that the cosine terms see (§1.2)."""
    if cfg.var_param == "raw":
        return v
    if cfg.var_param == "logvar":
        return torch.exp(v.float().clamp(*cfg.logvar_clamp))
    return F.softplus(v.float()) + 1e-4


def log_variance(cfg: MethodConfig, v: torch.Tensor) -> torch.Tensor:
    """log sigma^2 for the Gaussian terms (logvar or softplus parametrisations only)."""
    if cfg.var_param == "logvar":
        return v.float()
    return torch.log(F.softplus(v.float()) + 1e-4)


def _sample(cfg: MethodConfig, mu, v, eps):
    """Reparameterised student sample for the reference path (§2.6)."""
    noise = eps.abs() if cfg.noise_is_abs else eps
    if cfg.var_param == "raw":
        return losses.reparameterize(mu.float(), v.float(), noise, abs_noise=False)
    std = torch.exp(0.5 * log_variance(cfg, v))
    return mu.float() + std * noise


def _std_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return losses.cosine(a.detach().float(), b.detach().float()).mean()


def _pairs(same_view: bool) -> list[tuple[int, int]]:
    return [(0, 1), (1, 0)] + ([(0, 0), (1, 1)] if same_view else [])


# ---------------------------------------------------------------------------- the loss
def compute_loss(
    model,
    x1: torch.Tensor,
    x2: torch.Tensor,
    labels: torch.Tensor | None,
    cfg: MethodConfig,
    *,
    seed: int | torch.Tensor = 0,
    eps: torch.Tensor | None = None,
) -> LossOutput:
    """Forward of one step: returns the total loss and its parts (METHOD.md §1.5).

    ``seed`` drives the fused kernel's in-kernel Philox noise (an int, or an int64 tensor on the
    device to avoid recompiles); ``eps`` ([2B, d], standard normal, view-major rows) fixes the
    reference path's noise; without it the reference draws ``torch.randn``.
    """
    if x1.shape != x2.shape:
        raise ValueError(f"compute_loss: the two views differ in shape: x1 {tuple(x1.shape)} vs x2 {tuple(x2.shape)}")
    if x1.dim() != 4:
        raise ValueError(f"compute_loss: views must be [B, C, H, W] image batches, got x1 of shape {tuple(x1.shape)}")
    B = x1.shape[0]
    if labels is not None and labels.shape != (B,):
        raise ValueError(f"compute_loss: labels must have shape ({B},), got {tuple(labels.shape)}")

    # Each view is its own batch of B, so BN statistics are per view (solo-learn).
    outs = [model.student_forward(x) for x in (x1, x2)]
    targets = [model.teacher_forward(x) for x in (x1, x2)]
    h = [o[0] for o in outs]
    logits = [o[3] for o in outs]
    parts: dict[str, torch.Tensor] = {}
    if labels is not None:
        ce = 0.5 * sum(F.cross_entropy(lg.float(), labels) for lg in logits)
        parts["ce"] = ce.detach()
        with torch.no_grad():
            parts["acc1"] = 0.5 * sum((lg.argmax(-1) == labels).float().mean() for lg in logits)
    else:
        ce = torch.zeros((), device=x1.device)
    pairs = _pairs(cfg.same_view_pairs)

    if cfg.method == "byol":
        ssl = 0.0
        for v, w in pairs:
            ssl = ssl + (2.0 - 2.0 * losses.cosine(outs[v][2].float(), targets[w].float())).mean()
        parts["byol"] = ssl.detach()
        parts["cos_mu"] = sum(_std_cos(outs[v][2], targets[w]) for v, w in pairs) / len(pairs)
        z_proj = outs[0][1]
    else:
        ssl, z_proj = _vssl_terms(model, cfg, outs, targets, pairs, B, seed, eps, parts)

    # Collapse monitor (solo-learn train_z_std): std over the batch of the normalised projector mean.
    with torch.no_grad():
        zn = F.normalize(z_proj.detach().float(), dim=-1)
        parts["z_std"] = zn.std(dim=0).mean()
        parts["feat_norm"] = h[0].detach().float().norm(dim=-1).mean()
    loss = ssl + ce
    parts["loss"] = loss.detach()
    return LossOutput(loss=loss, parts=parts)


def _vssl_terms(model, cfg, outs, targets, pairs, B, seed, eps, parts):
    mu_hat, u_hat = zip(*[model.split(o[2]) for o in outs])  # student posterior (predictor output)
    mu_t, v_t = zip(*[model.split(t) for t in targets])  # teacher prior (detached)
    if cfg.ll_target == "teacher":
        ll_mu_t, ll_v_t = mu_t, v_t
    else:  # the student's own other-view posterior, detached
        ll_mu_t, ll_v_t = [m.detach() for m in mu_hat], [v.detach() for v in u_hat]

    # Rows are stacked view-major so both ordered pairs go through one launch: row v*B + b.
    cross = [(0, 1), (1, 0)]
    same = [p for p in pairs if p not in cross]
    cat = lambda xs, idx: torch.cat([xs[i] for i in idx], 0)  # noqa: E731
    S = cat(mu_hat, [0, 1]), cat(u_hat, [0, 1])
    T = cat(mu_t, [1, 0]), cat(v_t, [1, 0])
    fused = _use_fused(cfg, S[0].device)
    d = S[0].shape[-1]

    if fused:
        from vssl_fast import kernels

        kl_rows, z = kernels.cosine_kl_sample(S[0], S[1], T[0], T[1], beta=cfg.kl_beta, seed=seed, abs_noise=cfg.noise_is_abs)
        kl_sum = kl_rows.sum()
        for v, w in same:
            kl_sum = kl_sum + kernels.cosine_kl_sample(mu_hat[v], u_hat[v], mu_t[w], v_t[w], beta=cfg.kl_beta,
                                                       seed=seed, abs_noise=cfg.noise_is_abs)[0].sum()
    else:
        if eps is None:
            eps = torch.randn(2 * B, d, device=S[0].device, dtype=torch.float32)
        elif eps.shape != (2 * B, d):
            raise ValueError(f"compute_loss: eps must have shape {(2 * B, d)}, got {tuple(eps.shape)}")
        z = _sample(cfg, S[0], S[1], eps)
        kl_sum = _kl(cfg, S[0], S[1], T[0], T[1]).sum()
        for v, w in same:
            kl_sum = kl_sum + _kl(cfg, mu_hat[v], u_hat[v], mu_t[w], v_t[w]).sum()
    loss_kl = kl_sum / B  # mean over the batch, summed over view pairs (A11)

    # Denoisers: from the student sample (A4a) or the deterministic parameters (A4b).
    # Each view's rows go through the denoisers as their own batch (per-view BN statistics, §1.5).
    den_in = z if cfg.denoiser_input == "sample" else torch.cat([S[0], S[1]], dim=-1)
    m_v = [model.denoiser_mu(zv) for zv in den_in.chunk(2, 0)]
    r_v = [model.denoiser_var(zv) for zv in den_in.chunk(2, 0)]
    m_all, r_all = torch.cat(m_v, 0), torch.cat(r_v, 0)
    ll_sum = 0.0
    ll_pairs = [(cross, cat(m_v, [0, 1]), cat(r_v, [0, 1]), cat(ll_mu_t, [1, 0]), cat(ll_v_t, [1, 0]))]
    for v, w in same:
        ll_pairs.append(([(v, w)], m_v[v], r_v[v], ll_mu_t[w], ll_v_t[w]))
    for _, m, r, mt, vt in ll_pairs:
        if fused:
            ll_sum = ll_sum + kernels.cosine_ll(m, r, mt, vt, beta=cfg.ll_beta).sum()
        else:
            ll_sum = ll_sum + _ll(cfg, m, r, mt, vt).sum()
    loss_ll = ll_sum / B

    ssl = cfg.lambda_kl * loss_kl + cfg.ll_sign * cfg.lambda_ll * loss_ll
    with torch.no_grad():
        parts["kl"] = loss_kl.detach()
        parts["ll"] = loss_ll.detach()
        parts["cos_mu"] = _std_cos(S[0], T[0])
        parts["cos_var"] = _std_cos(variance(cfg, S[1]), variance(cfg, T[1]))
        parts["cos_m"] = _std_cos(m_all, cat(ll_mu_t, [1, 0]))
        parts["cos_r"] = _std_cos(variance(cfg, r_all), variance(cfg, cat(ll_v_t, [1, 0])))
        parts["var_norm"] = variance(cfg, S[1]).float().norm(dim=-1).mean()
    z_proj = model.split(outs[0][1])[0]  # projector mean, for the collapse monitor
    return ssl, z_proj


def _kl(cfg: MethodConfig, mu_q, v_q, mu_p, v_p) -> torch.Tensor:
    if cfg.divergence == "cosine":
        return losses.cosine_kl(mu_q, mu_p, variance(cfg, v_q), variance(cfg, v_p), beta=cfg.kl_beta)
    return losses.gaussian_kl(mu_q, log_variance(cfg, v_q), mu_p, log_variance(cfg, v_p),
                              reduction=cfg.gaussian_reduction, logvar_clamp=cfg.logvar_clamp)


def _ll(cfg: MethodConfig, m, r, mu_d, v_d) -> torch.Tensor:
    if cfg.divergence == "cosine":
        return losses.cosine_ll(m, mu_d, variance(cfg, r), variance(cfg, v_d), beta=cfg.ll_beta)
    return losses.gaussian_nll(m, log_variance(cfg, r), mu_d, log_variance(cfg, v_d),
                               reduction=cfg.gaussian_reduction, logvar_clamp=cfg.logvar_clamp)


# ---------------------------------------------------------------------------- one step
def train_step(model, optimizer, x1, x2, labels, cfg: MethodConfig, tau, *, seed=0, eps=None) -> LossOutput:
    """compute_loss, backward, optimizer step, then EMA of the teacher with ``tau`` (§1.5 steps 1-2)."""
    out = compute_loss(model, x1, x2, labels, cfg, seed=seed, eps=eps)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    model.ema_update(tau)
    return out
