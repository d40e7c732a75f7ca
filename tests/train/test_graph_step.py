"""The graph-ready step ('static': static input buffers, persistent gradients, LR and tau read from
device memory) gives the same losses and parameters as the eager step, bit for bit, skips
included, and resumes exactly; the CUDA-graph capture of that same step runs on a GPU only."""

import copy

import pytest
import torch
from helpers import tiny_model
from vssl_fast.kernels import FusedLARS, LARSReference

from vssl_fast.config import OptimConfig
from vssl_fast.method import MethodConfig
from vssl_fast.step import TrainStep

B, D = 6, 4


def _batches(n, device, nan_at=None):
    g = torch.Generator().manual_seed(3)
    out = []
    for k in range(n):
        x1 = torch.rand(B, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
        x2 = torch.rand(B, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
        if k == nan_at:
            x1 = x1 * float("nan")
        out.append((x1.to(device), x2.to(device), torch.randint(0, 3, (B,), generator=g).to(device)))
    return out


def _stepper(base, graph, device, impl="fused"):
    model = copy.deepcopy(base)
    cfg = MethodConfig(proj_output_dim=D, impl=impl)
    opt = FusedLARS(model.parameter_groups(0.3, 1e-5, 0.1), lr=0.3, weight_decay=1e-5)
    return TrainStep(model, model, opt, cfg, OptimConfig(), device, graph=graph)


def _run(step, batches, total=20):
    losses = []
    for b in batches:
        step.schedule(warmup_steps=4, total_steps=total)  # the LR moves every step (warm-up)
        parts = step(*b)
        losses.append({k: v.detach().clone() for k, v in parts.items()})
    return losses


def _state(step):
    return [t.detach().clone() for t in step.model.state_dict().values()] + [
        st["momentum_buffer"].clone() for st in step.opt.state.values()] + [step.skipped.clone(), step.noise_seed.clone()]


def _assert_same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y) or (x.is_floating_point() and torch.equal(x.isnan(), y.isnan())
                                     and torch.equal(x.nan_to_num(), y.nan_to_num())), f"entry {i} differs"


def test_static_step_equals_the_eager_step_bit_for_bit(kernel_device):
    torch.manual_seed(0)
    base = tiny_model(MethodConfig(proj_output_dim=D)).to(kernel_device).to(memory_format=torch.channels_last)
    batches = _batches(6, kernel_device, nan_at=3)  # step 3 is non-finite: skipped by both
    eager, static = _stepper(base, "off", kernel_device), _stepper(base, "static", kernel_device)
    le, ls = _run(eager, batches), _run(static, batches)
    for a, b in zip(le, ls):
        _assert_same(list(a.values()), list(b.values()))
    assert int(eager.skipped) == int(static.skipped) == 1
    _assert_same(_state(eager), _state(static))
    grads = [p.grad for p in static.opt.param_groups[0]["params"]]
    static(*batches[0])
    assert all(g is p.grad for g, p in zip(grads, static.opt.param_groups[0]["params"])), "gradients moved"


def test_static_step_resumes_exactly(kernel_device):
    torch.manual_seed(0)
    base = tiny_model(MethodConfig(proj_output_dim=D)).to(kernel_device)
    batches = _batches(6, kernel_device)
    straight = _stepper(base, "static", kernel_device)
    want = _run(straight, batches)
    first = _stepper(base, "static", kernel_device)
    _run(first, batches[:3])
    saved = (copy.deepcopy(first.model.state_dict()), copy.deepcopy(first.opt.state_dict()), first.state_dict())
    second = _stepper(base, "static", kernel_device)
    second.model.load_state_dict(saved[0])
    second.opt.load_state_dict(saved[1])
    second.load_state_dict(saved[2])
    got = _run(second, batches[3:])
    for a, b in zip(want[3:], got):
        _assert_same(list(a.values()), list(b.values()))
    _assert_same(_state(straight), _state(second))


def test_graph_modes_refuse_what_cannot_be_captured():
    base = tiny_model(MethodConfig(proj_output_dim=D))
    model = copy.deepcopy(base)
    ref = LARSReference(model.parameter_groups(0.3, 0, 0.1), lr=0.3)
    with pytest.raises(ValueError, match="needs a fused optimizer"):
        TrainStep(model, model, ref, MethodConfig(proj_output_dim=D), OptimConfig(), torch.device("cpu"), graph="static")
    with pytest.raises(ValueError, match="on a CPU use graph='static'"):
        _stepper(base, "on", torch.device("cpu"))
    step = _stepper(base, "static", torch.device("cpu"), impl="reference")
    x1, x2, y = _batches(1, torch.device("cpu"))[0]
    step(x1, x2, y)
    with pytest.raises(ValueError, match=r"batch x1 is \(3, 3, 8, 8\).*graph modes need fixed batches"):
        step(x1[:3], x2[:3], y[:3])


@pytest.mark.gpu
def test_cuda_graph_step_matches_the_eager_step():
    """Captured vs eager on the GPU: within bf16-free fp32 round-off (the graph replays the same kernels)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    base = tiny_model(MethodConfig(proj_output_dim=D)).to(dev).to(memory_format=torch.channels_last)
    batches = _batches(8, dev, nan_at=5)
    eager, graph = _stepper(base, "off", dev), _stepper(base, "on", dev)
    le, lg = _run(eager, batches), _run(graph, batches)
    assert graph._graph is not None, "the step was never captured"
    for a, b in zip(le, lg):
        for x, y in zip(a.values(), b.values()):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert int(eager.skipped) == int(graph.skipped) == 1
    for x, y in zip(_state(eager), _state(graph)):
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-5, equal_nan=True)
