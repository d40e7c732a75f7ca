"""SyncBatchNorm for the recipe's multi-process runs, on GPUs (NCCL) and on CPUs (gloo).

``model.sync_batchnorm=auto`` (the default) converts every BatchNorm to a synchronised one when
the run has more than one process, as solo-learn's recipe does (METHOD.md §3.1
``sync_batchnorm: True``): with 8 GPUs x 32 images, BatchNorm then normalises over the 256
images of the global batch instead of 32 per rank.

On CUDA the layers are ``torch.nn.SyncBatchNorm``. PyTorch's layer has no CPU kernels and DDP
refuses it in a CPU module, so on the CPU the layers are ``GlooSyncBatchNorm``: the same global
statistics from one differentiable all-reduce per layer (each rank's count, mean and sum of
squared deviations, combined as Chan et al.: no E[x^2] - E[x]^2 cancellation), the same running-statistics
update, and the parameters and buffers of ``nn.BatchNorm*d``, so checkpoints load into plain
networks. This is what lets CPU multi-process runs (and the gloo tests) use the recipe's BatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GlooSyncBatchNorm", "convert_sync_batchnorm", "use_sync_batchnorm"]


def use_sync_batchnorm(setting, world: int) -> bool:
    """``model.sync_batchnorm`` (auto | true | false, or a bool) resolved for a run of ``world`` processes.

    With one process there is nothing to synchronise, so every setting gives plain BatchNorm.
    """
    s = {True: "true", False: "false"}.get(setting, str(setting).lower())
    if s not in ("auto", "true", "false"):
        raise ValueError(f"model.sync_batchnorm: invalid value {setting!r}; choose one of ['auto', 'true', 'false']")
    return world > 1 and s != "false"


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class GlooSyncBatchNorm(_BatchNorm):
    """BatchNorm over the whole global batch for CPU tensors (gloo); one process or eval mode: plain BatchNorm."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"GlooSyncBatchNorm: expected an input of at least 2 dimensions, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if not self.training or group is None or dist.get_world_size(group) == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        C, xf = x.shape[1], x.float()
        # this rank's (count, mean, sum of squared deviations) in its row of a [world, 1 + 2C] table; one
        # all-reduce gathers every row (and sums the rows' gradients in backward); Chan et al. combine them
        mean_r = xf.mean(dims)
        row = torch.cat([mean_r.new_tensor([float(x.numel() // C)]), mean_r, (xf - mean_r.view(shape)).square().sum(dims)])
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        table = _AllReduceSum.apply(torch.stack([row if r == rank else torch.zeros_like(row) for r in range(world)]),
                                    group)
        n_r, means, m2s = table[:, :1].detach(), table[:, 1:1 + C], table[:, 1 + C:]
        count = n_r.sum()
        mean = (n_r * means).sum(0) / count
        var = (m2s.sum(0) + (n_r * (means - mean).square()).sum(0)) / count  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * (count / (count - 1).clamp(min=1))  # running_var is unbiased, as BN's
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def _to_gloo(module: torch.nn.Module, process_group) -> torch.nn.Module:
    out = module
    if isinstance(module, _BatchNorm):
        out = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, process_group)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_gloo(child, process_group))
    return out


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device, process_group=None) -> torch.nn.Module:
    """Every ``nn.BatchNorm*d`` in ``module`` synchronised across ranks, weights and buffers kept:
    ``torch.nn.SyncBatchNorm`` for a CUDA run, ``GlooSyncBatchNorm`` for a CPU one."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _to_gloo(module, process_group)

