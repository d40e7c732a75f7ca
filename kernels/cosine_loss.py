"""Fused cosine-softplus KL (eq. 9) with the reparameterization, and the cosine LL (eq. 10).

METHOD.md §2.2, §2.3, §2.6, §2.7. A row is one sample of one ordered view pair; callers stack
both ordered pairs as 2B rows so they go through one launch. A program handles BLOCK_R rows.

- ``cosine_kl_sample(mu, var, mu_t, var_t, beta, seed, abs_noise) -> (kl [R] fp32, z [R, d])``:
  one pass reduces the six dot products, the row loss follows, and the same program writes
  ``z = mu + var * |eps|`` with eps a pure function of (seed, row, col): normal ``col % 4`` of
  the four one Philox call at counter ``row * ceil(d / 4) + col // 4`` gives (independent of the
  tiling), so backward regenerates eps instead of storing it.
- ``cosine_ll(m, r, mu_t, var_t, beta) -> ll [R] fp32``.

Backward recomputes the row reductions instead of saving per-row statistics: the gradient
formulas need the four input rows anyway, so the second read of each row comes from L1/L2
(a row of d <= 2048 is one chunk) and no side buffer is allocated. Gradients flow to the student side
only; teacher inputs are constants (passing a teacher tensor that requires grad is an error).

All math is fp32 whatever the input dtype (fp32 / bf16 / fp16); z and the gradients come back
in the dtype of the tensor they belong to. The cosine clamps each norm at 1e-8 like
``F.cosine_similarity`` and uses the exact derivative in the clamped branch (§2.1).

Memory per call, in elements of the input width per (row, col) (fp32: x 4 B): KL+sample forward 5,
backward 7 (12 per training use); LL forward 4, backward 6 (10). Each kernel is one pass from DRAM;
the second read of a row inside a program hits L1/L2 (one row of d <= 2048 is one chunk). Launch
settings (elements per tile, warps) come from ``launch.settings("cosine", device)``.

Both ops are ``torch.library.custom_op``s with fake and autograd registrations, not pinned to
CUDA: they run inside ``torch.compile(fullgraph=True)`` and on CPU tensors under
``TRITON_INTERPRET=1``. ``*_reference`` functions beside them are what tests and benchmarks
compare with.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vssl_fast import losses

from . import launch
from ._common import next_pow2, require_triton

__all__ = [
    "cosine_kl_sample",
    "cosine_ll",
    "sample_noise",
    "cosine_kl_sample_reference",
    "cosine_ll_reference",
]

_NORM_EPS = 1e-8
_MAX_BLOCK = 2048  # a row of d <= 2048 is one chunk in registers; larger d loops over chunks


# ============================================================================ device helpers
# Every kernel works on a [BLOCK_R, BLOCK_D] tile: BLOCK_R rows per program (several rows for
# small d so a program still moves ~4K elements; one row at d >= 2048), chunks along d.
@triton.jit
def _tile(ptr, rows, stride, cols, mask):
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_cos(a_ptr, b_ptr, a_stride, b_stride, rows, rmask, D, BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """Per row: c = a.b / (max(|a|,eps) max(|b|,eps)), 1/n_a, 1/n_b, 1[|a|>eps]; fp32."""
    dot = tl.zeros_like(rows).to(tl.float32)
    saa = tl.zeros_like(rows).to(tl.float32)
    sbb = tl.zeros_like(rows).to(tl.float32)
    for ch in range(NUM_CHUNKS):
        cols = ch * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        a = _tile(a_ptr, rows, a_stride, cols, mask)
        b = _tile(b_ptr, rows, b_stride, cols, mask)
        dot += tl.sum(a * b, axis=1)
        saa += tl.sum(a * a, axis=1)
        sbb += tl.sum(b * b, axis=1)
    na = tl.sqrt(saa)
    nb = tl.sqrt(sbb)
    big_a = na > 1e-8
    # NaN norms fail the comparison and fall to eps; c is still NaN through `dot`.
    ia = 1.0 / tl.where(big_a, na, 1e-8)
    ib = 1.0 / tl.where(nb > 1e-8, nb, 1e-8)
    c = dot * ia * ib
    return c, ia, ib, big_a.to(tl.float32)


@triton.jit
def _softplus_neg(c, beta):
    """S_beta = softplus_beta(-c) = (max(-beta c, 0) + log(1 + exp(-|beta c|))) / beta.

    |beta c| <= beta (~3), so exp(-|x|) >= 0.05 and log(1 + .) loses nothing without log1p.
    """
    x = -beta * c
    return (tl.where(x > 0, x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))) / beta


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _noise(seed, rows, col0, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ABS_NOISE: tl.constexpr):
    """The noise of columns [col0, col0 + BLOCK_D) of ``rows``, [BLOCK_R, BLOCK_D] fp32.

    Element (r, c) is normal number c % 4 of the four that one Philox-4x32-10 call at counter
    ``r * ceil(d / 4) + c // 4`` gives (two Box-Muller pairs): a quarter of the Philox work and
    half the log/sqrt of one call per element, and still a pure function of (seed, r, c),
    independent of the tiling (BLOCK_D is a multiple of 4, col0 of BLOCK_D).
    """
    d4 = (D + 3) // 4
    groups = col0 // 4 + tl.arange(0, BLOCK_D // 4)
    n1, n2, n3, n4 = tl.randn4x(seed, rows[:, None] * d4 + groups[None, :])
    # [R, D/4, 2, 2] holding (n1, n2, n3, n4) in row-major order, then one row of D
    eps = tl.reshape(tl.join(tl.join(n1, n3), tl.join(n2, n4)), (BLOCK_R, BLOCK_D))
    if ABS_NOISE:
        eps = tl.abs(eps)
    return eps


@triton.jit
def _cos_grad_store(out_ptr, rows, rmask, D, a_ptr, b_ptr, a_stride, b_stride, kappa, c, ia, ib, big_a,
                    gz_ptr, seed, MODE: tl.constexpr, ABS_NOISE: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """out = kappa (b/(na nb) - c 1[|a|>eps] a/na^2), plus grad_z (MODE 1) or grad_z * noise (MODE 2)."""
    k_b = (kappa * ia * ib)[:, None]
    k_a = (kappa * c * big_a * ia * ia)[:, None]
    for ch in range(NUM_CHUNKS):
        cols = ch * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        a = _tile(a_ptr, rows, a_stride, cols, mask)
        b = _tile(b_ptr, rows, b_stride, cols, mask)
        g = k_b * b - k_a * a
        offs = rows[:, None] * D + cols[None, :]
        if MODE > 0:
            gz = tl.load(gz_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if MODE == 2:
                gz = gz * _noise(seed, rows, ch * BLOCK_D, D, BLOCK_R, BLOCK_D, ABS_NOISE)
            g += gz
        tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pair_stats(a_ptr, b_ptr, u_ptr, v_ptr, s_a, s_b, s_u, s_v, rows, rmask, D, beta,
                BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """Both cosines of a row (means a.b, variances u.v) with their norms, and m = S(c_mu), s = S(c_u)."""
    c_mu, ia_m, ib_m, big_m = _row_cos(a_ptr, b_ptr, s_a, s_b, rows, rmask, D, BLOCK_D, NUM_CHUNKS)
    c_u, ia_u, ib_u, big_u = _row_cos(u_ptr, v_ptr, s_u, s_v, rows, rmask, D, BLOCK_D, NUM_CHUNKS)
    return c_mu, ia_m, ib_m, big_m, c_u, ia_u, ib_u, big_u, _softplus_neg(c_mu, beta), _softplus_neg(c_u, beta)


@triton.jit
def _rows_of_program(R, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    return rows, rows < R


# ============================================================================ kernels
@triton.jit
def _cosine_kl_fwd_kernel(mu_ptr, var_ptr, mut_ptr, vart_ptr, z_ptr, kl_ptr, seed_ptr,
                          s_mu, s_var, s_mut, s_vart, R, D, beta, ABS_NOISE: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """KL + sample, one pass from DRAM: reads mu, var, mu_t, var_t (4 elements of the input width per
    (row, col)), writes z (1) and 4 B per row: 5 elements per (row, col), 20 B in fp32. The z loop
    re-reads mu and var this program has just read (L1/L2). Philox draws one normal per element."""
    rows, rmask = _rows_of_program(R, BLOCK_R)
    _, _, _, _, _, _, _, _, m, s = _pair_stats(mu_ptr, mut_ptr, var_ptr, vart_ptr, s_mu, s_mut, s_var, s_vart, rows, rmask,
                                               D, beta, BLOCK_D, NUM_CHUNKS)
    tl.store(kl_ptr + rows, 0.5 * (tl.log(s) + m * m + s - 1.0), mask=rmask)
    seed = tl.load(seed_ptr)
    for ch in range(NUM_CHUNKS):
        cols = ch * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        mu = _tile(mu_ptr, rows, s_mu, cols, mask)
        var = _tile(var_ptr, rows, s_var, cols, mask)
        offs = rows[:, None] * D + cols[None, :]
        z = mu + var * _noise(seed, rows, ch * BLOCK_D, D, BLOCK_R, BLOCK_D, ABS_NOISE)
        tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cosine_kl_bwd_kernel(gkl_ptr, gz_ptr, mu_ptr, var_ptr, mut_ptr, vart_ptr, seed_ptr, dmu_ptr, dvar_ptr,
                          s_mu, s_var, s_mut, s_vart, R, D, beta,
                          MU_MODE: tl.constexpr, VAR_MODE: tl.constexpr, ABS_NOISE: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """KL + sample backward, one pass from DRAM: reads mu, var, mu_t, var_t and grad_z (5 elements per
    (row, col)), writes d mu and d var (2): 7 elements, 28 B in fp32. The row statistics are
    recomputed, not saved; the gradient loops re-read this program's rows (L1/L2), grad_z twice.
    The noise is regenerated (Philox, no bytes) instead of stored.

    MU_MODE / VAR_MODE: 0 = no grad_z, 1 = add grad_z, 2 = add grad_z * noise (reparam backward)."""
    rows, rmask = _rows_of_program(R, BLOCK_R)
    c_mu, ia_m, ib_m, big_m, c_u, ia_u, ib_u, big_u, m, s = _pair_stats(
        mu_ptr, mut_ptr, var_ptr, vart_ptr, s_mu, s_mut, s_var, s_vart, rows, rmask, D, beta, BLOCK_D, NUM_CHUNKS)
    g = tl.load(gkl_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    k_mu = -g * m * _sigmoid(-beta * c_mu)
    k_u = -g * 0.5 * (1.0 + 1.0 / s) * _sigmoid(-beta * c_u)
    seed = tl.load(seed_ptr)
    _cos_grad_store(dmu_ptr, rows, rmask, D, mu_ptr, mut_ptr, s_mu, s_mut, k_mu, c_mu, ia_m, ib_m, big_m,
                    gz_ptr, seed, MU_MODE, ABS_NOISE, BLOCK_R, BLOCK_D, NUM_CHUNKS)
    _cos_grad_store(dvar_ptr, rows, rmask, D, var_ptr, vart_ptr, s_var, s_vart, k_u, c_u, ia_u, ib_u, big_u,
                    gz_ptr, seed, VAR_MODE, ABS_NOISE, BLOCK_R, BLOCK_D, NUM_CHUNKS)


@triton.jit
def _cosine_ll_fwd_kernel(m_ptr, r_ptr, mut_ptr, vart_ptr, ll_ptr, s_m, s_r, s_mut, s_vart, R, D, beta,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """LL, one pass: reads m, r, mu_t, var_t (4 elements per (row, col), 16 B in fp32), 4 B per row out."""
    rows, rmask = _rows_of_program(R, BLOCK_R)
    _, _, _, _, _, _, _, _, m, s = _pair_stats(m_ptr, mut_ptr, r_ptr, vart_ptr, s_m, s_mut, s_r, s_vart, rows, rmask, D,
                                               beta, BLOCK_D, NUM_CHUNKS)
    tl.store(ll_ptr + rows, tl.log(s) + 4.0 * s + m * m * s, mask=rmask)


@triton.jit
def _cosine_ll_bwd_kernel(gll_ptr, m_ptr, r_ptr, mut_ptr, vart_ptr, dm_ptr, dr_ptr, s_m, s_r, s_mut, s_vart, R, D,
                          beta, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """LL backward, one pass: reads m, r, mu_t, var_t (4 elements per (row, col)), writes d m and d r (2):
    6 elements, 24 B in fp32; the gradient loops re-read this program's rows (L1/L2)."""
    rows, rmask = _rows_of_program(R, BLOCK_R)
    c_mu, ia_m, ib_m, big_m, c_u, ia_u, ib_u, big_u, m, s = _pair_stats(
        m_ptr, mut_ptr, r_ptr, vart_ptr, s_m, s_mut, s_r, s_vart, rows, rmask, D, beta, BLOCK_D, NUM_CHUNKS)
    g = tl.load(gll_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    k_mu = -g * 2.0 * m * s * _sigmoid(-beta * c_mu)
    k_u = -g * (1.0 / s + 4.0 + m * m) * _sigmoid(-beta * c_u)
    _cos_grad_store(dm_ptr, rows, rmask, D, m_ptr, mut_ptr, s_m, s_mut, k_mu, c_mu, ia_m, ib_m, big_m,
                    gll_ptr, 0, 0, False, BLOCK_R, BLOCK_D, NUM_CHUNKS)
    _cos_grad_store(dr_ptr, rows, rmask, D, r_ptr, vart_ptr, s_r, s_vart, k_u, c_u, ia_u, ib_u, big_u,
                    gll_ptr, 0, 0, False, BLOCK_R, BLOCK_D, NUM_CHUNKS)


@triton.jit
def _sample_noise_kernel(out_ptr, seed_ptr, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                         NUM_CHUNKS: tl.constexpr):
    """The noise the KL kernels draw, written out (tests and references only): 4 B per element."""
    rows, rmask = _rows_of_program(R, BLOCK_R)
    seed = tl.load(seed_ptr)
    for ch in range(NUM_CHUNKS):
        cols = ch * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        tl.store(out_ptr + rows[:, None] * D + cols[None, :], _noise(seed, rows, ch * BLOCK_D, D, BLOCK_R, BLOCK_D, False),
                 mask=mask)


# ============================================================================ launchers
def _launch_cfg(R: int, D: int, device: torch.device):
    """Grid and meta-parameters from the launch table (``launch.settings("cosine", device)``)."""
    return tile_meta(R, D, launch.settings("cosine", device))


def tile_meta(R: int, D: int, cfg: dict):
    """(grid, meta) for ``cfg`` = {TILE, num_warps, num_warps_wide}: a program holds ``TILE``
    elements, ``TILE // BLOCK_D`` rows when a row is shorter than the tile, else one row (looping
    over chunks of 2048); ``num_warps_wide`` applies to rows of 2048-element chunks (d > 1024)."""
    block_d = min(max(next_pow2(max(D, 1)), 4), _MAX_BLOCK)  # >= 4: the noise comes in groups of 4 columns
    block_r = max(1, min(cfg["TILE"] // block_d, next_pow2(max(R, 1))))
    meta = dict(BLOCK_R=block_r, BLOCK_D=block_d, NUM_CHUNKS=triton.cdiv(max(D, 1), block_d),
                num_warps=cfg["num_warps_wide"] if block_d >= 2048 else cfg["num_warps"])
    return (triton.cdiv(max(R, 1), block_r),), meta


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view [R, d] with unit column stride (copies only when it must)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(fn: str, student: dict, teacher: dict) -> None:
    losses.check_rows(fn, **student, **teacher)
    first = next(iter(student.values()))
    if first.dim() != 2:
        raise ValueError(f"{fn}: inputs must be 2-D [rows, d], got shape {tuple(first.shape)}")
    for name, t in teacher.items():
        if t.requires_grad:
            raise ValueError(
                f"{fn}: teacher input '{name}' requires grad, but the fused op treats teacher inputs as constants; "
                "pass it detached (or use the reference losses)"
            )
    for name, t in {**student, **teacher}.items():
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{fn}: argument '{name}' must be float32, bfloat16 or float16, got {t.dtype}")
    require_triton(fn, first.device)


def _seed_tensor(seed, device) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"seed must be an int or a one-element int tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a one-element int tensor, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.tensor([seed], dtype=torch.int64, device=device)


# ---------------------------------------------------------------- KL + sample op
@torch.library.custom_op("vssl_fast::cosine_kl_sample", mutates_args=())
def _cosine_kl_sample_op(mu: torch.Tensor, var: torch.Tensor, mu_t: torch.Tensor, var_t: torch.Tensor,
                         seed: torch.Tensor, beta: float, abs_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    mu, var, mu_t, var_t = (_rows(t) for t in (mu, var, mu_t, var_t))
    R, D = mu.shape
    kl = torch.empty(R, device=mu.device, dtype=torch.float32)
    z = torch.empty((R, D), device=mu.device, dtype=mu.dtype)
    if R > 0:
        grid, meta = _launch_cfg(R, D, mu.device)
        _cosine_kl_fwd_kernel[grid](mu, var, mu_t, var_t, z, kl, seed, mu.stride(0), var.stride(0), mu_t.stride(0),
                                    var_t.stride(0), R, D, float(beta), ABS_NOISE=bool(abs_noise), **meta)
    return kl, z


@_cosine_kl_sample_op.register_fake
def _(mu, var, mu_t, var_t, seed, beta, abs_noise):
    return mu.new_empty(mu.shape[0], dtype=torch.float32), torch.empty_like(mu, memory_format=torch.contiguous_format)


@torch.library.custom_op("vssl_fast::cosine_kl_sample_bwd", mutates_args=())
def _cosine_kl_sample_bwd_op(grad_kl: torch.Tensor, grad_z: torch.Tensor | None, mu: torch.Tensor, var: torch.Tensor,
                             mu_t: torch.Tensor, var_t: torch.Tensor, seed: torch.Tensor, beta: float,
                             abs_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    mu, var, mu_t, var_t = (_rows(t) for t in (mu, var, mu_t, var_t))
    R, D = mu.shape
    dmu, dvar = torch.empty((R, D), device=mu.device, dtype=mu.dtype), torch.empty((R, D), device=mu.device, dtype=var.dtype)
    grad_kl = grad_kl.contiguous()
    gz = grad_z.contiguous() if grad_z is not None else grad_kl
    if R > 0:
        grid, meta = _launch_cfg(R, D, mu.device)
        _cosine_kl_bwd_kernel[grid](grad_kl, gz, mu, var, mu_t, var_t, seed, dmu, dvar, mu.stride(0), var.stride(0),
                                    mu_t.stride(0), var_t.stride(0), R, D, float(beta),
                                    MU_MODE=1 if grad_z is not None else 0, VAR_MODE=2 if grad_z is not None else 0,
                                    ABS_NOISE=bool(abs_noise), **meta)
    return dmu, dvar


@_cosine_kl_sample_bwd_op.register_fake
def _(grad_kl, grad_z, mu, var, mu_t, var_t, seed, beta, abs_noise):
    return (torch.empty_like(mu, memory_format=torch.contiguous_format),
            torch.empty_like(var, memory_format=torch.contiguous_format))


def _kl_setup(ctx, inputs, output):
    mu, var, mu_t, var_t, seed, beta, abs_noise = inputs
    ctx.save_for_backward(mu, var, mu_t, var_t, seed)
    ctx.beta, ctx.abs_noise = beta, abs_noise


def _kl_backward(ctx, grad_kl, grad_z):
    mu, var, mu_t, var_t, seed = ctx.saved_tensors
    if grad_kl is None:
        grad_kl = mu.new_zeros(mu.shape[0], dtype=torch.float32)
    dmu, dvar = _cosine_kl_sample_bwd_op(grad_kl, grad_z, mu, var, mu_t, var_t, seed, ctx.beta, ctx.abs_noise)
    return dmu, dvar, None, None, None, None, None


_cosine_kl_sample_op.register_autograd(_kl_backward, setup_context=_kl_setup)


# ---------------------------------------------------------------- LL op
@torch.library.custom_op("vssl_fast::cosine_ll", mutates_args=())
def _cosine_ll_op(m: torch.Tensor, r: torch.Tensor, mu_t: torch.Tensor, var_t: torch.Tensor, beta: float) -> torch.Tensor:
    m, r, mu_t, var_t = (_rows(t) for t in (m, r, mu_t, var_t))
    R, D = m.shape
    ll = torch.empty(R, device=m.device, dtype=torch.float32)
    if R > 0:
        grid, meta = _launch_cfg(R, D, m.device)
        _cosine_ll_fwd_kernel[grid](m, r, mu_t, var_t, ll, m.stride(0), r.stride(0), mu_t.stride(0), var_t.stride(0),
                                    R, D, float(beta), **meta)
    return ll


@_cosine_ll_op.register_fake
def _(m, r, mu_t, var_t, beta):
    return m.new_empty(m.shape[0], dtype=torch.float32)


@torch.library.custom_op("vssl_fast::cosine_ll_bwd", mutates_args=())
def _cosine_ll_bwd_op(grad_ll: torch.Tensor, m: torch.Tensor, r: torch.Tensor, mu_t: torch.Tensor, var_t: torch.Tensor,
                      beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    m, r, mu_t, var_t = (_rows(t) for t in (m, r, mu_t, var_t))
    R, D = m.shape
    dm, dr = torch.empty((R, D), device=m.device, dtype=m.dtype), torch.empty((R, D), device=m.device, dtype=r.dtype)
    if R > 0:
        grid, meta = _launch_cfg(R, D, m.device)
        _cosine_ll_bwd_kernel[grid](grad_ll.contiguous(), m, r, mu_t, var_t, dm, dr, m.stride(0), r.stride(0),
                                    mu_t.stride(0), var_t.stride(0), R, D, float(beta), **meta)
    return dm, dr


@_cosine_ll_bwd_op.register_fake
def _(grad_ll, m, r, mu_t, var_t, beta):
    return torch.empty_like(m, memory_format=torch.contiguous_format), torch.empty_like(r, memory_format=torch.contiguous_format)


def _ll_setup(ctx, inputs, output):
    m, r, mu_t, var_t, beta = inputs
    ctx.save_for_backward(m, r, mu_t, var_t)
    ctx.beta = beta


def _ll_backward(ctx, grad_ll):
    m, r, mu_t, var_t = ctx.saved_tensors
    dm, dr = _cosine_ll_bwd_op(grad_ll, m, r, mu_t, var_t, ctx.beta)
    return dm, dr, None, None, None


_cosine_ll_op.register_autograd(_ll_backward, setup_context=_ll_setup)


# ============================================================================ public API
def cosine_kl_sample(mu, var, mu_t, var_t, *, beta: float = 3.0, seed, abs_noise: bool = True):
    """Per-row cosine KL of eq. (9) between student (mu, var) and teacher (mu_t, var_t), and the sample.

    Returns ``(kl, z)``: ``kl`` [R] float32 and ``z = mu + var * |eps|`` (``abs_noise``) or
    ``mu + var * eps``, eps ~ N(0, 1): normal ``col % 4`` of Philox(seed) at ``row * ceil(d/4) + col // 4``
    (``sample_noise(seed, (R, d))`` returns it). Differentiable in ``mu`` and ``var``.
    ``seed``: an int, or a one-element int64 tensor on the device (no recompiles when it changes).
    """
    _check("cosine_kl_sample", {"mu": mu, "var": var}, {"mu_t": mu_t, "var_t": var_t})
    beta = losses._check_beta("cosine_kl_sample", beta)
    return _cosine_kl_sample_op(mu, var, mu_t, var_t, _seed_tensor(seed, mu.device), beta, bool(abs_noise))


def cosine_ll(m, r, mu_t, var_t, *, beta: float = 1.0):
    """Per-row cosine expected log-likelihood cost of eq. (10), float32 [R]; differentiable in m and r."""
    _check("cosine_ll", {"m": m, "r": r}, {"mu_t": mu_t, "var_t": var_t})
    beta = losses._check_beta("cosine_ll", beta)
    return _cosine_ll_op(m, r, mu_t, var_t, beta)


def sample_noise(seed, shape, device) -> torch.Tensor:
    """Exactly the standard-normal eps (before |.|) that ``cosine_kl_sample`` draws for ``shape`` = (R, d)."""
    device = torch.device(device)
    require_triton("sample_noise", device)
    R, D = shape
    out = torch.empty((R, D), device=device, dtype=torch.float32)
    if R * D:
        grid, meta = _launch_cfg(R, D, device)
        _sample_noise_kernel[grid](out, _seed_tensor(seed, device), R, D, **meta)
    return out


# ============================================================================ references
def cosine_kl_sample_reference(mu, var, mu_t, var_t, eps, *, beta: float = 3.0, abs_noise: bool = True):
    """Plain PyTorch (kl, z) given the noise ``eps``: ``losses.cosine_kl`` and ``losses.reparameterize``."""
    kl = losses.cosine_kl(mu, mu_t, var, var_t, beta=beta)
    z = losses.reparameterize(mu, var, eps.to(torch.promote_types(mu.dtype, eps.dtype)), abs_noise=abs_noise)
    return kl, z


def cosine_ll_reference(m, r, mu_t, var_t, *, beta: float = 1.0):
    """Plain PyTorch per-row eq. (10): ``losses.cosine_ll``."""
    return losses.cosine_ll(m, mu_t, r, var_t, beta=beta)
