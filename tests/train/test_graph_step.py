"""The graph-ready step ('static': static input buffers, persistent gradients, LR and tau read from
device memory) gives the same losses and parameters as the eager step, bit for bit, skips
included, and resumes exactly; the CUDA-graph capture of that same step runs on a GPU only."""

import contextlib
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
    assert graph._captured is not None, "the step was never captured"
    for a, b in zip(le, lg):
        for x, y in zip(a.values(), b.values()):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert int(eager.skipped) == int(graph.skipped) == 1
    for x, y in zip(_state(eager), _state(graph)):
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-5, equal_nan=True)


# ---------------------------------------------------------------- the capture, as far as a CPU goes
class CpuGraphs:
    """A CPU twin of ``vssl_fast.step.CudaGraphs``: warm-up runs the step; capture runs it once with
    the capture query answering yes (so the fused kernels keep their plans as under a real capture)
    and keeps the function; the first replay is that captured step (a capture records without
    running, then the replay runs it), later replays run it again and write its outputs into the
    captured ones, as a replay writes a graph's output memory."""

    def __init__(self, on_capture=None, exit_error=None):
        self.warmups = self.captures = self.replays = 0
        self.graph = None
        self.on_capture = on_capture
        self.exit_error = exit_error  # what torch.cuda.graph's exit raises over an error inside the capture

    def warmup(self, fn):
        self.warmups += 1
        return fn()

    def capture(self, fn):
        from vssl_fast.kernels import _multi_tensor

        self.captures += 1
        if self.on_capture:
            self.on_capture()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_multi_tensor, "capturing", lambda device: True)
            try:
                self._out = fn()
            except Exception:
                if self.exit_error is not None:
                    raise self.exit_error  # noqa: B904 (raised during the other, as capture_end's error would be)
                raise
        self.graph, self._fresh = fn, True
        return self._out

    def replay(self):
        self.replays += 1
        if self._fresh:  # the captured step itself
            self._fresh = False
            return
        new = self.graph()
        for k, v in self._out.items():
            v.copy_(new[k])


def _graph_stepper(base, device, graphs, forward=None):
    step = _stepper(base, "static", device)
    step.graph_mode, step._graphs = "on", graphs  # as TrainStep(graph='on') on CUDA, with the CPU twin
    if forward is not None:
        step.forward = forward
    return step


def test_captured_step_twin_equals_the_eager_step(kernel_device):
    """Warm-up, capture and replays (the CPU twin) give the eager step's losses and state bit for bit,
    a skip included; the plans the fused kernels used inside the capture are held by the step."""
    torch.manual_seed(0)
    base = tiny_model(MethodConfig(proj_output_dim=D)).to(kernel_device).to(memory_format=torch.channels_last)
    batches = _batches(7, kernel_device, nan_at=5)
    graphs = CpuGraphs()
    eager, graph = _stepper(base, "off", kernel_device), _graph_stepper(base, kernel_device, graphs)
    le, lg = _run(eager, batches), _run(graph, batches)
    assert (graphs.warmups, graphs.captures, graphs.replays) == (TrainStep.GRAPH_WARMUP, 1, 7 - TrainStep.GRAPH_WARMUP)
    for a, b in zip(le, lg):
        _assert_same(list(a.values()), list(b.values()))
    _assert_same(_state(eager), _state(graph))
    assert int(graph.skipped) == 1
    kept = graph._captured[1]
    assert len(kept) >= 3, "the LARS, EMA and restore plans used in the capture are kept by the step"


def test_a_released_captured_step_frees_its_model_and_plans():
    """Nothing captured outlives its step: plans a capture used were kept for the whole process."""
    import gc
    import weakref

    from vssl_fast.kernels import _multi_tensor

    torch.manual_seed(0)
    base = tiny_model(MethodConfig(proj_output_dim=D))
    step = _graph_stepper(base, torch.device("cpu"), CpuGraphs())
    step.forward = step.model  # the reference losses: plans come from the optimizer, EMA and restore
    step.method_cfg = MethodConfig(proj_output_dim=D, impl="reference")
    import os
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the fused kernels (whose plans a capture keeps) run on the CPU only under TRITON_INTERPRET=1")
    n_global = len(_multi_tensor._CAPTURED)  # before the capture: a capture must not add to the process's set
    _run(step, _batches(TrainStep.GRAPH_WARMUP + 2, torch.device("cpu")))
    assert step._captured is not None and step._captured[1]
    assert len(_multi_tensor._CAPTURED) == n_global, "the capture's plans went to the process-wide set"
    refs = [weakref.ref(step.model), weakref.ref(step.model.classifier.weight), weakref.ref(step.opt)]
    del step
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True], "a released captured step kept its model alive"
    assert len(_multi_tensor._CAPTURED) == n_global


def test_loading_optimizer_state_into_a_captured_step_captures_again(kernel_device):
    torch.manual_seed(0)
    base = tiny_model(MethodConfig(proj_output_dim=D)).to(kernel_device)
    graphs = CpuGraphs()
    step = _graph_stepper(base, kernel_device, graphs)
    batches = _batches(TrainStep.GRAPH_WARMUP + 2, kernel_device)
    _run(step, batches)
    assert graphs.captures == 1
    step.opt.load_state_dict(copy.deepcopy(step.opt.state_dict()))  # new state tensors: the graph's are stale
    assert step._captured is None, "the graph still points at the optimizer's old state"
    _run(step, batches)
    assert graphs.captures == 2 and graphs.warmups == 2 * TrainStep.GRAPH_WARMUP


@pytest.mark.parametrize("exit_error", [None, "capture invalidated"])
def test_a_recompile_inside_the_capture_is_one_line_naming_the_guard(exit_error):
    """Also when the capture's exit raises over Dynamo's error (a CUDA error of the invalidated capture)."""
    from vssl_fast.step import CaptureError

    torch.manual_seed(0)
    base = tiny_model(MethodConfig(proj_output_dim=D))
    scale = {"v": 1.0}

    @torch.compile(backend="eager")
    def prep(x):
        return x * scale["v"]

    holder = {}

    def forward(x1, x2, y, cfg, seed):
        return holder["model"](prep(x1), x2, y, cfg, seed)

    err = RuntimeError("CUDA error: operation failed due to a previous error during capture") if exit_error else None
    step = _graph_stepper(base, torch.device("cpu"), CpuGraphs(on_capture=lambda: scale.update(v=2.0), exit_error=err),
                          forward)
    holder["model"] = step.model
    step.method_cfg = MethodConfig(proj_output_dim=D, impl="reference")
    with pytest.raises(CaptureError) as e:
        _run(step, _batches(TrainStep.GRAPH_WARMUP + 1, torch.device("cpu")))
    msg = str(e.value)
    assert "\n" not in msg and "recompile inside the CUDA-graph capture" in msg and "== 1.0" in msg, msg
    assert "scale" in msg and "train.compile=none" in msg and e.value.exit_code == 2


def test_cuda_graphs_warm_up_and_capture_on_one_stream_in_thread_local_mode(monkeypatch):
    """The CUDA calls themselves, with torch.cuda's graph API replaced by recorders (no GPU here)."""
    from vssl_fast.step import CudaGraphs

    calls = []

    class Stream:
        def wait_stream(self, other):
            calls.append(("wait", self, other))

    current = Stream()

    @contextlib.contextmanager
    def stream_ctx(s):
        calls.append(("on", s))
        yield

    @contextlib.contextmanager
    def graph_ctx(g, stream=None, capture_error_mode="global", **kw):
        calls.append(("capture", stream, capture_error_mode))
        yield

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", stream_ctx)
    monkeypatch.setattr(torch.cuda, "graph", graph_ctx)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    g = CudaGraphs(torch.device("cuda", 0))
    for _ in range(3):
        g.warmup(lambda: None)
    g.capture(lambda: None)
    side = g.stream
    ons = [c[1] for c in calls if c[0] == "on"]
    assert ons == [side] * 4, "warm-up and capture must run on one side stream"
    assert [c for c in calls if c[0] == "capture"] == [("capture", side, "thread_local")]
    assert ("wait", side, current) in calls and ("wait", current, side) in calls


def test_reduce_overhead_with_graph_on_is_a_config_error():
    from vssl_fast.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train.graph=on with train.compile=reduce-overhead"):
        load_config(["--preset", "smoke", "--train.graph=on", "--train.compile=reduce-overhead"])
    load_config(["--preset", "smoke", "--train.graph=on", "--train.compile=default"])  # allowed


def test_pointer_tables_are_never_built_inside_a_capture(monkeypatch):
    """A plan built during a capture would make the graph replay a copy from a freed pinned buffer."""
    from vssl_fast.kernels import _multi_tensor

    monkeypatch.setattr(_multi_tensor, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="pointer tables inside a CUDA-graph capture"):
        _multi_tensor.device_int_tensor([1, 2], torch.device("cpu"))


def test_the_side_stream_waits_back_even_when_the_work_fails(monkeypatch):
    from vssl_fast.step import CudaGraphs

    waits = []

    class Stream:
        def wait_stream(self, other):
            waits.append((self, other))

    cur = Stream()
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: cur)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    g = CudaGraphs(torch.device("cuda", 0))
    with pytest.raises(ZeroDivisionError):
        g.warmup(lambda: 1 / 0)
    assert waits == [(g.stream, cur), (cur, g.stream)]
