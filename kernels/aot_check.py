"""Compile every Triton kernel ahead of time for sm_90 (H100/H200) without a GPU.

    python -m vssl_fast.kernels.aot_check

The interpreter (TRITON_INTERPRET=1, what the CPU tests use) accepts programs the real compiler
rejects (type promotions, loop-carried types, pointer casts). This lowers each kernel through
Triton's compiler to PTX and runs ptxas for the Hopper target, so such errors show up on a
machine without a GPU, with the specialization Triton's launcher gives a real call (aligned
pointers). It also counts each multi-tensor kernel's 128-bit global accesses and fails unless the
full-block path has exactly the number its bytes per element predict (``wide``): the check that
the compiler vectorizes the sweeps, which no CPU timing can show. And it runs ``ptxas -v`` on each
kernel at the default launch settings (``launch.DEFAULTS``) and fails on a register spill or a
theoretical occupancy under 50% on sm_90 (a streaming kernel needs loads in flight). Correctness
is the tests' job.
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
from vssl_fast.kernels import ema, lamb, lars, launch, restore  # noqa: E402

F32, BF16 = tl.float32, tl.bfloat16
P = "*fp32"


SIZE = {F32: 4, BF16: 2, tl.int64: 8}


def wide(block: int, warps: int, itemsizes: list[int]) -> int:
    """128-bit accesses one thread issues in a multi-tensor kernel's full-block path: each tensor
    read or written moves ``block / (32 warps)`` elements per thread, 16 bytes per instruction.
    (The tail path stays scalar; it is one block per tensor.)"""
    per_thread = block // (32 * warps)
    return sum(per_thread * b // 16 for b in itemsizes)


def mt_meta(family: str) -> dict:
    """A multi-tensor family's default launch settings (a card without a measured entry)."""
    st = launch.DEFAULTS[family]
    return dict(BLOCK=st["BLOCK"], num_warps=st["num_warps"])


def mt_w(family: str) -> tuple[int, int]:
    st = launch.DEFAULTS[family]
    return st["BLOCK"], st["num_warps"]


def cases():
    """(name, kernel, signature, constexprs + num_warps, predicted 128-bit accesses or None), at the
    default launch settings and the product's shapes: rows of d = 256 (CIFAR heads), 2048, 4096."""
    cos = launch.DEFAULTS["cosine"]
    rows, big, chunked = (cl.tile_meta(512, d, cos)[1] for d in (256, 2048, 4096))
    for dt, meta in (("fp32", rows), ("bf16", rows), ("fp32", big), ("fp32", chunked)):
        t = f"*{dt}"
        yield "kl_fwd", cl._cosine_kl_fwd_kernel, {
            "mu_ptr": t, "var_ptr": t, "mut_ptr": t, "vart_ptr": t, "z_ptr": t, "kl_ptr": P, "seed_ptr": "*i64",
            "s_mu": "i64", "s_var": "i64", "s_mut": "i64", "s_vart": "i64", "R": "i32", "D": "i32", "beta": "fp32"}, \
            dict(ABS_NOISE=True, **meta), None
        for mu_mode, var_mode in ((1, 2), (0, 0)):
            yield "kl_bwd", cl._cosine_kl_bwd_kernel, {
                "gkl_ptr": P, "gz_ptr": t, "mu_ptr": t, "var_ptr": t, "mut_ptr": t, "vart_ptr": t, "seed_ptr": "*i64",
                "dmu_ptr": t, "dvar_ptr": t, "s_mu": "i64", "s_var": "i64", "s_mut": "i64", "s_vart": "i64", "R": "i32",
                "D": "i32", "beta": "fp32"}, dict(MU_MODE=mu_mode, VAR_MODE=var_mode, ABS_NOISE=True, **meta), None
        yield "ll_fwd", cl._cosine_ll_fwd_kernel, {
            "m_ptr": t, "r_ptr": t, "mut_ptr": t, "vart_ptr": t, "ll_ptr": P, "s_m": "i64", "s_r": "i64",
            "s_mut": "i64", "s_vart": "i64", "R": "i32", "D": "i32", "beta": "fp32"}, meta, None
        yield "ll_bwd", cl._cosine_ll_bwd_kernel, {
            "gll_ptr": P, "m_ptr": t, "r_ptr": t, "mut_ptr": t, "vart_ptr": t, "dm_ptr": t, "dr_ptr": t, "s_m": "i64",
            "s_r": "i64", "s_mut": "i64", "s_vart": "i64", "R": "i32", "D": "i32", "beta": "fp32"}, meta, None
    yield "noise", cl._sample_noise_kernel, {"out_ptr": P, "seed_ptr": "*i64", "R": "i32", "D": "i32"}, rows, None
    tab = {"blk_tensor": "*i32", "blk_start": "*i64", "sizes": "*i64"}
    for is_ptr, al in ((True, True), (False, False)):
        yield "ema", ema._ema_fwd_kernel, {"t_ptrs": "*i64", "s_ptrs": "*i64", **tab, "tau_ptr": P, "tau_val": "fp32"}, \
            dict(TAU_IS_PTR=is_ptr, DTYPE=F32, ALIGNED=al, **mt_meta("ema")), wide(*mt_w("ema"), [4, 4, 4] if al else [])
    yield "ema", ema._ema_fwd_kernel, {"t_ptrs": "*i64", "s_ptrs": "*i64", **tab, "tau_ptr": P, "tau_val": "fp32"}, \
        dict(TAU_IS_PTR=True, DTYPE=BF16, ALIGNED=True, **mt_meta("ema")), wide(*mt_w("ema"), [2, 2, 2])
    yield "sumsq", mt._sumsq_partials_kernel, {"a_ptrs": "*i64", "b_ptrs": "*i64", **tab, "part": P, "NB": "i32"}, \
        dict(DTYPE_A=F32, DTYPE_B=BF16, ALIGNED=True, **mt_meta("lars")), wide(*mt_w("lars"), [4, 2])
    yield "reduce", mt._reduce_partials_kernel, {"part": P, "first_blk": "*i32", "out_a": P, "out_b": P, "NB": "i32"}, \
        dict(MAX_BLOCKS=2048, CHUNK=1024), None
    for bc, aw, wd, dt in ((True, True, True, F32), (False, False, False, F32), (True, True, True, BF16)):
        e = SIZE[dt]
        yield "lamb1", lamb._lamb_stage1_kernel, {
            "g_ptrs": "*i64", "p_ptrs": "*i64", "m_ptrs": "*i64", "v_ptrs": "*i64", "ws": P, "ws_off": "*i64", **tab,
            "part_u": P, "gsq_all": P, "T_ALL": "i32", "max_norm": "fp32", "step_ptr": "*i64", "skip_ptr": "*i32",
            "beta1": "fp32", "beta2": "fp32", "beta3": "fp32", "eps": "fp32", "wd": "fp32"}, \
            dict(BIAS_CORRECTION=bc, ADAM_W=aw, HAS_WD=wd, DTYPE=dt, ALIGNED=True, T_CHUNK=128, T_PAD=128, **mt_meta("lamb")), \
            wide(*mt_w("lamb"), [e] * (5 + wd) + [4])  # g, (p), m, v read; m, v written as DTYPE; u written fp32
    for nv, lr_is_ptr, adv, dt in ((True, True, True, BF16), (False, False, False, F32)):
        e = SIZE[dt]
        yield "lamb2", lamb._lamb_stage2_kernel, {
            "p_ptrs": "*i64", "ws": P, "ws_off": "*i64", **tab, "p_sumsq": P, "u_sumsq": P, "step_ptr": "*i64",
            "skip_ptr": "*i32", "lr_ptr": P, "lr_val": "fp32", "wd": "fp32"}, \
            dict(LR_IS_PTR=lr_is_ptr, USE_NVLAMB=nv, ADVANCE=adv, DTYPE=dt, ALIGNED=True, **mt_meta("lamb")), \
            wide(*mt_w("lamb"), [e, 4, e])  # p, u (fp32) read; p written
    for lr_is_ptr, dt in ((True, F32), (False, BF16)):
        e = SIZE[dt]
        yield "lars", lars._lars_kernel, {
            "g_ptrs": "*i64", "p_ptrs": "*i64", "buf_ptrs": "*i64", **tab, "p_sumsq": P, "g_sumsq": P, "exclude": "*i32",
            "skip_ptr": "*i32", "lr_ptr": P, "lr_val": "fp32", "wd": "fp32", "eta": "fp32", "eps": "fp32",
            "momentum": "fp32"}, dict(LR_IS_PTR=lr_is_ptr, CLIP_LR=True, DTYPE=dt, ALIGNED=True, **mt_meta("lars")), \
            wide(*mt_w("lars"), [e] * 5)  # g, p, buf read; buf, p written
    for dt in (F32, tl.int64):
        e = SIZE[dt]
        yield "restore", restore._restore_fwd_kernel, {"d_ptrs": "*i64", "s_ptrs": "*i64", **tab, "flag_ptr": "*i32"}, \
            dict(DTYPE=dt, ALIGNED=True, **mt_meta("restore")), wide(*mt_w("restore"), [e, e])


def jit_attrs(fn, sig: dict) -> dict:
    """The specialization Triton's launcher gives a real call: every pointer argument 16-byte aligned
    (fresh allocations are), as are the row strides and sizes the product passes (multiples of 16)."""
    ints = {"s_mu", "s_var", "s_mut", "s_vart", "s_m", "s_r", "D"}
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
            if n in sig and (sig[n].startswith("*") or n in ints)}


def compile_case(kernel, sig: dict, consts: dict, target=None):
    """Compile for sm_90 as the launcher would; ``consts`` may carry ``num_warps``."""
    consts = dict(consts)
    options = {"num_warps": consts.pop("num_warps")} if "num_warps" in consts else {}
    signature = {n: sig.get(n, "constexpr") for n in kernel.arg_names}
    return triton.compile(ASTSource(kernel, signature, constexprs=consts, attrs=jit_attrs(kernel, sig)),
                          target=target or GPUTarget("cuda", 90, 32), options=options)


MIN_OCCUPANCY = 0.5  # of sm_90's 64 warps per SM: the streaming kernels need loads in flight


def resources(compiled) -> dict:
    """Registers and spill bytes per thread (``ptxas -v`` for sm_90a on the kernel's PTX) and the
    theoretical occupancy on sm_90: 64K registers (allotted per warp in units of 256), 64 warps,
    32 blocks and 228 KB of shared memory per SM."""
    import re
    import subprocess
    import tempfile

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception:  # noqa: BLE001 - older Triton: the bundled binary
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.devnull], capture_output=True, text=True,
                             timeout=300).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    warps = compiled.metadata.num_warps
    per_warp = -(-regs * 32 // 256) * 256
    blocks = min(65536 // (per_warp * warps), 32, 64 // warps, (228 * 1024) // max(compiled.metadata.shared, 1))
    return {"registers": regs, "spill_bytes": spill, "warps": warps, "occupancy": blocks * warps / 64}


def global_accesses(ptx: str) -> dict:
    """Counts of global load/store instructions by width in a PTX listing ('ld.global.v4.b32': 8, ...)."""
    import collections
    import re

    return dict(collections.Counter(re.findall(r"\b((?:ld|st)\.global(?:\.nc)?(?:\.v\d)?\.b\d+)", ptx)))


def _bits(access: str) -> int:
    """Bits one instruction moves: 'ld.global.v4.b32' -> 128."""
    import re

    m = re.search(r"(?:\.v(\d))?\.b(\d+)$", access)
    return int(m.group(1) or 1) * int(m.group(2))


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for name, kernel, sig, consts, expect in cases():
        try:
            compiled = compile_case(kernel, sig, consts, target)
            ptx = compiled.asm["ptx"]
            acc = global_accesses(ptx)
            n_wide = sum(v for k, v in acc.items() if _bits(k) == 128)
            if expect is not None and n_wide != expect:
                failed += 1
                print(f"FAIL {name:8s} {consts}: {n_wide} 128-bit global accesses, expected {expect} in the "
                      f"full-block path (all accesses: {acc})")
                continue
            res = resources(compiled)
            if res["spill_bytes"] or res["occupancy"] < MIN_OCCUPANCY:
                failed += 1
                print(f"FAIL {name:8s} {consts}: {res['registers']} registers, {res['spill_bytes']} spill bytes, "
                      f"{res['occupancy']:.0%} theoretical occupancy at {res['warps']} warps (needs no spill and "
                      f">= {MIN_OCCUPANCY:.0%}): lower the default launch settings' elements per thread")
                continue
            print(f"ok   {name:8s} {len(ptx.splitlines()):6d} PTX lines, {n_wide:3d} 128-bit accesses"
                  f"{'' if expect is None else ' (as predicted)'}, {res['registers']} registers, "
                  f"{res['occupancy']:.0%} occupancy  {consts}")
        except Exception as e:  # noqa: BLE001 - report every kernel, fail at the end
            failed += 1
            print(f"FAIL {name:8s} {consts}: {type(e).__name__}: {str(e)[:2000]}")
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
