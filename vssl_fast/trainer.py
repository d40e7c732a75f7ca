"""The training engine behind ``train.py``: one CPU process, one GPU, torchrun on one or many nodes.

The step (no host synchronization except at log points every ``log.every_steps``):
forward both views (bf16 autocast and channels-last on GPU by default, fp16 + GradScaler as an
option), backward, a device-side non-finite check (loss and gradient norms, max-reduced across
ranks), the optimizer step with that flag as ``skip`` (a no-op on every rank alike), and the EMA
with ``tau = 1`` on a skipped step (bit-identical teacher), and the LR/tau schedule stays put
(see ``vssl_fast.step``). Skips are counted on the device and read at log points;
``train.max_consecutive_skips`` in a row stop the run with an error.

torch.compile (``train.compile=auto``): on CUDA at crop sizes <= 64 the model's forward is
compiled ('default' mode); at 224 px and on the CPU it is not. This follows the H200 figures in
issue 6/7 (32 px, batch 256: 27,636 views/s compiled vs 18,740 eager; 224 px: no gain) measured
with the plain step; it is still to be re-measured with the fused step (bench/RESULTS.md).

Faults (``vssl_fast.faults``): SIGTERM / SIGUSR1 set a flag; at the next step boundary, after a
checkpoint write, or within one batch of an evaluation, the ranks vote (a CPU collective), all save
a checkpoint (an interrupted evaluation is marked pending and rerun on resume) and exit with code
143. Checkpoints are atomic (see ``vssl_fast.checkpoint``); ``--resume auto`` continues bit-exactly
(model, teacher, optimizer, schedules, counters, loader position and every RNG) from the newest
checkpoint that loads with finite values, with this run's optimizer hyperparameters. A start first
claims the run dir (rank 0 locks it for the run's life; a second live start into it exits 3);
nothing else is written into it before the start is accepted, and a run dir holding another run is
only continued with ``--resume`` (``vssl_fast.rundir``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vssl_fast import auto_settings, faults, rundir
from vssl_fast import checkpoint as ckpt
from vssl_fast.config import Config, device_formats
from vssl_fast.data import build_data, reading_data
from vssl_fast.distributed import cleanup, init_distributed
from vssl_fast.evaluate import EVAL_NETWORK, extract_features, feature_amp_dtype, knn_eval, online_eval
from vssl_fast.models import SSLModel
from vssl_fast.monitor import Monitor, require_wandb, setup_logging
from vssl_fast.optim import build_optimizer
from vssl_fast.step import CudaGraphs, TrainStep
from vssl_fast.syncbn import convert_sync_batchnorm, use_sync_batchnorm

__all__ = ["Trainer", "NonFiniteError", "EXIT_PREEMPTED", "resolve_compile_mode"]

EXIT_PREEMPTED = faults.Preempted.exit_code
NonFiniteError = faults.NonFiniteError


DDP_GRAPH_WARMUP = 11  # DDP-enabled eager steps before a capture (torch's CUDA-graph notes: at least 11)
NCCL_FOR_CAPTURE = (2, 9, 6)  # the first NCCL whose collectives a full-step capture may contain (torch's notes)


def capture_wanted(cfg) -> bool:
    """Can this run's step be captured under DDP on GPUs, as far as the config and NCCL tell before the
    process group exists? (Only then is NCCL's async error handling turned off for it.)"""
    if cfg.train.graph != "on" or not torch.cuda.is_available():
        return False
    fp16 = cfg.train.precision == "fp16"
    return not fp16 and cfg.optim.impl != "reference" and tuple(torch.cuda.nccl.version()) >= NCCL_FOR_CAPTURE


def ddp_buffer_sync(on: bool) -> dict:
    """DDP's buffer broadcast before each forward: ``forward_sync_buffers`` where DDP has it (torch >=
    2.14 deprecates ``broadcast_buffers``; it keeps the sync at construction), else ``broadcast_buffers``."""
    import inspect

    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": on} if "forward_sync_buffers" in params else {"broadcast_buffers": on}


def resolve_graph_mode(mode: str, device: torch.device, dist_info, scaler, opt) -> tuple[str, str]:
    """train.graph -> (TrainStep graph mode, why, for the log). 'auto' stays uncaptured until the
    captured step has been measured on a card (bench_step --graph-modes off,on; bench/RESULTS.md).
    Under DDP on CUDA every condition of torch's recipe is checked here and named in the reason."""
    if mode == "off":
        return "off", "train.graph=off"
    if mode == "auto":
        return "off", auto_settings.why("train.graph")
    if scaler is not None:
        return "off", "train.graph=on: not captured with fp16 (GradScaler reads its scale on the host)"
    if not hasattr(opt, "lr_on_device"):
        return "off", f"train.graph=on: not captured with {type(opt).__name__} (needs a fused optimizer)"
    if device.type != "cuda":
        return "static", ("train.graph=on on a CPU: the graph-ready step without capture"
                          + (f" (DDP over {dist_info.world} processes)" if dist_info.enabled else ""))
    if not dist_info.enabled:
        return "on", "train.graph=on: one CUDA graph per step"
    nccl = tuple(torch.cuda.nccl.version())
    if nccl < NCCL_FOR_CAPTURE:
        return "off", (f"train.graph=on: not captured under DDP: NCCL {'.'.join(map(str, nccl))} is older than "
                       f"{'.'.join(map(str, NCCL_FOR_CAPTURE))}, the first whose collectives a graph may capture")
    if dist_info.async_error_handling not in ("0",):
        return "off", ("train.graph=on: not captured under DDP: TORCH_NCCL_ASYNC_ERROR_HANDLING="
                       f"{dist_info.async_error_handling} (a capture needs 0; it is set so only when unset at start)")
    return "on", (f"train.graph=on: one CUDA graph per step under DDP over {dist_info.world} ranks (NCCL "
                  f"{'.'.join(map(str, nccl))}; TORCH_NCCL_ASYNC_ERROR_HANDLING=0, so NCCL's watchdog does not tear "
                  f"down a rank whose peer is lost: torchrun stops the others, see the README; DDP built on the capture "
                  f"stream; {DDP_GRAPH_WARMUP} DDP warm-up steps before the capture)")


def resolve_compile_mode(mode: str, device: torch.device, crop_size: int) -> str:
    """train.compile=auto: 'default' on CUDA at crop sizes <= 64, else 'none' (see the module docstring)."""
    if mode != "auto":
        return mode
    return "default" if (device.type == "cuda" and crop_size <= 64) else "none"


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        if cfg.log.wandb:
            require_wandb()  # asked for and missing: one line (exit 2) before anything starts
        self.dist = init_distributed(cfg.dist.timeout_s, capture=capture_wanted(cfg))
        self.device = self.dist.device
        self.run_dir = Path(cfg.run_dir)
        self.log = setup_logging(self.dist.rank)  # train.log opens once the start is accepted (fit)
        self.ckpt_dir = self.run_dir / "checkpoints"
        try:
            # the run dir is this process's (rank 0 holds its lock) or every rank raises: before anything slow
            self.claim = rundir.claim(self.run_dir, cfg.resume, self.dist)
        except BaseException:
            cleanup()  # leave the process group before exiting (a peer's exit could otherwise abort this process)
            raise
        try:
            self._build()
        except BaseException:
            self.claim.release()  # a start that failed here leaves the run dir as it was
            cleanup()
            raise

    def _build(self) -> None:
        """Everything after the claim: data, model, optimizer, step, monitor."""
        cfg = self.cfg
        cuda = self.device.type == "cuda"
        self.amp_dtype, _, channels_last = device_formats(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        random.seed(cfg.train.seed)
        with reading_data(cfg.data):  # not found / unreadable: one line naming data.path
            self.data = build_data(cfg, self.device, self.dist.rank, self.dist.world)
        self.log.info("data: %s", self.data.describe)
        model = SSLModel(**cfg.method.model_kwargs(), backbone=cfg.model.backbone, cifar_stem=cfg.model.cifar_stem,
                         num_classes=self.data.num_classes)
        sync_bn = use_sync_batchnorm(cfg.model.sync_batchnorm, self.dist.world)
        if sync_bn:
            model = convert_sync_batchnorm(model, self.device)
        self.log.info("BatchNorm: %s (model.sync_batchnorm=%s, world %d)", "SyncBatchNorm over all ranks" if sync_bn
                      else "per-process statistics", cfg.model.sync_batchnorm, self.dist.world)
        model = model.to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.opt = build_optimizer(model, cfg, self.dist.world)
        self.steps_per_epoch = len(self.data.train)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.warmup_steps = int(round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        graph, why = resolve_graph_mode(cfg.train.graph, self.device, self.dist, self.scaler, self.opt)
        self.log.info("step: %s", why)
        # a captured step: the side stream of the capture exists first, and DDP is built on it (torch's
        # CUDA-graph notes: DDP constructed in a side-stream context; the same stream as the capture's)
        graphs = CudaGraphs(self.device) if graph == "on" else None
        self.ddp = model
        if self.dist.enabled:
            # SyncBatchNorm keeps every BatchNorm buffer equal across ranks (global statistics, same
            # updates), so DDP's broadcast of all buffers before each forward would move equal values
            with graphs.on_side_stream() if graphs else contextlib.nullcontext():  # ordered both ways
                self.ddp = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[self.dist.local_rank] if cuda else None, **ddp_buffer_sync(not sync_bn))
        self.forward = self.ddp
        mode = resolve_compile_mode(cfg.train.compile, self.device, cfg.data.crop_size)
        if mode != "none":
            self.forward = torch.compile(self.ddp, mode=mode)
        self.compile_mode = mode
        if cfg.train.compile == "auto":
            self.log.info("compile: %s", auto_settings.why("train.compile"))
        self.stepper = TrainStep(model, self.forward, self.opt, cfg.method, cfg.optim, self.device, self.amp_dtype,
                                 self.scaler, self.dist.enabled, cfg.train.seed, self.dist.rank, graph=graph,
                                 graphs=graphs, warmup=DDP_GRAPH_WARMUP if self.dist.enabled else None,
                                 timeout_s=cfg.dist.timeout_s)
        self.history: list[dict] = []
        self.monitor = Monitor(self.run_dir, self.dist.is_main, cfg.log.tensorboard, cfg.log.progress,
                               cfg.log.wandb_project if cfg.log.wandb else None, cfg.to_dict())
        self._saved_step = None  # the step of the newest checkpoint this process wrote
        self._pending_eval = None  # [epoch, knn] of an evaluation a stop interrupted: saved, rerun on resume
        self.log.info("model: %s %s (%d student params), %s optimizer (%s), precision %s, channels-last %s, "
                      "compile %s, world %d",
                      cfg.method.method, cfg.model.backbone,
                      sum(p.numel() for g in self.opt.param_groups for p in g["params"]),
                      cfg.optim.name, type(self.opt).__name__, self.amp_dtype or "fp32", channels_last, mode,
                      self.dist.world)

    # ------------------------------------------------------------------ signals
    def _install_signals(self):
        faults.install_stop_signals(vote=self.dist.any_true)  # a flag, read at step boundaries and in evaluation

    def _stop_if_requested(self) -> None:
        """SIGTERM/SIGUSR1 on any rank: all ranks agree, save and raise Preempted (exit 143)."""
        if faults.stop_agreed():
            self._preempt()

    def _preempt(self):
        self.log.warning("stop requested (SIGTERM/SIGUSR1): saving at step %d and exiting", self.step)
        if self._saved_step != self.step or self._pending_eval:
            self.save()
        self.monitor.close()
        raise faults.Preempted(f"stopped by SIGTERM/SIGUSR1 at step {self.step} with a checkpoint in {self.ckpt_dir}; "
                               "resume with --resume auto")

    # ------------------------------------------------------------------ checkpoints
    def _rng_state(self) -> dict:
        st = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            st["cuda"] = torch.cuda.get_rng_state(self.device)
        return st

    def _set_rng_state(self, st: dict) -> None:
        torch.set_rng_state(st["torch"])
        v = st["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
        if "cuda" in st and self.device.type == "cuda":
            torch.cuda.set_rng_state(st["cuda"], self.device)

    def save(self) -> Path | None:
        self._check_skips(self.stepper.consecutive_seen(drain=True))  # a run past its limit is never saved
        rngs = [self._rng_state()]
        if self.dist.enabled:
            rngs = [None] * self.dist.world
            dist.all_gather_object(rngs, self._rng_state(), group=self.dist.vote_group)
        path = None
        if self.dist.is_main:
            state = {
                "config": self.cfg.to_dict(), "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None, "loader": self.data.train.state_dict(),
                "epoch": self.data.train.epoch, "stepper": self.stepper.state_dict(), "rng": rngs,
                "history": json.dumps(self.history), "pending_eval": self._pending_eval,
            }
            path = ckpt.save_checkpoint(state, self.ckpt_dir, self.step, self.cfg.ckpt.keep)
            self.log.info("checkpoint %s", path)
        self.dist.barrier()
        self._saved_step = self.step
        return path

    def resume(self) -> None:
        r = self.cfg.resume
        if r == "none":
            return
        # auto: the newest checkpoint that loads with all values finite (each one skipped is named); a path: that one
        path, state = ckpt.select_for_resume(self.ckpt_dir, r, self.device, self.log)
        if path is None:
            self.log.info("resume auto: no complete checkpoint in %s, starting fresh", self.ckpt_dir)
            return
        ckpt.check_compatible(state["config"], self.cfg.to_dict(), path)
        rngs = state["rng"]
        if len(rngs) != self.dist.world:
            raise ckpt.CheckpointError(f"checkpoint {path} holds RNG states of {len(rngs)} ranks; this run has {self.dist.world}")
        try:
            self.model.load_state_dict(state["model"], strict=True)
            changed = ckpt.load_optimizer_state_(self.opt, state["optimizer"])  # hyperparameters: this run's config
            if self.scaler and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.data.train.load_state_dict(state["loader"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this run: {faults.one_line(e)}") from e
        self.stepper.load_state_dict(state["stepper"])
        self.history = json.loads(state["history"])
        self._pending_eval = state.get("pending_eval")
        self._set_rng_state(rngs[self.dist.rank])
        self.log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.data.train.epoch,
                      self.data.train.step)
        if changed:
            self.log.warning("resume: the optimizer follows this run's config; changed since the checkpoint: %s",
                             "; ".join(changed))

    # ------------------------------------------------------------------ the step
    @property
    def step(self) -> int:
        return self.stepper.step

    def train_step(self, x1, x2, y):
        self.stepper.schedule(self.warmup_steps, self.total_steps)
        return self.stepper(x1, x2, y)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, epoch: int, knn: bool) -> dict:
        amp = feature_amp_dtype(self.cfg)  # eval.feature_dtype, not the training precision
        val = extract_features(self.model.backbone, self.data.val, self.device, amp)  # once for both
        res = {"kind": "eval", "epoch": epoch, "step": self.step, "val_size": int(val[1].shape[0])}
        res.update(online_eval(self.model, self.data.val, self.device, amp, val_feats=val))
        if knn:
            e = self.cfg.eval
            res.update(knn_eval(self.model.backbone, self.data.bank, self.data.val, self.device, e.knn_k, e.knn_t,
                                self.data.num_classes, e.knn_chunk, amp, val_feats=val))
        self.monitor.record(res)
        self.history.append(res)
        self.log.info("eval epoch %g: %s", epoch, ", ".join(f"{k} {v:.2f}" for k, v in res.items()
                                                           if isinstance(v, float)))
        return res

    def _evaluate_or_stop(self, epoch: int, knn: bool) -> dict:
        """evaluate(); a stop signal during it saves with the evaluation marked pending (rerun on resume), exit 143."""
        self._pending_eval = [epoch, knn]
        self.stepper.skip_reader.settle(f"the steps before the evaluation at step {self.step}")
        try:
            res = self.evaluate(epoch, knn)
        except faults.StopRequested:
            self._preempt()
        self._pending_eval = None
        return res

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.cfg
        self._install_signals()
        self.resume()
        if self.dist.is_main:  # the start is accepted: from here on the run dir is this run's (vssl_fast.rundir)
            rundir.accept(self.run_dir, cfg, self.step, self.log)
        self.dist.barrier()
        loader = self.data.train
        t_start = time.time()
        t_log, n_log, wait_log = time.time(), 0, 0.0
        views_per_step = 2 * cfg.train.batch_size * self.dist.world
        fault = int(os.environ.get("VSSL_FAULT_AT_STEP", "0"))  # test hook: SIGKILL self after this step
        last_eval = self.history[-1] if self.history else None
        if self._pending_eval:  # the evaluation a stop signal interrupted before the checkpoint
            last_eval = self._evaluate_or_stop(*self._pending_eval)
        while self.step < self.total_steps:
            epoch = loader.epoch
            it = iter(loader)
            while self.step < self.total_steps:
                t0 = time.time()
                try:
                    x1, x2, y = next(it)
                except StopIteration:
                    break
                wait_log += time.time() - t0
                parts = self.train_step(x1, x2, y)
                n_log += 1
                if fault and self.step == fault:
                    os.kill(os.getpid(), signal.SIGKILL)
                if self.step % cfg.log.every_steps == 0 or self.step == self.total_steps:
                    self._log_step(parts, epoch, t_log, n_log, wait_log, views_per_step, t_start)
                    t_log, n_log, wait_log = time.time(), 0, 0.0
                self._check_skips(self.stepper.consecutive_seen())  # the count of DEPTH - 1 steps back
                if self.step % cfg.ckpt.every_steps == 0:
                    self.save()
                self._stop_if_requested()
            else:
                break  # total_steps reached mid-epoch
            # an epoch ended
            ep_done = loader.epoch  # the loader now points at the next epoch
            self.monitor.end_bar()
            knn_due = cfg.eval.knn_every_epochs and ep_done % cfg.eval.knn_every_epochs == 0
            if ep_done % cfg.eval.online_every_epochs == 0 or knn_due:
                last_eval = self._evaluate_or_stop(ep_done, bool(knn_due))
            self.save()
            self._stop_if_requested()
        self.monitor.end_bar()
        if last_eval is None or last_eval.get("step") != self.step or not any(k.startswith("knn") for k in last_eval):
            ep = self.step / self.steps_per_epoch  # the epochs trained: 0.08 for a run that stops 8% into epoch 1
            last_eval = self._evaluate_or_stop(int(ep) if ep == int(ep) else round(ep, 3), True)
        if self.step % cfg.ckpt.every_steps != 0:
            self.save()
        self._stop_if_requested()
        return self._finish(last_eval, time.time() - t_start)

    def _log_step(self, parts, epoch, t_log, n, wait, views_per_step, t_start):
        self.stepper.skip_reader.settle(f"step {self.step}")  # a stuck collective: exit 8, not a hang below
        vals = {k: float(v) for k, v in parts.items()}  # the log point: one host sync
        skipped = int(self.stepper.skipped)
        self.stepper.sync_host()  # the LRs the device schedule gave this step, for the row
        dt = max(time.time() - t_log, 1e-9)
        row = {"kind": "train", "step": self.step, "epoch": epoch, **vals, "lr": self.opt.param_groups[0]["lr"],
               "tau": float(self.stepper.tau), "img_per_s": n * views_per_step / 2 / dt, "views_per_s": n * views_per_step / dt,
               "data_wait": wait / dt, "step_time_ms": 1e3 * dt / max(n, 1), "skipped": skipped,
               "bad_files": len(getattr(self.data, "bad_files", ()))}  # this rank's: image folders only
        if self.device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        remaining = (self.total_steps - self.step) * dt / max(n, 1)
        row["eta_s"] = remaining
        self.monitor.record(row)
        msg = (f"ep {epoch} step {self.step}/{self.total_steps} loss {vals['loss']:.4f}"
               + (f" kl {vals['kl']:.4f} ll {vals['ll']:.4f}" if "kl" in vals else "")
               + (f" byol {vals['byol']:.4f}" if "byol" in vals else "")
               + f" z_std {vals['z_std']:.4f} lr {row['lr']:.4g} tau {row['tau']:.5f} img/s {row['img_per_s']:.0f}"
               + f" wait {100 * row['data_wait']:.0f}% step {row['step_time_ms']:.0f}ms"
               + (f" mem {row['peak_mem_gb']:.1f}G" if "peak_mem_gb" in row else "")
               + f" eta {remaining / 60:.1f}min" + (f" skipped {skipped}" if skipped else ""))
        self.monitor.step_line(self.log, self.step, self.total_steps, msg)  # train.log always; the bar on a terminal

    def _check_skips(self, seen: list[tuple[int, int]]) -> None:
        """Stop at the first step whose run of consecutive skipped steps reached the limit. Each count
        arrives CounterReader.DEPTH - 1 steps after its step, on every rank alike (``vssl_fast.step``),
        so all ranks stop together; the message names the step where the limit was reached."""
        limit = self.cfg.train.max_consecutive_skips
        hit = next(((st, c) for st, c in seen if c >= limit), None)
        if hit is None:
            return
        where = ckpt.nonfinite_advice(self.ckpt_dir, self.cfg.optim.lr) if self.dist.is_main else "see rank 0's message"
        raise NonFiniteError(f"{hit[1]} consecutive steps had a non-finite loss or gradient (last at step "
                             f"{hit[0]}, train.max_consecutive_skips={limit}); "
                             f"stopping. Lower the learning rate or check the data: {where}")

    def _finish(self, last_eval: dict, wall: float) -> dict:
        cfg = self.cfg
        k0 = f"knn_k{int(cfg.eval.knn_k[0])}_t{cfg.eval.knn_t[0]:g}_top1"
        results = {
            "method": cfg.method.method, "preset": cfg.preset, "dataset": cfg.data.dataset, "steps": self.step,
            "epochs": self.step / max(self.steps_per_epoch, 1), "online_top1": last_eval.get("online_top1"),
            "online_top5": last_eval.get("online_top5"), "knn_top1": last_eval.get(k0),
            **{k: v for k, v in last_eval.items() if k.startswith("knn_")},
            "val_size": last_eval.get("val_size"), "eval_feature_dtype": cfg.eval.feature_dtype,
            "eval_network": EVAL_NETWORK,
            "wall_time_s": wall, "skipped_steps": int(self.stepper.skipped), "world_size": self.dist.world,
            "bad_files": (self.data.bad_files.global_count(self.dist.vote_group)  # every rank calls it: a collective
                          if getattr(self.data, "bad_files", None) is not None else 0),
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__, "compile": self.compile_mode,
            "data_loader": self.data.describe,  # which pipeline fed the run (DALI GPU or CPU, nvJPEG, PIL, device CIFAR)
            # what each automatic choice of this run rests on (vssl_fast.auto_settings)
            "auto_evidence": {k: auto_settings.EVIDENCE[k] for k, v in
                              (("train.compile", cfg.train.compile), ("train.graph", cfg.train.graph)) if v == "auto"},
        }
        if self.dist.is_main:
            rows = []
            if (self.run_dir / "metrics.jsonl").exists():
                rows = [json.loads(x) for x in (self.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
            ips = [r["img_per_s"] for r in rows if r.get("kind") == "train" and "img_per_s" in r]
            results["img_per_s"] = sum(ips) / len(ips) if ips else None
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))
            table = ["| metric | value |", "|---|---|"] + [
                f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()
                if not isinstance(v, dict)]
            (self.run_dir / "summary.md").write_text("\n".join(table) + "\n")
            if cfg.log.plots:
                self.monitor.plots()
            self.log.info("results: %s", json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}))
            print("\n".join(table))
        self.monitor.close()
        return results

    def close(self, abort: bool = False):
        """Signals restored, the process group left (``abort``: a collective is stuck, see ``cleanup``),
        the run dir released."""
        faults.restore_signals()
        try:
            cleanup(abort)
        finally:
            self.claim.release()  # the last thing: another start may own the run dir from here on
