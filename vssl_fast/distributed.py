"""Process-group setup for one process, torchrun on one node, or torchrun across nodes.

NCCL on GPUs, gloo on CPUs, with an explicit timeout so a hang becomes an error. A second, gloo
group carries the per-step "stop requested?" vote on CPU tensors, so agreeing on SIGTERM never
synchronises the GPU stream.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "resolve_device", "cleanup"]


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    vote_group: object = None
    async_error_handling: str | None = None  # TORCH_NCCL_ASYNC_ERROR_HANDLING as the NCCL group was made with

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def any_true(self, flag: bool) -> bool:
        """True on every rank if any rank's flag is set (a CPU collective; no GPU sync)."""
        return bool(self.max_int(1 if flag else 0)) if self.enabled else flag

    def max_int(self, value: int) -> int:
        """The largest of the ranks' ``value`` (an int32), on every rank (a CPU collective; no GPU sync)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.vote_group)
        return int(t.item())

    def barrier(self):
        if self.enabled:
            dist.barrier(group=self.vote_group)


def resolve_device(device) -> torch.device:
    """The device with its index: ``cuda`` without one means the current CUDA device (``torch.cuda.current_device``),
    as PyTorch itself places it; any other device comes back as it is. Call it where devices are made, so that
    code reading ``device.index`` (DALI's ``device_id``: None builds a CPU-only pipeline) sees the real one."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


ASYNC_ERRORS = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


def init_distributed(timeout_s: int, force_cpu: bool = False, capture: bool = False) -> DistInfo:
    """The process group of this process (NCCL on GPUs, gloo on CPUs, with an explicit timeout).

    ``capture``: the training step is to be captured as a CUDA graph under DDP, which torch's CUDA
    graph notes allow only with NCCL's asynchronous error handling off, set before the group is
    made: ``TORCH_NCCL_ASYNC_ERROR_HANDLING=0`` when it is unset (a value the user set is kept and
    reported, and the trainer then leaves the step uncaptured)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not force_cpu
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    info = DistInfo(rank, world, local, device)
    if world > 1:
        if use_cuda and capture:
            os.environ.setdefault(ASYNC_ERRORS, "0")
        info.async_error_handling = os.environ.get(ASYNC_ERRORS) if use_cuda else None
        timeout = datetime.timedelta(seconds=timeout_s)
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": device} if use_cuda else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
        info.vote_group = dist.new_group(backend="gloo", timeout=timeout) if use_cuda else dist.group.WORLD
    return info


def cleanup(abort: bool = False) -> None:
    """Leave the process group. ``abort`` (a collective is stuck or a peer lost): abort it where the backend
    can (NCCL), else leave it for the process's exit; ``destroy_process_group`` would wait for the stuck
    collective (torch >= 2.6) and hang before the run's error line."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if abort:
        try:
            dist.distributed_c10d._abort_process_group()
        except Exception:  # noqa: BLE001 - gloo cannot abort; the process exits next
            pass
        return
    dist.destroy_process_group()
