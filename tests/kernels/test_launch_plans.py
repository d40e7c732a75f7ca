"""Launch settings per card, and the cached launch plans of the multi-tensor kernels.

- ``kernels/launch.py``: the interpreter's settings off CUDA, a measured entry per capability over
  the defaults, malformed tables refused with the file and entry named, overrides;
- alignment: a table pointer off a 16-byte boundary turns the kernels' 128-bit promise off (a wrong
  promise would fault on a GPU), and both full-block and tail paths still match the references;
- plans: built once and reused while nothing moves; a moved parameter, teacher tensor or gradient
  is picked up (never a stale pointer), and a gradient with another layout is refused before
  anything is written.
"""

import json

import pytest
import torch
from optim_helpers import assert_params_close, state_tensors
from vssl_fast.kernels import (
    FusedLAMB,
    FusedLARS,
    LAMBReference,
    LARSReference,
    ema_update_,
    ema_update_reference_,
    launch,
    restore_where_,
)
from vssl_fast.kernels import _multi_tensor as mt

OPTS = {
    "lars": (FusedLARS, LARSReference, {"lr": 1.0, "weight_decay": 1e-5}),
    "lamb": (FusedLAMB, LAMBReference, {"lr": 1e-2, "weight_decay": 1e-2}),
}
SMALL = [{f: {"BLOCK": 16} for f in ("ema", "restore", "lars", "lamb")}]  # full blocks and tails on small shapes


# ------------------------------------------------------------------------------------ launch table
def test_interpreter_settings_off_cuda_and_defaults_for_an_unmeasured_card():
    cpu = torch.device("cpu")
    for fam in launch.DEFAULTS:
        assert launch.settings(fam, cpu) == launch.INTERPRETER[fam]
        assert launch.for_capability(fam, "sm_90", table={}) == launch.DEFAULTS[fam]
    assert launch.source(cpu) == "interpreter"


def test_measured_entry_overrides_defaults_per_capability(tmp_path, monkeypatch):
    table = {"sm_90": {"lars": {"BLOCK": 8192}, "cosine": {"num_warps_wide": 16},
                       "_measured": {"device": "NVIDIA H200", "date": "2026-11-27", "triton": "3.6.0"}},
             "sm_80": {"lars": {"BLOCK": 2048, "num_warps": 8}}}
    path = tmp_path / "launch_table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("VSSL_LAUNCH_TABLE", str(path))
    monkeypatch.setattr(launch, "_tables", {})
    assert launch.for_capability("lars", "sm_90") == {"BLOCK": 8192, "num_warps": launch.DEFAULTS["lars"]["num_warps"]}
    assert launch.for_capability("lars", "sm_80") == {"BLOCK": 2048, "num_warps": 8}
    assert launch.for_capability("cosine", "sm_90") == {**launch.DEFAULTS["cosine"], "num_warps_wide": 16}
    assert launch.for_capability("ema", "sm_90") == launch.DEFAULTS["ema"]  # not measured: default
    assert launch.for_capability("lars", "sm_100") == launch.DEFAULTS["lars"]


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"sm_90": {"lasr": {"BLOCK": 4096}}}), "unknown kernel family 'lasr'"),
    (json.dumps({"sm_90": {"lars": {"BLOCKS": 4096}}}), "unknown setting 'BLOCKS'"),
    (json.dumps({"sm_90": {"lars": {"BLOCK": 3000}}}), r"sm_90.lars.BLOCK = 3000; allowed"),
    (json.dumps({"H200": {}}), "entry 'H200' must be 'sm_XY'"),
])
def test_malformed_table_is_an_error_naming_file_and_entry(tmp_path, monkeypatch, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    monkeypatch.setattr(launch, "_tables", {})
    with pytest.raises(ValueError, match=match) as e:
        launch.load_table(path)
    assert str(path) in str(e.value)


def test_override_applies_inside_only_and_rejects_unknown_names():
    cpu = torch.device("cpu")
    with launch.override(lars={"BLOCK": 32}):
        assert launch.settings("lars", cpu)["BLOCK"] == 32
        assert launch.settings("lamb", cpu) == launch.INTERPRETER["lamb"]
    assert launch.settings("lars", cpu) == launch.INTERPRETER["lars"]
    with pytest.raises(ValueError, match="unknown kernel family"):
        with launch.override(adam={"BLOCK": 32}):
            pass
    with pytest.raises(ValueError, match="unknown setting"):
        with launch.override(lars={"warps": 2}):
            pass


# ------------------------------------------------------------------------------------ alignment
def _offset_views(device, shapes, offset, seed):
    """Tensors carved from one flat buffer starting ``offset`` elements in: every pointer is off a
    16-byte boundary when offset is odd (fp32)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(torch.Size(s).numel() for s in shapes)
    flat = torch.randn(n + offset, generator=g).to(device)
    out, at = [], offset
    for s in shapes:
        k = torch.Size(s).numel()
        out.append(flat[at:at + k].view(s))
        at += k
    return out


SHAPES = [(37,), (16,), (3, 5, 7), (64,), (5, 13)]


@pytest.mark.parametrize("offset, expect_aligned", [(0, True), (1, False)])
def test_ema_alignment_promise_follows_the_pointers(kernel_device, monkeypatch, offset, expect_aligned):
    monkeypatch.setattr(launch, "_overrides", SMALL)
    t = _offset_views(kernel_device, SHAPES, offset, 0)
    s = _offset_views(kernel_device, SHAPES, 0, 1)
    if offset == 0:  # separate tensors: each allocation is aligned
        t = [x.clone() for x in t]
    s = [x.clone() for x in s]
    ref = [x.clone() for x in t]
    mt._PAIR_PLANS.clear()
    ema_update_(t, s, 0.9, impl="triton")
    ema_update_reference_(ref, s, 0.9)
    (plan,) = mt._PAIR_PLANS.values()
    assert [entry[-1] for entry in plan] == [expect_aligned]
    assert_params_close(t, ref, 2e-7, 2e-7, "ema")


@pytest.mark.parametrize("name", list(OPTS))
def test_optimizer_on_unaligned_views_matches_reference(name, kernel_device, monkeypatch):
    monkeypatch.setattr(launch, "_overrides", SMALL)
    fused_cls, ref_cls, kw = OPTS[name]
    pf = [p.requires_grad_() for p in _offset_views(kernel_device, SHAPES, 1, 2)]
    pr = [p.detach().clone().requires_grad_() for p in pf]
    of, orf = fused_cls(pf, **kw), ref_cls(pr, **kw)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g).to(kernel_device) for p in pf]
        for p, q, x in zip(pf, pr, grads):
            p.grad, q.grad = x.clone(), x.clone()
        of.step()
        orf.step()
    (plan,) = of._plans.values()
    assert [tab["aligned"] for _, _, tab in plan["lists"]] == [False]
    assert_params_close(pf, pr, 1e-5, 1e-6, name)
    assert_params_close(state_tensors(of), state_tensors(orf), 1e-5, 1e-6, name + " state")


# ------------------------------------------------------------------------------------ plans
def _params(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device).requires_grad_() for s in [(6, 5, 3, 3), (20,), (9, 11)]]


def _set_grads(ps, seed, like=None):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        x = torch.randn(p.shape, generator=g).to(p.device)
        if p.grad is not None and like == "in_place":
            p.grad.copy_(x)
        else:
            p.grad = torch.empty_like(p).copy_(x)


def _stepped_once(name, device):
    """A fused optimizer over three parameters after one step (plan built), and the parameters."""
    fused_cls, _, kw = OPTS[name]
    ps = _params(device)
    opt = fused_cls(ps, **kw)
    _set_grads(ps, 1)
    opt.step()
    return opt, ps


@pytest.mark.parametrize("name", list(OPTS))
def test_plan_reused_while_nothing_moves_and_grad_tables_follow_moved_grads(name, kernel_device):
    opt, ps = _stepped_once(name, kernel_device)
    (plan,) = opt._plans.values()
    g_table = plan["lists"][0][2]["g"]
    for k in range(2):  # persistent gradients (the product's step): nothing rebuilt, nothing sent
        _set_grads(ps, 2 + k, like="in_place")
        opt.step()
        assert list(opt._plans.values()) == [plan] and plan["lists"][0][2]["g"] is g_table
    _set_grads(ps, 9)  # fresh gradients (set_to_none style): a new pointer table, same plan
    opt.step()
    assert list(opt._plans.values()) == [plan] and plan["lists"][0][2]["g"] is not g_table


@pytest.mark.parametrize("name", list(OPTS))
def test_moved_parameters_are_picked_up(name, kernel_device):
    """model.to(channels_last) between steps: new storage, new strides; the plan is rebuilt and the
    state re-laid, in lockstep with the reference (a stale pointer would update freed memory)."""
    fused_cls, ref_cls, kw = OPTS[name]
    pf = _params(kernel_device)
    pr = [p.detach().clone().requires_grad_() for p in pf]
    of, orf = fused_cls(pf, **kw), ref_cls(pr, **kw)
    for step in range(4):
        if step == 2:
            for p in pf + pr:
                if p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
        _set_grads(pf, 10 + step)
        _set_grads(pr, 10 + step)
        of.step()
        orf.step()
    assert pf[0].is_contiguous(memory_format=torch.channels_last)
    assert_params_close(pf, pr, 1e-5, 1e-6, name)


@pytest.mark.parametrize("name", list(OPTS))
def test_gradient_with_another_layout_refused_before_writing(name, kernel_device):
    opt, ps = _stepped_once(name, kernel_device)
    before = [p.detach().clone() for p in ps] + [t.clone() for t in state_tensors(opt)]
    _set_grads(ps, 2)
    ps[0].grad = ps[0].grad.contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match=r"parameter 0 .*its gradient has shape"):
        opt.step()
    after = [p.detach() for p in ps] + state_tensors(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_moved_teacher_and_restore_sources_are_picked_up(kernel_device):
    t = [x.detach() for x in _params(kernel_device, 3)]
    s = [x.detach() for x in _params(kernel_device, 4)]
    ema_update_(t, s, 0.5, impl="triton")
    for x in t:  # new storage for every teacher tensor (e.g. a checkpoint loaded with assign=True)
        x.data = x.data.clone()
    ref = [x.clone() for x in t]
    ema_update_(t, s, 0.5, impl="triton")
    ema_update_reference_(ref, s, 0.5)
    assert_params_close(t, ref, 2e-7, 2e-7, "ema after a move")
    src = [x.clone() + 1 for x in t]
    restore_where_(t, src, torch.ones(1, dtype=torch.int32, device=kernel_device), impl="triton")
    src = [x + 1 for x in src]  # new sources
    restore_where_(t, src, torch.ones(1, dtype=torch.int32, device=kernel_device), impl="triton")
    assert all(torch.equal(a, b) for a, b in zip(t, src))


# ------------------------------------------------------------------------------------ stale plans (review of a82f44a)
@pytest.mark.parametrize("name", list(OPTS))
def test_state_replaced_by_hand_or_cleared_is_used(name, kernel_device):
    """A plan points at the state tensors it was built with: a buffer replaced by hand or a cleared
    state must be picked up (a stale pointer would update a detached or freed tensor)."""
    fused_cls, ref_cls, kw = OPTS[name]
    pf = _params(kernel_device)
    pr = [p.detach().clone().requires_grad_() for p in pf]
    of, orf = fused_cls(pf, **kw), ref_cls(pr, **kw)
    for step in range(4):
        if step == 1:
            for o in (of, orf):
                for p in o.state:
                    for k, v in o.state[p].items():
                        if isinstance(v, torch.Tensor) and v.shape == p.shape:
                            o.state[p][k] = torch.full_like(v, 0.01)  # a new tensor, new values
        if step == 2:
            of.state.clear()
            orf.state.clear()
        _set_grads(pf, 20 + step)
        _set_grads(pr, 20 + step)
        of.step()
        orf.step()
    assert len(of.state) == len(pf)
    assert_params_close(pf, pr, 1e-5, 1e-6, name)
    assert_params_close(state_tensors(of), state_tensors(orf), 1e-5, 1e-6, name + " state")


@pytest.mark.parametrize("name", list(OPTS))
def test_state_of_another_dtype_or_shape_refused_before_writing(name, kernel_device):
    opt, ps = _stepped_once(name, kernel_device)
    key = next(k for k, v in opt.state[ps[1]].items() if isinstance(v, torch.Tensor) and v.shape == ps[1].shape)
    opt.state[ps[1]][key] = opt.state[ps[1]][key].double()
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match=rf"parameter 1 .*its state '{key}' is torch.float64"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ps))


def test_views_at_the_same_address_are_validated_again(kernel_device):
    """Same data pointers, other strides or shapes: checked again, never swept with the old plan."""
    t = torch.randn(4, 4, device=kernel_device)
    s = torch.randn(4, 4, device=kernel_device)
    ema_update_([t], [s], 0.5, impl="triton")
    with pytest.raises(RuntimeError, match="student tensor has shape"):
        ema_update_([t], [s.t()], 0.5, impl="triton")
    with pytest.raises(ValueError, match="teacher shape"):
        ema_update_([t.view(2, 8)], [s.view(4, 4)], 0.5, impl="triton")
    d, src = torch.zeros(8, device=kernel_device), torch.ones(8, device=kernel_device)
    flag = torch.ones(1, dtype=torch.int32, device=kernel_device)
    restore_where_([d[:8]], [src[:8]], flag, impl="triton")
    d.zero_()
    restore_where_([d[:4]], [src[:4]], flag, impl="triton")
    assert d.tolist() == [1.0] * 4 + [0.0] * 4  # the shorter view only


@pytest.mark.parametrize("name", list(OPTS))
def test_gradient_with_other_strides_at_the_same_address_refused(name, kernel_device):
    fused_cls, _, kw = OPTS[name]
    ps = _params(kernel_device)
    ps[0].data = ps[0].data.contiguous(memory_format=torch.channels_last)
    opt = fused_cls(ps, **kw)
    _set_grads(ps, 1)
    opt.step()
    g = ps[0].grad
    ps[0].grad = g.as_strided(g.shape, torch.empty(g.shape).stride())  # same storage, contiguous strides
    assert ps[0].grad.data_ptr() == g.data_ptr()
    with pytest.raises(RuntimeError, match=r"parameter 0 .*its gradient has shape"):
        opt.step()


def test_lamb_advances_counters_of_groups_without_gradients_like_the_reference(kernel_device):
    pf = _params(kernel_device)
    pr = [p.detach().clone().requires_grad_() for p in pf]
    of = FusedLAMB([{"params": pf[:2]}, {"params": pf[2:]}], lr=1e-2)
    orf = LAMBReference([{"params": pr[:2]}, {"params": pr[2:]}], lr=1e-2)
    for step in range(3):
        for ps in (pf, pr):
            _set_grads(ps[:2], 30 + step)
            ps[2].grad = None if step == 1 else torch.ones_like(ps[2])
        of.step()
        orf.step()
    assert [int(g["step"]) for g in of.param_groups] == [g["step"] for g in orf.param_groups] == [3, 3]
    assert_params_close(pf, pr, 1e-5, 1e-6, "lamb")


@pytest.mark.parametrize("name", list(OPTS))
def test_any_nonzero_skip_value_skips(name, kernel_device):
    fused_cls, _, kw = OPTS[name]
    ps = _params(kernel_device)
    opt = fused_cls(ps, **kw)
    _set_grads(ps, 1)
    before = [p.detach().clone() for p in ps]
    opt.step(skip=torch.tensor(0.5, device=kernel_device))
    assert all(torch.equal(a, b) for a, b in zip(before, ps))


@pytest.mark.parametrize("entry, match", [
    ({"lars": {"BLOCK": 4096.0}}, "BLOCK = 4096.0"),
    ({"lars": {"num_warps": True}}, "num_warps = True"),
    ({"lars": 4096}, "must be an object of settings"),
])
def test_table_values_must_be_ints_and_objects(entry, match):
    with pytest.raises(ValueError, match=match):
        launch.validate_table({"sm_90": entry}, "t.json")


def test_nested_overrides_merge_and_bad_values_are_refused():
    cpu = torch.device("cpu")
    with launch.override(lars={"BLOCK": 32}):
        with launch.override(lars={"num_warps": 2}):
            assert launch.settings("lars", cpu) == {"BLOCK": 32, "num_warps": 2}
    with pytest.raises(ValueError, match="power of two"):
        with launch.override(lars={"BLOCK": 3000}):
            pass


# ------------------------------------------------------------------------------------ second review (c79f15c..1873b8c)
@pytest.mark.parametrize("name", list(OPTS))
def test_state_given_new_memory_in_place_is_used(name, kernel_device):
    """The same state object pointed at new memory (``.data = ...``): the plan must follow it."""
    fused_cls, ref_cls, kw = OPTS[name]
    pf = _params(kernel_device)
    pr = [p.detach().clone().requires_grad_() for p in pf]
    of, orf = fused_cls(pf, **kw), ref_cls(pr, **kw)
    keep = []
    for step in range(3):
        if step == 1:
            for o in (of, orf):
                for p in o.state:
                    for v in o.state[p].values():
                        if isinstance(v, torch.Tensor) and v.shape == p.shape:
                            keep.append(v.data)  # the old memory stays alive: a stale pointer would still "work"
                            v.data = torch.full_like(v, 0.01)
        _set_grads(pf, 40 + step)
        _set_grads(pr, 40 + step)
        of.step()
        orf.step()
    assert_params_close(pf, pr, 1e-5, 1e-6, name)
    assert_params_close(state_tensors(of), state_tensors(orf), 1e-5, 1e-6, name + " state")


@pytest.mark.parametrize("name", list(OPTS))
def test_parameter_replaced_by_another_on_the_same_memory(name, kernel_device):
    """A group's parameter swapped for a new Parameter over the same storage: a new plan, and state
    for the new parameter (the old plan would update the old one's state)."""
    fused_cls, ref_cls, kw = OPTS[name]
    pf = _params(kernel_device)
    pr = [p.detach().clone().requires_grad_() for p in pf]
    of, orf = fused_cls([{"params": pf}], **kw), ref_cls([{"params": pr}], **kw)
    for step in range(3):
        if step == 1:
            pf[1] = torch.nn.Parameter(pf[1].data)
            pr[1] = torch.nn.Parameter(pr[1].data)
            of.param_groups[0]["params"][1], orf.param_groups[0]["params"][1] = pf[1], pr[1]
        _set_grads(pf, 50 + step)
        _set_grads(pr, 50 + step)
        of.step()
        orf.step()
    assert pf[1] in of.state
    assert_params_close(pf, pr, 1e-5, 1e-6, name)


def test_override_exit_removes_its_own_entry_only():
    cpu = torch.device("cpu")
    with launch.override(lars={"BLOCK": 32}):
        with launch.override(lars={"BLOCK": 64}):
            with launch.override(lars={"BLOCK": 32}):
                pass
            assert launch.settings("lars", cpu)["BLOCK"] == 64
        assert launch.settings("lars", cpu)["BLOCK"] == 32


def test_restore_flag_any_nonzero_value_restores(kernel_device):
    d, s = [torch.zeros(5, device=kernel_device)], [torch.ones(5, device=kernel_device)]
    restore_where_(d, s, torch.tensor(0.5, device=kernel_device), impl="triton")
    assert torch.equal(d[0], s[0])


def test_plans_used_in_a_cuda_graph_capture_are_kept_alive(monkeypatch):
    """GPU-only branch, its logic on the CPU: a plan used while a capture is in progress is pinned
    (the graph replays its pointer tables), once; outside a capture nothing is pinned."""
    monkeypatch.setattr(mt, "_CAPTURED", [])
    plan = {"lists": []}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    mt.note_capture(plan, torch.device("cuda"))
    assert mt._CAPTURED == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    mt.note_capture(plan, torch.device("cpu"))
    assert mt._CAPTURED == []
    mt.note_capture(plan, torch.device("cuda"))
    mt.note_capture(plan, torch.device("cuda"))
    assert len(mt._CAPTURED) == 1 and mt._CAPTURED[0] is plan


def test_pair_plans_in_use_survive_a_full_cache(kernel_device, monkeypatch):
    """The pair-plan cache drops its least recently used plan when full: a step's plans stay cached however
    many other plans a long-lived process made before (clearing the whole cache rebuilt them mid-run,
    and the launch guard counted those rebuilds in a suite run)."""
    monkeypatch.setattr(mt, "_PAIR_PLANS", {("old", i): [] for i in range(mt.PAIR_PLANS_MAX - 1)})
    built = []
    real = mt.device_int_tensor
    monkeypatch.setattr(mt, "device_int_tensor", lambda *a: built.append(1) or real(*a))
    t1, s1 = [torch.zeros(40, device=kernel_device)], [torch.ones(40, device=kernel_device)]
    t2, s2 = [torch.zeros(24, device=kernel_device)], [torch.ones(24, device=kernel_device)]
    ema_update_(t1, s1, 0.9, impl="triton")
    ema_update_(t2, s2, 0.9, impl="triton")
    first = len(built)  # the two plans' tables, built once
    for _ in range(3):  # two live plans alternating in a cache that had one free slot
        ema_update_(t1, s1, 0.9, impl="triton")
        ema_update_(t2, s2, 0.9, impl="triton")
    assert first > 0 and len(built) == first, "a live plan was rebuilt"
    assert len(mt._PAIR_PLANS) == mt.PAIR_PLANS_MAX and ("old", 0) not in mt._PAIR_PLANS
