"""SyncBatchNorm for the recipe's multi-process runs, on GPUs (NCCL) and CPUs (gloo), with no host sync.

``model.sync_batchnorm=auto`` (the default) converts every BatchNorm to a synchronised one when
the run has more than one process, as solo-learn's recipe does (METHOD.md §3.1
``sync_batchnorm: True``): with 8 GPUs x 32 images, BatchNorm then normalises over the 256
images of the global batch instead of 32 per rank.

Why not ``torch.nn.SyncBatchNorm``: outside a CUDA-graph capture its forward drops empty ranks'
statistics with a boolean mask (``count_all[mask]``), a device-to-host synchronisation on every
call (pytorch/pytorch issue 78549): ~90 blocking syncs per training step of the product's model,
each leaving the GPU idle while the host issues the next layer's kernels one by one. Our loaders
never yield an empty batch, so the mask buys nothing. ``SyncBatchNorm`` here is the same
computation without it, in one autograd function (``_SyncBatchNormFn``):

forward:  per-rank (mean, invstd) and count -> one all-gather of [mean, invstd, count] per layer ->
          global mean/invstd and the running statistics (unbiased variance over the global count)
          -> normalise;
backward: per-rank sum(dy) and sum(dy (x - mean)) -> one all-reduce -> the input gradient;
          weight and bias gradients stay local (DDP all-reduces them with the others).

The per-channel work goes through ``_Ops``: on CUDA torch's own fused kernels (the ones
``torch.nn.SyncBatchNorm`` uses: ``batch_norm_stats``, ``batch_norm_gather_stats_with_counts``,
``batch_norm_elemt``, ``batch_norm_backward_reduce``, ``batch_norm_backward_elemt``; CUDA only);
on the CPU a plain-PyTorch twin of each with the same inputs, outputs and formulas, so the gloo
tests run this module's exact autograd function and collectives. The layers keep the parameters
and buffers of ``nn.BatchNorm*d`` (checkpoints load into plain networks), run plain BatchNorm in
eval mode or with one process, and make no host read: the count is made on the device, momentum
is a Python float (``momentum=None``, a cumulative average, would need a host read per step and
is refused).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm", "GlooSyncBatchNorm", "convert_sync_batchnorm", "use_sync_batchnorm", "CpuOps", "CudaOps"]


def use_sync_batchnorm(setting, world: int) -> bool:
    """``model.sync_batchnorm`` (auto | true | false, or a bool) resolved for a run of ``world`` processes.

    With one process there is nothing to synchronise, so every setting gives plain BatchNorm.
    """
    s = {True: "true", False: "false"}.get(setting, str(setting).lower())
    if s not in ("auto", "true", "false"):
        raise ValueError(f"model.sync_batchnorm: invalid value {setting!r}; choose one of ['auto', 'true', 'false']")
    return world > 1 and s != "false"


def _dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _chan(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view([1, -1] + [1] * (x.dim() - 2))


class CudaOps:
    """torch's fused CUDA kernels for SyncBatchNorm (what torch.nn.SyncBatchNorm calls)."""

    stats = staticmethod(torch.batch_norm_stats)
    gather_stats_with_counts = staticmethod(torch.batch_norm_gather_stats_with_counts)
    elemt = staticmethod(torch.batch_norm_elemt)
    backward_reduce = staticmethod(torch.batch_norm_backward_reduce)
    backward_elemt = staticmethod(torch.batch_norm_backward_elemt)


class CpuOps:
    """Plain-PyTorch twins of ``CudaOps`` (same signatures, outputs and formulas, fp32 accumulation)."""

    @staticmethod
    def stats(x, eps):
        xf = x.float()
        mean = xf.mean(_dims(x))
        var = (xf - _chan(mean, x)).square().mean(_dims(x))  # biased, as batch_norm_stats
        return mean, torch.rsqrt(var + eps)

    @staticmethod
    def gather_stats_with_counts(x, mean_all, invstd_all, running_mean, running_var, momentum, eps, counts):
        """Chan et al.'s combination of the ranks' (count, mean, variance); running statistics updated
        in place with the unbiased variance over the global count (as the CUDA kernel)."""
        n = counts.to(torch.float32).view(-1, 1)
        total = n.sum()
        mean = (n * mean_all).sum(0) / total
        var_r = invstd_all.reciprocal().square() - eps
        var = ((n * var_r).sum(0) + (n * (mean_all - mean).square()).sum(0)) / total
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = var * (total / (total - 1).clamp(min=1))
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        return mean, torch.rsqrt(var + eps)

    @staticmethod
    def elemt(x, weight, bias, mean, invstd, eps):
        y = (x.float() - _chan(mean, x)) * _chan(invstd, x)
        if weight is not None:
            y = y * _chan(weight.float(), x)
        if bias is not None:
            y = y + _chan(bias.float(), x)
        return y.to(x.dtype)

    @staticmethod
    def backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g):
        dyf = dy.float()
        sum_dy = dyf.sum(_dims(x))
        sum_dy_xmu = (dyf * (x.float() - _chan(mean, x))).sum(_dims(x))
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if weight_g and weight is not None else None
        grad_bias = sum_dy.to(weight.dtype if weight is not None else dy.dtype) if bias_g else None
        return sum_dy, sum_dy_xmu, grad_weight, grad_bias

    @staticmethod
    def backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        total = count.to(torch.float32).sum()
        mean_dy, mean_dy_xmu = sum_dy / total, sum_dy_xmu / total
        xmu = x.float() - _chan(mean, x)
        g = dy.float() - _chan(mean_dy, x) - xmu * _chan(invstd.square() * mean_dy_xmu, x)
        scale = invstd * weight.float() if weight is not None else invstd
        return (g * _chan(scale, x)).to(dy.dtype)


def _ops(device: torch.device):
    return CudaOps if device.type == "cuda" else CpuOps


def _layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last stays channels-last (the fused kernels take both); anything else contiguous."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _all_gather(t: torch.Tensor, group, world: int) -> torch.Tensor:
    """[world, n] from each rank's [n] (NCCL: one all_gather_into_tensor; gloo: the list form)."""
    if dist.get_backend(group) != "gloo":  # as torch's SyncBatchNorm: every backend but gloo has the flat form
        out = torch.empty(world * t.numel(), dtype=t.dtype, device=t.device)
        dist.all_gather_into_tensor(out, t, group=group)
        return out.view(world, t.numel())
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts)


class _SyncBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group, world):
        ops = _ops(x.device)
        x = _layout(x)
        C = x.shape[1]
        mean, invstd = ops.stats(x, eps)
        count = torch.full((1,), x.numel() // C, dtype=mean.dtype, device=mean.device)  # a fill, not a copy
        table = _all_gather(torch.cat([mean, invstd, count]), group, world)  # [world, 2C + 1]
        mean_all, invstd_all, count_all = table[:, :C], table[:, C:2 * C], table[:, 2 * C]
        counts = count_all if running_mean is None else count_all.to(running_mean.dtype)
        mean, invstd = ops.gather_stats_with_counts(x, mean_all, invstd_all, running_mean, running_var, momentum, eps,
                                                    counts)
        ctx.save_for_backward(x, weight, mean, invstd, count_all.to(torch.int32))
        ctx.group = group
        return ops.elemt(x, weight, bias, mean, invstd, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, count = ctx.saved_tensors
        ops = _ops(x.device)
        dy = _layout(dy)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        sum_dy, sum_dy_xmu, grad_w, grad_b = ops.backward_reduce(dy, x, mean, invstd, weight, need_x, need_w, need_b)
        grad_x = None
        if need_x:
            C = sum_dy.shape[0]
            both = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(both, group=ctx.group)
            w = weight.to(mean.dtype) if weight is not None and weight.dtype != mean.dtype else weight
            grad_x = ops.backward_elemt(dy, x, mean, invstd, w, both[:C], both[C:], count)
        return (grad_x, grad_w if need_w else None, grad_b if need_b else None) + (None,) * 6


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the whole global batch (CUDA/NCCL and CPU/gloo alike), no host sync; one
    process or eval mode: plain BatchNorm. Parameters and buffers are those of ``nn.BatchNorm*d``."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None):
        if momentum is None:
            raise ValueError("SyncBatchNorm: momentum=None (a cumulative average) reads the batch count on the host "
                             "every step; give a float momentum")
        if not track_running_stats:
            # batch_norm_gather_stats_with_counts reads the counts as running_mean's dtype, else the input's:
            # with no running statistics and bf16 inputs the fp32 counts fail its dtype check (torch's layer too)
            raise ValueError("SyncBatchNorm: track_running_stats=False is not supported (the fused CUDA kernel "
                             "then reads the counts as the input's dtype)")
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected an input of at least 2 dimensions, got {x.dim()}D")

    def _group(self):
        if self.process_group is not None:
            return self.process_group
        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self._group()
        if not self.training or group is None or dist.get_world_size(group) == 1:
            return super().forward(x)
        self._check_input_dim(x)
        if x.numel() == 0:
            raise ValueError("SyncBatchNorm: an empty batch on this rank; the product's loaders always yield full batches")
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return _SyncBatchNormFn.apply(x, self.weight, self.bias, *running, self.eps, float(self.momentum), group,
                                      dist.get_world_size(group))


GlooSyncBatchNorm = SyncBatchNorm  # the name of the CPU-only layer before it served CUDA ranks too


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device | None = None, process_group=None):
    """Every ``nn.BatchNorm*d`` in ``module`` as ``SyncBatchNorm``, weights and buffers kept (the same
    tensors), on any device. ``device`` is accepted for the callers that name it; the layer is the same."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                            process_group)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device, process_group))
    return out
