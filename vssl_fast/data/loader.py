"""Device-resident two-view loader for array datasets (CIFAR): the whole uint8 set lives on the device.

Order and sharding (``epoch_indices``, shared with the image-folder loaders): each epoch one
permutation of the training set from (seed, epoch), the same on every rank; the global batch
``world * batch_size`` is cut into per-rank slices (drop-last), so ranks read disjoint shards and
every rank has exactly ``steps_per_epoch`` batches in every epoch. Augmentations draw from a generator seeded by
(seed, rank, epoch, step) — per chunk of ``chunk`` steps augmented in one call, seeded by the
chunk's first step — so batches are deterministic, differ across ranks, and a run resumed
mid-epoch (mid-chunk too) from ``state_dict()`` (epoch, step) produces exactly the batches it
would have. ``chunk`` is part of that stream: resume with the same value.
"""

from __future__ import annotations

import torch

from vssl_fast.config import ConfigError
from vssl_fast.data.augment import ViewSpec, augment, normalize

__all__ = ["DeviceTwoViewLoader", "DeviceEvalLoader", "batch_seed", "epoch_indices", "full_batches"]


def full_batches(n: int, world: int, batch_size: int, what: str) -> int:
    """Global batches of ``world x batch_size`` in an epoch of ``n`` samples (drop-last); a config error
    naming ``train.batch_size`` when not even one fits (the setting is wrong, not the data)."""
    steps = n // (world * batch_size)
    if steps < 1:
        raise ConfigError(f"train.batch_size: {what} cannot fill one global batch of {world} x {batch_size} "
                          f"(world x train.batch_size={batch_size}); lower train.batch_size or give the run more data")
    return steps


def batch_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """A 63-bit seed mixing the four counters (splitmix64-style), stable across runs and machines."""
    x = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + epoch * 0x94D049BB133111EB + step * 0x2545F4914F6CDD1D)
    x &= (1 << 64) - 1
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 29
    return x & ((1 << 63) - 1)


def epoch_indices(n: int, seed: int, epoch: int, steps: int, world: int, batch_size: int, rank: int) -> torch.Tensor:
    """This rank's sample indices for one epoch, [steps, batch_size] (int64, CPU).

    One permutation of ``range(n)`` per (seed, epoch), the same on every rank; its first
    ``steps * world * batch_size`` entries are cut into global batches and each global batch into
    ``world`` slices. A pure function of its arguments, so any (epoch, step) can be resumed directly.
    """
    g = torch.Generator().manual_seed(batch_seed(seed, 0, epoch, -1))
    perm = torch.randperm(n, generator=g)
    usable = steps * world * batch_size
    if usable > n:
        raise ValueError(f"{steps} steps of {world} x {batch_size} need {usable} samples, have {n}")
    return perm[:usable].view(steps, world, batch_size)[:, rank].contiguous()


class DeviceTwoViewLoader:
    """Yields (view1, view2, labels) batches of ``batch_size`` per rank, both views augmented on the device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, specs: tuple[ViewSpec, ViewSpec],
                 seed: int, rank: int = 0, world: int = 1, channels_last: bool = False, out_dtype=torch.float32,
                 chunk: int = 1):
        if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images, self.labels = images, labels
        self.batch_size, self.specs = batch_size, specs
        self.seed, self.rank, self.world = seed, rank, world
        self.channels_last, self.out_dtype = channels_last, out_dtype
        self.steps_per_epoch = full_batches(images.shape[0], world, batch_size, f"{images.shape[0]} training images")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 (steps augmented per call), got {chunk}")
        self.chunk = chunk
        self.epoch, self.step = 0, 0
        self._perm_epoch, self._perm = None, None
        self._chunk_key, self._chunk_views = None, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "world": self.world, "chunk": self.chunk}

    def load_state_dict(self, st: dict) -> None:
        if st.get("world", self.world) != self.world or st.get("seed", self.seed) != self.seed:
            raise ValueError(f"loader state was saved with world={st.get('world')} seed={st.get('seed')}, "
                             f"resuming with world={self.world} seed={self.seed}")
        if st.get("chunk", 1) != self.chunk:
            raise ValueError(f"loader state was saved with data.aug_chunk={st.get('chunk', 1)}, resuming with "
                             f"{self.chunk}: the augmentation stream depends on it; resume with the same value")
        self.epoch, self.step = int(st["epoch"]), int(st["step"])

    def _indices(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            self._perm = epoch_indices(self.images.shape[0], self.seed, epoch, self.steps_per_epoch, self.world,
                                       self.batch_size, self.rank).to(self.images.device)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, epoch: int, step: int):
        """Batch ``step`` of ``epoch``: a slice of its chunk's views (the chunk is augmented once)."""
        c, k = divmod(step, self.chunk)
        if self._chunk_key != (epoch, c):
            self._chunk_views = self._augment_chunk(epoch, c)
            self._chunk_key = (epoch, c)
        b = self.batch_size
        v1, v2, y = self._chunk_views
        return v1[k * b:(k + 1) * b], v2[k * b:(k + 1) * b], y[k * b:(k + 1) * b]

    def _augment_chunk(self, epoch: int, c: int):
        """Steps ``[c K, (c + 1) K)`` of the epoch in one batched call per view (``K = chunk``).

        At CIFAR size the augmentation's cost is the number of small kernels it issues, not the
        pixels: one call for K steps issues the same kernels as one call for one step. The draws
        come from a generator seeded by (seed, rank, epoch, first step of the chunk), so with
        ``chunk=1`` every batch is what it always was, and any (epoch, step) is a pure function of
        the chunk size: a run resumed in the middle of a chunk regenerates that chunk.
        """
        first = c * self.chunk
        idx = self._indices(epoch)[first:first + self.chunk].reshape(-1)
        x = self.images.index_select(0, idx)
        g = torch.Generator(device=self.images.device).manual_seed(batch_seed(self.seed, self.rank, epoch, first))
        views = [augment(x, spec, g).to(self.out_dtype) for spec in self.specs]
        if self.channels_last:  # dim 0 stays outermost: every batch slice is channels-last contiguous
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views[0], views[1], self.labels.index_select(0, idx)

    def __iter__(self):
        """The rest of the current epoch; afterwards the loader points at the next epoch's start."""
        while self.step < self.steps_per_epoch:
            out = self.batch(self.epoch, self.step)
            self.step += 1
            yield out
        self.epoch += 1
        self.step = 0

    def __len__(self) -> int:
        return self.steps_per_epoch


class DeviceEvalLoader:
    """Validation / feature-extraction batches: normalisation only (solo-learn's CIFAR val transform)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean, std, rank=0, world=1,
                 channels_last=False, out_dtype=torch.float32):
        n = images.shape[0]
        self.idx = torch.arange(rank, n, world)  # every rank a disjoint strided shard; the union is the whole set
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.mean, self.std, self.channels_last, self.out_dtype = mean, std, channels_last, out_dtype

    def __iter__(self):
        for s in range(0, len(self.idx), self.batch_size):
            idx = self.idx[s:s + self.batch_size].to(self.images.device)
            x = normalize(self.images.index_select(0, idx).float().div_(255.0), self.mean, self.std).to(self.out_dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels.index_select(0, idx)

    def __len__(self):
        return (len(self.idx) + self.batch_size - 1) // self.batch_size
