"""One optimisation step of the product, shared by the trainer and the step benchmark.

What a step does, all on the device and with no host synchronization (the fp16 path's GradScaler
has its own):

1. the schedule: this step's learning rates and EMA tau read from device tables at the number of
   *applied* steps (a device counter), so a skipped step leaves the schedule where it was on every
   device, with no host read (``Schedule``);
2. snapshot of every BatchNorm running statistic (one ``_foreach_copy_`` per dtype);
3. forward (through DDP / torch.compile when the trainer wraps it) and backward;
4. the non-finite check: loss and gradient norms, max-reduced across ranks into one flag;
5. the optimizer step with that flag as ``skip`` (a no-op on every rank alike);
6. BatchNorm statistics restored where the flag is set (one launch per dtype), the EMA with
   tau = 1 on a skipped step, and the counters (skipped, consecutive, applied) advanced.

Every list handed to a ``_foreach_*`` op holds one dtype and one device (``by_dtype``): ATen's CUDA
fast path needs that, and otherwise falls back to one kernel per tensor (bench_dispatch counts
what a CUDA device would launch, so such a fallback fails tests/train/test_dispatch_budget.py).

Graph modes (``train.graph``): 'off' runs the step eagerly; 'static' makes it graph-ready (static
input buffers the batch is copied into, gradients kept in place and zeroed by one
``_foreach_zero_`` per dtype, so every pointer table is built once), which is the CPU twin; 'on'
(CUDA) runs 'static' for ``GRAPH_WARMUP`` eager steps (11 under DDP) on one side stream, captures one step as a
CUDA graph on that same stream and replays it: one launch per step instead of ~1,400. The capture
(``CudaGraphs``) uses the thread-local capture mode, so CUDA calls of other threads (DALI, nvJPEG
workers) cannot invalidate it, and runs under ``torch.compiler.set_stance("fail_on_recompile")``,
so a torch.compile guard miss becomes one line naming the guard instead of an unrelated CUDA
error. The plans the fused kernels use inside the capture live as long as the graph (nothing
outlives the step), and loading optimizer state into a captured step re-captures it.

Skips: ``skipped`` and ``consecutive`` are device counters. ``train.max_consecutive_skips`` is
checked without stalling the device's queue: after each step the consecutive count is copied
asynchronously into a pinned host slot (``CounterReader``) and read ``CounterReader.DEPTH - 1``
steps later, on every device and rank alike (so every rank stops at the same step), and at once
before a checkpoint. The stop names the step where the limit was reached.
"""

from __future__ import annotations

import collections
import contextlib
import re
import time
import weakref

import torch
import torch.distributed as dist

from vssl_fast import faults
from vssl_fast.kernels import restore_where_
from vssl_fast.kernels._common import triton_available
from vssl_fast.kernels._multi_tensor import DeviceLR, keep_captured_plans
from vssl_fast.optim import set_lrs, tau_schedule, warmup_cosine

__all__ = ["TrainStep", "Schedule", "CounterReader", "CudaGraphs", "CaptureError", "by_dtype"]


class CaptureError(faults.Failure):
    """The step cannot be captured as a CUDA graph with these settings (one line; exit 2, a config error)."""

    exit_code = 2


_RECOMPILE = "Detected recompile when torch.compile stance is 'fail_on_recompile'"


def recompile_guards(message: str) -> str:
    """The guard failures of Dynamo's fail_on_recompile message, and where, on one line."""
    guards = [m.group(1).split("#")[0].strip() for m in re.finditer(r"^\s*- \d+/\d+: (.*)$", message, re.M)]
    where = re.search(r"filename: '(.*?)', function name: '(.*?)', line number: (\d+)", message)
    at = f" (in {where.group(2)}, {where.group(1)}:{where.group(3)})" if where else ""
    return ("; ".join(guards) or "no guard named") + at


def _chain(e: BaseException):
    """``e`` and the exceptions it was raised from or during, outermost first."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def by_dtype(*lists):
    """Parallel tensor lists split into groups of one (device, dtype) each, as the first list's
    tensors: ``by_dtype(a, b)`` -> [(a_group, b_group), ...]. ATen's CUDA ``_foreach_*`` fast path
    needs one device and dtype per list; a mixed list costs one kernel per tensor."""
    groups: dict = {}
    for i, t in enumerate(lists[0]):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return [tuple([lst[i] for i in idx] for lst in lists) for idx in groups.values()]


class Schedule:
    """The learning rates of every parameter group and the EMA tau, as device tables indexed by the
    number of applied steps (``applied``, a device counter the step advances by one unless it was
    skipped): position k of the tables holds exactly the fp32 values the host formulas give at k
    (``warmup_cosine``, ``tau_schedule``), and the last entry repeats past the end. Reading a
    position is one ``index_select`` into ``now``, whose rows the fused optimizers read as their LR
    (``DeviceLR``) and the EMA as tau: no host value is involved, so a captured graph and an eager
    step take the same schedule, and a skip never needs the host to know of it."""

    def __init__(self, opt, optim_cfg, warmup_steps: int | None, total_steps: int | None, device):
        o = optim_cfg
        if total_steps is None:  # no schedule given: each group's lr and tau_base throughout
            last, rows = 0, [[float(g["lr"])] for g in opt.param_groups] + [[o.tau_base]]
        else:
            bases = [g.setdefault("base_lr", g["lr"]) for g in opt.param_groups]
            last = max(int(total_steps), 1)
            rows = [[warmup_cosine(k, b, warmup_steps, total_steps, o.warmup_start_lr, o.min_lr) for k in range(last + 1)]
                    for b in bases]
            rows.append([tau_schedule(k, total_steps, o.tau_base, o.tau_final) for k in range(last + 1)])
        self.key = (warmup_steps, total_steps)
        self.table = torch.tensor(rows, dtype=torch.float32, device=device)  # [groups + 1, steps + 1]
        self.last = last
        self.now = self.table[:, :1].clone()  # what read_ writes: [groups + 1, 1]
        self.index = torch.zeros(1, dtype=torch.int64, device=device)

    def read_(self, applied: torch.Tensor) -> None:
        torch.clamp(applied, max=self.last, out=self.index)
        torch.index_select(self.table, 1, self.index, out=self.now)

    def lr(self, gi: int) -> torch.Tensor:
        return self.now[gi]

    @property
    def tau(self) -> torch.Tensor:
        return self.now[-1]


def wait_for(query, timeout_s: float, what: str, clock=time.monotonic, pause=lambda: time.sleep(1e-4)) -> None:
    """Wait until ``query()`` is true, at most ``timeout_s``; then a DistributedError (exit 8). A captured
    NCCL collective that hangs is watched by nothing (captured work is not queued for NCCL's watchdog, and
    its async error handling is off for a capture), so this is what turns such a hang into an error."""
    deadline = clock() + timeout_s
    while not query():
        if clock() > deadline:
            raise faults.DistributedError(f"{what} did not complete within dist.timeout_s={timeout_s:g} s: a collective "
                                          "in the step is stuck (a lost or stalled peer rank); check the other ranks' "
                                          "logs, then --resume auto")
        pause()


class CounterReader:
    """Reads a device counter after every step without stalling the device's queue: each value is copied
    asynchronously into one of ``DEPTH`` pinned host slots, and the value of step ``s`` is read at the
    push of step ``s + DEPTH - 1``, waiting for its copy if it has not landed. The lag is the same on
    every device and every rank (never "whichever copies happen to have landed"), so all ranks act on a
    count at the same step. ``drain()`` reads every pending value (before a checkpoint)."""

    DEPTH = 4

    def __init__(self, device: torch.device, depth: int = DEPTH, timeout_s: float = 1800.0):
        self.cuda, self.device = device.type == "cuda", device
        self.depth, self.timeout_s = depth, timeout_s
        self.host = torch.zeros(depth, dtype=torch.int64, pin_memory=self.cuda)
        self.events = [torch.cuda.Event() if self.cuda else None for _ in range(depth)]
        self.pending: collections.deque = collections.deque()  # (slot, step), oldest first
        self.next_slot = 0

    def wait(self, slot: int) -> None:
        if self.cuda:
            wait_for(self.events[slot].query, self.timeout_s, f"the step's skip count (slot {slot})")

    def push(self, counter: torch.Tensor, step: int) -> list[tuple[int, int]]:
        """Queue the read of ``counter`` after ``step``; returns [(step - DEPTH + 1, its value)] once the
        pipeline is full, else []."""
        slot = self.next_slot  # free: at most depth - 1 slots stay in flight between pushes
        self.next_slot = (slot + 1) % self.depth
        self.host[slot].copy_(counter.reshape(()), non_blocking=self.cuda)
        if self.cuda:
            self.events[slot].record(torch.cuda.current_stream(self.device))  # this device's, not the current one's
        self.pending.append((slot, step))
        return self._read(max(0, len(self.pending) - (self.depth - 1)))

    def _read(self, n: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(n):
            slot, step = self.pending.popleft()
            self.wait(slot)
            out.append((step, int(self.host[slot])))
        return out

    def drain(self) -> list[tuple[int, int]]:
        return self._read(len(self.pending))

    def settle(self, what: str) -> None:
        """Wait, at most ``timeout_s``, for everything queued on the device so far (before the host blocks
        on it: a log point's values, an evaluation): a collective that never completes is then exit 8
        here rather than a blocking read that waits forever. Reads nothing; a no-op on the CPU."""
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            wait_for(ev.query, self.timeout_s, what)


class CudaGraphs:
    """The CUDA-graph calls of the captured step, in one place: warm-up steps and the capture run on
    one side stream (per-stream library state such as cuBLAS workspaces is made during warm-up, not
    during capture, as ``torch.cuda.make_graphed_callables`` does), the capture in the thread-local
    mode (other threads' CUDA calls cannot invalidate it), then replays. Tests substitute a CPU twin."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.graph = None

    @contextlib.contextmanager
    def on_side_stream(self):
        """Work on the side stream, ordered after what the current stream has queued and before what it
        queues next (both directions: torch's whole-network capture example)."""
        cur = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(cur)
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            cur.wait_stream(self.stream)

    def warmup(self, fn):
        with self.on_side_stream():
            return fn()

    def capture(self, fn):
        graph = torch.cuda.CUDAGraph()
        with self.on_side_stream(), torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            out = fn()  # recorded, not run: the first replay is this step
        self.graph = graph
        return out

    def replay(self) -> None:
        self.graph.replay()


class TrainStep:
    GRAPH_WARMUP = 3  # eager steps on the side stream before capture (torch's whole-network capture recipe)

    def __init__(self, model, forward, opt, method_cfg, optim_cfg, device, amp_dtype=None, scaler=None,
                 distributed: bool = False, seed: int = 0, rank: int = 0, ema_impl: str = "auto", graph: str = "off",
                 graphs=None, warmup: int | None = None, timeout_s: float = 1800.0):
        if graph not in ("off", "static", "on"):
            raise ValueError(f"TrainStep: graph must be 'off', 'static' or 'on', got {graph!r}")
        # the schedule on the device: a fused optimizer whose kernels run here reads its LR from memory
        self.device_schedule = isinstance(opt, DeviceLR) and triton_available(device)
        if graph != "off":
            if scaler is not None:
                raise ValueError("TrainStep: graph mode needs bf16 or fp32 (GradScaler's step reads its scale on the host)")
            if not isinstance(opt, DeviceLR):
                raise ValueError(f"TrainStep: graph mode needs a fused optimizer that reads its LR on the device, "
                                 f"not {type(opt).__name__}")
            if graph == "on" and device.type != "cuda" and graphs is None:
                raise ValueError("TrainStep: graph='on' captures a CUDA graph; on a CPU use graph='static'")
        if self.device_schedule:
            opt.lr_on_device = True
        self.graph_mode = graph
        self.graph_warmup = self.GRAPH_WARMUP if warmup is None else warmup  # eager steps before the capture
        self._graphs = graphs  # CudaGraphs (made at the first graph step) or a test's CPU twin
        self._static = None  # (x1, x2, y) buffers the loader's batch is copied into
        self._captured = None  # (outputs, plans kept alive) once captured
        self._warm = 0
        self.model, self.forward, self.opt = model, forward, opt
        self.method_cfg, self.optim_cfg = method_cfg, optim_cfg
        self.device, self.amp_dtype, self.scaler, self.distributed = device, amp_dtype, scaler, distributed
        self.ema_impl = ema_impl
        self.step = 0
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.consecutive = torch.zeros((), dtype=torch.int64, device=device)
        self.applied_dev = torch.zeros(1, dtype=torch.int64, device=device)  # steps taken minus skips
        self.sched: Schedule | None = None
        self._host_tau = torch.tensor(optim_cfg.tau_base, device=device)  # the host-schedule path's tau
        self.noise_seed = torch.zeros(1, dtype=torch.int64, device=device)
        # the high 31 bits of the noise seed: (seed, rank) reduced mod 2^31 so any train.seed fits in int64
        # (unchanged for seed < 2147, the values every earlier run used)
        self.seed_base = ((seed * 1_000_003 + rank) % (1 << 31)) * (1 << 32)
        # BatchNorm statistics (student, teacher, heads): the forward of a step that turns out to be
        # skipped has already moved them, so they are snapshot before it and restored on a skip
        self.bn_stats = [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                         for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self.bn_backup = [torch.empty_like(b) for b in self.bn_stats]
        self._bn_groups = by_dtype(self.bn_backup, self.bn_stats)  # fp32 statistics, int64 counters
        self.skip_reader = CounterReader(device, timeout_s=timeout_s)
        # optimizer state loaded after a capture would leave the graph updating the old buffers: re-capture
        me = weakref.ref(self)  # the optimizer must not keep a released step alive
        opt.register_load_state_dict_post_hook(lambda _opt: me() is not None and me().release_graph())

    # ------------------------------------------------------------------ schedule
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # a captured graph must not rely on autocast's weight-cast cache (torch's CUDA graph notes)
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=self.graph_mode == "off")

    @property
    def applied(self) -> int:
        """Schedule position: steps taken minus skipped steps (reads the device counter)."""
        return int(self.applied_dev)

    @property
    def tau(self) -> torch.Tensor:
        return self.sched.tau if self.sched is not None else self._host_tau

    def schedule(self, warmup_steps: int, total_steps: int) -> None:
        """Set the schedule for this and the following steps. Device path: the tables are built once
        per (warmup, total) and each step reads them on the device (nothing per step here); host
        path (an optimizer that reads host LRs: the references, or no Triton): the LRs and tau at
        the applied position, which the host reads (a sync, as those optimizers make anyway)."""
        if self.device_schedule:
            self._set_schedule(warmup_steps, total_steps)
            return
        o = self.optim_cfg
        pos = self.applied
        set_lrs(self.opt, pos, warmup_steps, total_steps, o.warmup_start_lr, o.min_lr)
        self._host_tau.fill_(tau_schedule(pos, total_steps, o.tau_base, o.tau_final))

    def _set_schedule(self, warmup_steps, total_steps) -> None:
        if self.sched is not None and self.sched.key == (warmup_steps, total_steps):
            return
        if self._captured is not None:
            raise CaptureError("TrainStep: the schedule changed after the step was captured")
        self.sched = Schedule(self.opt, self.optim_cfg, warmup_steps, total_steps, self.device)
        for gi in range(len(self.opt.param_groups)):
            self.opt.bind_device_lr(gi, self.sched.lr(gi))

    def sync_host(self) -> None:
        """At a log point (the host reads the metrics anyway): each group's ``lr`` and the tau the
        last step used, for the log. One host read of the device schedule."""
        if self.sched is not None:
            vals = self.sched.now.flatten().tolist()
            for g, v in zip(self.opt.param_groups, vals):
                g["lr"] = v

    # ------------------------------------------------------------------ the step
    def __call__(self, x1, x2, y):
        """One training step on a batch; returns the loss parts (device tensors, read at log points)."""
        if self.device_schedule and self.sched is None:
            self._set_schedule(None, None)  # no schedule() yet: constant LRs and tau_base
        if self.graph_mode == "off":
            parts = self._device_step(x1, x2, y)
        else:
            if self._static is None:
                self._static = tuple(torch.empty_like(t) for t in (x1, x2, y))  # same layout as the loader's
            for name, buf, t in zip(("x1", "x2", "y"), self._static, (x1, x2, y)):
                if t.shape != buf.shape or t.dtype != buf.dtype:
                    raise ValueError(f"TrainStep(graph={self.graph_mode!r}): batch {name} is {tuple(t.shape)} {t.dtype}, "
                                     f"the static buffer {tuple(buf.shape)} {buf.dtype}; graph modes need fixed batches")
                buf.copy_(t)
            parts = self._graph_step() if self.graph_mode == "on" else self._device_step(*self._static)
        self.step += 1
        return parts

    def consecutive_seen(self, drain: bool = False) -> list[tuple[int, int]]:
        """(step, consecutive skips after it): the count of the step ``CounterReader.DEPTH - 1`` steps
        back, once there is one (``drain``: every pending one). Called by the trainer after each step."""
        if drain:
            return self.skip_reader.drain()
        return self.skip_reader.push(self.consecutive, self.step)

    def _graph_step(self):
        """Warm up on the side stream, capture once on the same stream, then replay."""
        if self._graphs is None:
            self._graphs = CudaGraphs(self.device)
        if self._captured is None and self._warm < self.graph_warmup:
            self._warm += 1
            return self._graphs.warmup(lambda: self._device_step(*self._static))
        if self._captured is None:
            self._captured = self._capture()
        self._graphs.replay()
        return self._captured[0]

    def _capture(self):
        """Capture one step. Plans the fused kernels use inside it are kept alive by this step (not
        by the process), and a torch.compile recompile inside it is an error naming its guard."""
        with keep_captured_plans() as plans, torch.compiler.set_stance("fail_on_recompile"):
            try:
                parts = self._graphs.capture(lambda: self._device_step(*self._static))
            except Exception as e:
                # the capture's own exit may raise over Dynamo's error (an invalidated capture): look down the chain
                hit = next((x for x in _chain(e) if _RECOMPILE in str(x)), None)
                if hit is None:
                    raise
                raise CaptureError("train.graph=on: torch.compile would recompile inside the CUDA-graph capture, "
                                   f"after {self.graph_warmup} warm-up steps; guard failed: {recompile_guards(str(hit))}. "
                                   "Use train.compile=none with train.graph=on, or train.graph=off") from None
        return parts, plans

    def release_graph(self) -> None:
        """Forget the captured graph (and the plans it kept alive): the next graph step warms up and
        captures again. Called when optimizer state is loaded into a captured step."""
        if self._captured is not None:
            self._captured = None
            self._warm = 0
            if self._graphs is not None:
                self._graphs.graph = None

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for g in self.opt.param_groups for p in g["params"] if p.grad is not None]

    def _device_step(self, x1, x2, y):
        """Everything a step does on the device, with no host synchronization (what a graph captures)."""
        self.noise_seed.add_(1)
        seed = self.noise_seed + self.seed_base
        if self.sched is not None:
            self.sched.read_(self.applied_dev)
        for backup, stats in self._bn_groups:
            torch._foreach_copy_(backup, stats)
        with self.autocast():
            loss, parts = self.forward(x1, x2, y, self.method_cfg, seed)
        if self.graph_mode == "off":
            self.opt.zero_grad(set_to_none=True)
        else:  # graph modes keep gradients where they are (their pointer tables are built once)
            for (grads,) in by_dtype(self._grads()):
                torch._foreach_zero_(grads)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        sums = [torch.stack(torch._foreach_norm(g)).sum() for (g,) in by_dtype(self._grads())]
        gnorm = sums[0] if len(sums) == 1 else torch.stack([x.float() for x in sums]).sum()
        bad = ~torch.isfinite(loss.detach()) | ~torch.isfinite(gnorm)
        bad = bad.to(torch.int32).reshape(1)
        if self.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if self.scaler:
            self.scaler.step(self.opt)  # the scaler skips on inf itself (with its own host sync)
            self.scaler.update()
        else:
            self.opt.step(skip=bad)
        restore_where_(self.bn_stats, self.bn_backup, bad, impl=self.ema_impl)
        badl = bad.reshape(()).long()
        self.model.ema_update(torch.where(badl.bool(), torch.ones_like(self.tau), self.tau), impl=self.ema_impl)
        self.skipped += badl
        self.consecutive.copy_((self.consecutive + badl) * badl)
        self.applied_dev += 1 - badl
        return parts

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"skipped": self.skipped.clone(), "consecutive": self.consecutive.clone(),
                "noise_seed": self.noise_seed.clone(), "step": self.step, "applied": self.applied_dev.clone()}

    def load_state_dict(self, st: dict) -> None:
        self.skipped.copy_(st["skipped"])
        self.consecutive.copy_(st["consecutive"])
        self.noise_seed.copy_(st["noise_seed"])
        self.step = int(st["step"])
        # older checkpoints: the position is the steps taken minus the skips
        applied = st.get("applied")
        self.applied_dev.copy_(applied if applied is not None else (self.step - st["skipped"]).reshape(1))
