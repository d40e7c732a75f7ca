"""The multi-tensor calls over the ImageNet-100 model's parameters (86 tensors, 28.1M elements).

Host-side, anywhere: each call's host work with its Triton launches counted, not run (the Python and
ATen work around the kernels: plans, checks, tables; ``bench.bench_dispatch``'s counter), with
the launches and ATen ops per call in extra_info. GPU cases: the EMA, LARS and LAMB providers of
``bench_ema`` / ``bench_lars`` / ``bench_lamb`` timed with CUDA events, with bytes, GB/s, % of
peak, the time over the byte roofline and the ratio to the same run's baseline in extra_info.
"""

from __future__ import annotations

import functools

import pytest

from bench.bench_dispatch import OpCounter
from bench.common import bench_device, first_call_s, peak_bandwidth_gbps
from bench.conftest import GPU_ONLY, SMOKE
from bench.timing import KERNEL


@functools.lru_cache(maxsize=1)
def _host_calls():
    from bench.bench_dispatch import optimizer_calls

    return optimizer_calls(bench_device())


@pytest.mark.parametrize("call", ["FusedLAMB.step", "FusedLARS.step", "ema_update_", "restore_where_"])
def test_host_work_per_call(benchmark, measure, call):
    from vssl_fast.kernels._common import triton_available

    if not triton_available(bench_device()):
        pytest.skip("the Triton path cannot run here (no CUDA and TRITON_INTERPRET unset)")
    fn, tensors = _host_calls()[call]
    counted = OpCounter()
    with OpCounter().counting(dispatch=False):
        fn()  # the first call builds the plan
    with counted.counting():
        fn()
    with OpCounter().counting(dispatch=False):  # launches counted, not run: the host's work alone
        t = measure(fn, group="host work per call (launches not run)", reps=KERNEL, kind="wall")
    if t is not None:
        benchmark.extra_info.update(triton_launches=counted.triton, aten_ops=sum(counted.ops.values()), tensors=tensors,
                                    cuda_launches=getattr(counted, "cuda_launches", None), host_us=1e3 * t.ms)


def _ema_cases():
    from bench.bench_ema import providers

    return providers(SMOKE, bench_device())


@GPU_ONLY
@pytest.mark.parametrize("provider", ["flat_lerp", "loop", "foreach_lerp", "ours"])
def test_ema(benchmark, measure, same_run, provider):
    from bench.bench_ema import figures

    provs, restore, tensors, n = _cached("ema", _ema_cases)
    fn = provs[provider]
    restore()
    first = first_call_s(fn)
    t = measure(fn, group="ema teacher update", setup=restore, first_call_s=first, tensors=tensors, numel=n)
    if t is None:
        return
    same_run[("ema", provider)] = t
    flat = same_run.get(("ema", "flat_lerp"))
    benchmark.extra_info.update(figures(n, t.ms, peak_bandwidth_gbps(), {"ms": flat.ms} if flat else None))


@GPU_ONLY
@pytest.mark.parametrize("op,provider", [(op, p) for op in ("lars", "lamb") for p in ("reference", "foreach", "ours", "apex")
                                         if not (op == "lars" and p == "apex")])
def test_optimizer_step(benchmark, measure, same_run, op, provider):
    from bench.bench_lamb import providers as lamb_providers
    from bench.bench_lars import providers as lars_providers
    from bench.bench_optim_common import figures, fresh, param_state

    groups, restore, params, n = _cached(op, lambda: param_state(SMOKE, bench_device()))
    restore()
    step = (lamb_providers() if op == "lamb" else lars_providers())[provider](fresh(groups))
    if step is None:
        pytest.skip(f"{provider} is not importable here")
    first = first_call_s(step)
    t = measure(step, group=f"{op} step", setup=restore, first_call_s=first, tensors=len(params), numel=n)
    if t is None:
        return
    same_run[(op, provider)] = t
    ref = same_run.get((op, "reference"))
    benchmark.extra_info.update(figures(48 if op == "lamb" else 28, n, t.ms, peak_bandwidth_gbps(),
                                        ref_ms=ref.ms if ref else None))


_CACHE: dict = {}


def _cached(key, make):
    """One parameter set per family for the whole session (building the model takes seconds)."""
    if key not in _CACHE:
        _CACHE.clear()  # one at a time: the ImageNet-100 parameter set is 28M elements
        _CACHE[key] = make()
    return _CACHE[key]
