"""One optimisation step of the product, shared by the trainer and the step benchmark.

forward (through DDP / torch.compile when the trainer wraps it) -> backward -> device-side
non-finite check (loss and gradient norms; max-reduced across ranks) -> optimizer step with that
flag as ``skip`` -> EMA with tau = 1 on a skipped step -> BatchNorm running statistics restored on
a skipped step (snapshot before the forward), so a skipped step changes nothing. No host
synchronization (the fp16 path's GradScaler has its own).

Graph modes (``train.graph``): 'off' runs the step eagerly; 'static' makes it graph-ready
(static input buffers the batch is copied into, persistent gradients so every pointer table is
built once, the LR and tau read from device tensors the host refreshes outside the step), which
is the CPU twin; 'on' (CUDA) runs 'static' eagerly for a few warm-up steps on a side stream,
captures one step as a CUDA graph and replays it, one launch per step instead of ~1,400
(bench/RESULTS.md). 'static' gives the same losses and parameters as 'off' (tested on the CPU).

Schedules: the LR and tau are host floats indexed by the number of *applied* steps, so a skipped
step leaves the schedule where it was. The host learns of skips without a sync only at log points
(``sync_skips``, called by the trainer when it reads the metrics anyway); on the CPU, where a read
costs nothing, after every step. So on a GPU the steps between a skip and the next log point run
one schedule position ahead; the position is exact again from the log point on.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from vssl_fast.kernels import restore_where_
from vssl_fast.optim import set_lrs, tau_schedule

__all__ = ["TrainStep"]


class TrainStep:
    GRAPH_WARMUP = 3  # eager steps on a side stream before capture (torch's whole-network capture recipe)

    def __init__(self, model, forward, opt, method_cfg, optim_cfg, device, amp_dtype=None, scaler=None,
                 distributed: bool = False, seed: int = 0, rank: int = 0, ema_impl: str = "auto", graph: str = "off"):
        if graph not in ("off", "static", "on"):
            raise ValueError(f"TrainStep: graph must be 'off', 'static' or 'on', got {graph!r}")
        if graph != "off":
            if scaler is not None:
                raise ValueError("TrainStep: graph mode needs bf16 or fp32 (GradScaler's step reads its scale on the host)")
            if not hasattr(opt, "lr_on_device"):
                raise ValueError(f"TrainStep: graph mode needs a fused optimizer that reads its LR on the device, "
                                 f"not {type(opt).__name__}")
            if graph == "on" and device.type != "cuda":
                raise ValueError("TrainStep: graph='on' captures a CUDA graph; on a CPU use graph='static'")
            opt.lr_on_device = True
        self.graph_mode = graph
        self._static = None  # (x1, x2, y) buffers the loader's batch is copied into
        self._graph = None
        self._graph_parts = None
        self._warm = 0
        self.model, self.forward, self.opt = model, forward, opt
        self.method_cfg, self.optim_cfg = method_cfg, optim_cfg
        self.device, self.amp_dtype, self.scaler, self.distributed = device, amp_dtype, scaler, distributed
        self.ema_impl = ema_impl
        self.step = 0
        self.known_skips = 0  # skips the host has seen (see the module docstring)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.consecutive = torch.zeros((), dtype=torch.int64, device=device)
        self.tau = torch.tensor(optim_cfg.tau_base, device=device)
        self.noise_seed = torch.zeros(1, dtype=torch.int64, device=device)
        # the high 31 bits of the noise seed: (seed, rank) reduced mod 2^31 so any train.seed fits in int64
        # (unchanged for seed < 2147, the values every earlier run used)
        self.seed_base = ((seed * 1_000_003 + rank) % (1 << 31)) * (1 << 32)
        # BatchNorm statistics (student, teacher, heads): the forward of a step that turns out to be
        # skipped has already moved them, so they are snapshot before it and restored on a skip
        self.bn_stats = [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                         for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self.bn_backup = [torch.empty_like(b) for b in self.bn_stats]

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # a captured graph must not rely on autocast's weight-cast cache (torch's CUDA graph notes)
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=self.graph_mode == "off")

    @property
    def applied(self) -> int:
        """Schedule position: steps taken minus the skips the host knows of."""
        return self.step - self.known_skips

    def sync_skips(self) -> int:
        self.known_skips = int(self.skipped)
        return self.known_skips

    def schedule(self, warmup_steps: int, total_steps: int) -> None:
        o = self.optim_cfg
        set_lrs(self.opt, self.applied, warmup_steps, total_steps, o.warmup_start_lr, o.min_lr)
        self.tau.fill_(tau_schedule(self.applied, total_steps, o.tau_base, o.tau_final))
        if self.graph_mode != "off":
            self.opt.set_device_lrs()  # the kernels read the LR from device memory

    def __call__(self, x1, x2, y):
        """One training step on a batch; returns the loss parts (device tensors, read at log points)."""
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
        if self.device.type == "cpu":
            self.sync_skips()
        return parts

    def _graph_step(self):
        """Warm up on a side stream, capture once, then replay: one launch for the whole step."""
        if self._graph is None and self._warm < self.GRAPH_WARMUP:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                parts = self._device_step(*self._static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._warm += 1
            return parts
        if self._graph is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records, runs nothing: the replay below is this step
                self._graph_parts = self._device_step(*self._static)
            self._graph = graph
        self._graph.replay()
        return self._graph_parts

    def _device_step(self, x1, x2, y):
        """Everything a step does on the device, with no host synchronization (what a graph captures)."""
        self.noise_seed.add_(1)
        seed = self.noise_seed + self.seed_base
        if self.bn_stats:
            torch._foreach_copy_(self.bn_backup, self.bn_stats)
        with self.autocast():
            loss, parts = self.forward(x1, x2, y, self.method_cfg, seed)
        # graph modes keep gradients where they are (their pointer tables are built once)
        self.opt.zero_grad(set_to_none=self.graph_mode == "off")
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        grads = [p.grad for g in self.opt.param_groups for p in g["params"] if p.grad is not None]
        bad = ~torch.isfinite(loss.detach()) | ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        bad = bad.to(torch.int32).reshape(1)
        if self.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if self.scaler:
            self.scaler.step(self.opt)  # the scaler skips on inf itself (with its own host sync)
            self.scaler.update()
        else:
            self.opt.step(skip=bad)
        restore_where_(self.bn_stats, self.bn_backup, bad, impl=self.ema_impl)
        badf = bad.reshape(()).bool()
        self.model.ema_update(torch.where(badf, torch.ones_like(self.tau), self.tau), impl=self.ema_impl)
        self.skipped += badf.long()
        self.consecutive.copy_((self.consecutive + badf.long()) * badf.long())
        return parts

    def state_dict(self) -> dict:
        return {"skipped": self.skipped.clone(), "consecutive": self.consecutive.clone(),
                "noise_seed": self.noise_seed.clone(), "step": self.step, "known_skips": int(self.skipped)}

    def load_state_dict(self, st: dict) -> None:
        self.skipped.copy_(st["skipped"])
        self.consecutive.copy_(st["consecutive"])
        self.noise_seed.copy_(st["noise_seed"])
        self.step = int(st["step"])
        self.known_skips = int(st.get("known_skips", 0))
