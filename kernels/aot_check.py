"""Compile every Triton kernel ahead of time for sm_90 (H100/H200) without a GPU.

    python -m vssl_fast.kernels.aot_check

The interpreter (TRITON_INTERPRET=1, what the CPU tests use) accepts programs the real compiler
rejects (type promotions, loop-carried types, pointer casts). This lowers each kernel through
Triton's compiler to PTX and runs ptxas for the Hopper target, so such errors show up on a
machine without a GPU. It checks compilation only; correctness is the tests' job.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from vssl_fast.kernels import _multi_tensor as mt  # noqa: E402
from vssl_fast.kernels import cosine_loss as cl  # noqa: E402
from vssl_fast.kernels import ema, lamb, lars, restore  # noqa: E402

F32, BF16 = tl.float32, tl.bfloat16
P = "*fp32"


def cases():
    rows = dict(BLOCK_R=16, BLOCK_D=256, NUM_CHUNKS=1)
    big = dict(BLOCK_R=1, BLOCK_D=2048, NUM_CHUNKS=2)
    for dt, meta in (("fp32", rows), ("bf16", rows), ("fp32", big)):
        t = f"*{dt}"
        yield "kl_fwd", cl._cosine_kl_fwd_kernel, {
            "mu_ptr": t, "var_ptr": t, "mut_ptr": t, "vart_ptr": t, "z_ptr": t, "kl_ptr": P, "seed_ptr": "*i64",
            "s_mu": "i64", "s_var": "i64", "s_mut": "i64", "s_vart": "i64", "R": "i32", "D": "i32", "beta": "fp32"}, \
            dict(ABS_NOISE=True, **meta)
        for mu_mode, var_mode in ((1, 2), (0, 0)):
            yield "kl_bwd", cl._cosine_kl_bwd_kernel, {
                "gkl_ptr": P, "gz_ptr": t, "mu_ptr": t, "var_ptr": t, "mut_ptr": t, "vart_ptr": t, "seed_ptr": "*i64",
                "dmu_ptr": t, "dvar_ptr": t, "s_mu": "i64", "s_var": "i64", "s_mut": "i64", "s_vart": "i64", "R": "i32",
                "D": "i32", "beta": "fp32"}, dict(MU_MODE=mu_mode, VAR_MODE=var_mode, ABS_NOISE=True, **meta)
        yield "ll_fwd", cl._cosine_ll_fwd_kernel, {
            "m_ptr": t, "r_ptr": t, "mut_ptr": t, "vart_ptr": t, "ll_ptr": P, "s_m": "i64", "s_r": "i64",
            "s_mut": "i64", "s_vart": "i64", "R": "i32", "D": "i32", "beta": "fp32"}, meta
        yield "ll_bwd", cl._cosine_ll_bwd_kernel, {
            "gll_ptr": P, "m_ptr": t, "r_ptr": t, "mut_ptr": t, "vart_ptr": t, "dm_ptr": t, "dr_ptr": t, "s_m": "i64",
            "s_r": "i64", "s_mut": "i64", "s_vart": "i64", "R": "i32", "D": "i32", "beta": "fp32"}, meta
    yield "noise", cl._sample_noise_kernel, {"out_ptr": P, "seed_ptr": "*i64", "N": "i64"}, dict(BLOCK=1024)
    tab = {"blk_tensor": "*i32", "blk_start": "*i64", "sizes": "*i64"}
    for is_ptr in (True, False):
        yield "ema", ema._ema_fwd_kernel, {"t_ptrs": "*i64", "s_ptrs": "*i64", **tab, "tau_ptr": P, "tau_val": "fp32"}, \
            dict(TAU_IS_PTR=is_ptr, DTYPE=F32, BLOCK=4096)
    yield "sumsq", mt._sumsq_partials_kernel, {"a_ptrs": "*i64", "b_ptrs": "*i64", **tab, "part_a": P, "part_b": P}, \
        dict(DTYPE_A=F32, DTYPE_B=BF16, BLOCK=4096)
    yield "reduce", mt._reduce_partials_kernel, {"part": P, "first_blk": "*i32", "out": P}, dict(MAX_BLOCKS=2048, CHUNK=1024)
    for bc, aw in ((True, True), (False, False)):
        yield "lamb1", lamb._lamb_stage1_kernel, {
            "g_ptrs": "*i64", "p_ptrs": "*i64", "m_ptrs": "*i64", "v_ptrs": "*i64", "ws": P, "ws_off": "*i64", **tab,
            "part_u": P, "clip_ptr": P, "step_ptr": "*i64", "skip_ptr": "*i32", "beta1": "fp32", "beta2": "fp32",
            "beta3": "fp32", "eps": "fp32", "wd": "fp32"}, dict(BIAS_CORRECTION=bc, ADAM_W=aw, DTYPE=F32, BLOCK=4096)
    for nv, lr_is_ptr in ((True, True), (False, False)):
        yield "lamb2", lamb._lamb_stage2_kernel, {
            "p_ptrs": "*i64", "ws": P, "ws_off": "*i64", **tab, "p_sumsq": P, "u_sumsq": P, "step_ptr": "*i64",
            "skip_ptr": "*i32", "lr_ptr": P, "lr_val": "fp32", "wd": "fp32"}, \
            dict(LR_IS_PTR=lr_is_ptr, USE_NVLAMB=nv, DTYPE=BF16, BLOCK=4096)
    for lr_is_ptr in (True, False):
        yield "lars", lars._lars_kernel, {
            "g_ptrs": "*i64", "p_ptrs": "*i64", "buf_ptrs": "*i64", **tab, "p_sumsq": P, "g_sumsq": P, "exclude": "*i32",
            "skip_ptr": "*i32", "lr_ptr": P, "lr_val": "fp32", "wd": "fp32", "eta": "fp32", "eps": "fp32",
            "momentum": "fp32"}, dict(LR_IS_PTR=lr_is_ptr, CLIP_LR=True, DTYPE=F32, BLOCK=4096)
    for dt in (F32, tl.int64):
        yield "restore", restore._restore_fwd_kernel, {"d_ptrs": "*i64", "s_ptrs": "*i64", **tab, "flag_ptr": "*i32"}, \
            dict(DTYPE=dt, BLOCK=4096)


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for name, kernel, sig, consts in cases():
        fn = kernel.fn if hasattr(kernel, "fn") and not isinstance(kernel, triton.JITFunction) else kernel
        names = fn.arg_names
        signature = {n: sig.get(n, "constexpr") for n in names}
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs={k: v for k, v in consts.items()}), target=target)
            ptx_lines = len(compiled.asm["ptx"].splitlines())
            print(f"ok   {name:8s} {ptx_lines:6d} PTX lines  {consts}")
        except Exception as e:  # noqa: BLE001 - report every kernel, fail at the end
            failed += 1
            print(f"FAIL {name:8s} {consts}: {type(e).__name__}: {str(e)[:2000]}")
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
