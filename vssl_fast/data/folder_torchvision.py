"""The torchvision training loaders for class-folder trees (no DALI, or ``data.loader=torchvision``).

With a GPU (``NvjpegTwoViewLoader``), workers read the file bytes and ``torchvision.io.decode_jpeg``
decodes each batch with nvJPEG on the GPU, where both views are cropped and augmented
(``augment_list``); without one (``TorchvisionTwoViewLoader``), worker processes produce both views
with the PIL transforms (PIL GaussianBlur and Solarize, as solo-learn's torchvision pipeline),
torch's and Python's generators seeded per sample. A file that passes the check but fails to decode
is skipped where it is met (the next file takes its place), counted in the main process, logged once.
"""

from __future__ import annotations

import random

import torch

from vssl_fast.data.augment import ViewSpec
from vssl_fast.data.folder_files import BadDataError, BadFiles, FolderSamples, PositionalLoader, SkippingImageFolder, samples_of

__all__ = ["TwoViewTransform", "TorchvisionTwoViewLoader", "NvjpegTwoViewLoader"]


class TwoViewTransform:
    """solo-learn's torchvision pipeline for a ViewSpec pair (PIL ops), returning two tensors."""

    def __init__(self, specs):
        from PIL import ImageFilter, ImageOps
        from torchvision import transforms as T

        def blur(img, s):
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*s.blur_sigma)))

        def make(s: ViewSpec):
            return T.Compose([
                T.RandomResizedCrop(s.crop_size, scale=s.scale, ratio=s.ratio, interpolation=T.InterpolationMode.BICUBIC),
                T.RandomApply([T.ColorJitter(s.brightness, s.contrast, s.saturation, s.hue)], p=s.jitter_p),
                T.RandomGrayscale(p=s.gray_p),
                T.RandomApply([T.Lambda(lambda im, s=s: blur(im, s))], p=s.blur_p),
                T.RandomApply([T.Lambda(ImageOps.solarize)], p=s.solarize_p),
                T.RandomHorizontalFlip(p=s.flip_p),
                T.ToTensor(),
                T.Normalize(s.mean, s.std),
            ])

        self.t1, self.t2 = make(specs[0]), make(specs[1])

    def __call__(self, img):
        return self.t1(img), self.t2(img)


class _EpochViews(torch.utils.data.Dataset):
    """The rest of one epoch for one rank: item j is sample ``idx[j]`` at position ``start + j``, its
    augmentation seeded with (seed, rank, epoch, position), whichever worker loads it. The last
    element lists the files skipped on the way ("path\\twhy" lines) for the main process to count."""

    def __init__(self, ds: SkippingImageFolder, idx: list[int], seed: int, rank: int, epoch: int, start: int):
        self.ds, self.idx, self.seed, self.rank, self.epoch, self.start = ds, idx, seed, rank, epoch, start

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, j):
        from vssl_fast.data.loader import batch_seed

        (v1, v2), y, skipped = self.ds.load(self.idx[j], batch_seed(self.seed, self.rank, self.epoch, self.start + j))
        return v1, v2, y, "\n".join(f"{p}\t{why}" for p, why in skipped)


class TorchvisionTwoViewLoader(PositionalLoader):
    """Both views made by PIL transforms in DataLoader workers (the CPU path without DALI).

    Order: ``epoch_indices``; augmentation: torch's and Python's generators seeded per sample with
    (seed, rank, epoch, position), so a resume at any step gives the same views and the worker
    count does not change them."""

    def __init__(self, train_dir, specs, batch_size, seed, rank, world, device, workers, channels_last, out_dtype, *,
                 bad: BadFiles | None = None, cache_dir: str | None = "~/.cache/vssl_fast"):
        self.bad = bad if bad is not None else BadFiles()
        self._init_position(samples_of(train_dir, cache_dir, self.bad), batch_size, seed, rank, world)
        self.ds = SkippingImageFolder(self.samples.root, TwoViewTransform(specs), samples=self.samples)
        self.device, self.workers, self.channels_last, self.out_dtype = device, workers, channels_last, out_dtype

    def _note(self, skipped) -> None:
        for lines in skipped:
            for line in filter(None, lines.split("\n")):
                path, why = line.split("\t", 1)
                self.bad.add("train", path, why)

    def __iter__(self):
        """The rest of the current epoch; afterwards the loader points at the next epoch's start."""
        idx = self._order(self.epoch)[self.step:].reshape(-1).tolist()
        views = _EpochViews(self.ds, idx, self.seed, self.rank, self.epoch, self.step * self.batch_size)
        dl = torch.utils.data.DataLoader(views, batch_size=self.batch_size, num_workers=self.workers, drop_last=True,
                                         pin_memory=self.device.type == "cuda",
                                         generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
        for v1, v2, y, skipped in dl:
            self._note(skipped)
            self.step += 1
            yield self._finish_views(v1, v2, y)
        self.epoch, self.step = self.epoch + 1, 0


class _BytesFolder(torch.utils.data.Dataset):
    """(encoded bytes, label, path) of samples ``idx``; decoding happens batched on the device."""

    def __init__(self, samples: FolderSamples, idx: list[int]):
        self.samples, self.idx = samples, idx

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, j):
        i = self.idx[j]
        path = self.samples.paths[i]
        with open(path, "rb") as f:
            return f.read(), int(self.samples.labels[i]), path  # plain bytes: pickled back, no shared-memory fds


def _collate_bytes(batch):
    return [b[0] for b in batch], torch.tensor([b[1] for b in batch]), [b[2] for b in batch]


class NvjpegTwoViewLoader(PositionalLoader):
    """torchvision path with a GPU: workers read file bytes, ``decode_jpeg(device='cuda')`` decodes the
    batch with nvJPEG, and both views are cropped and augmented on the GPU (``augment_list``) with a
    generator seeded by (seed, rank, epoch, step). Files that fail to decode are skipped and counted
    (the batch is smaller); a batch that is all bad is an error."""

    def __init__(self, train_dir, specs, batch_size, seed, rank, world, device, workers, channels_last, out_dtype, *,
                 bad: BadFiles | None = None, cache_dir: str | None = "~/.cache/vssl_fast"):
        self.bad = bad if bad is not None else BadFiles()
        self._init_position(samples_of(train_dir, cache_dir, self.bad), batch_size, seed, rank, world)
        self.specs, self.device, self.workers, self.channels_last, self.out_dtype = (specs, device, workers,
                                                                                    channels_last, out_dtype)

    def _decode(self, raw, paths):
        from torchvision.io import ImageReadMode, decode_jpeg

        datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in raw]
        try:
            return decode_jpeg(datas, device=self.device, mode=ImageReadMode.RGB), list(range(len(datas)))
        except RuntimeError:  # find the bad ones one by one
            imgs, keep = [], []
            for k, (d, p) in enumerate(zip(datas, paths)):
                try:
                    imgs.append(decode_jpeg(d, device=self.device, mode=ImageReadMode.RGB))
                    keep.append(k)
                except RuntimeError as e:
                    self.bad.add("train", p, f"undecodable: {e}")
            if not imgs:
                raise BadDataError(f"a whole batch of {len(datas)} images failed to decode, e.g. {paths[:3]}; run "
                                   f"`python -m vssl_fast.data scan {self.samples.root}`") from None
            return imgs, keep

    def __iter__(self):
        """The rest of the current epoch; afterwards the loader points at the next epoch's start."""
        from vssl_fast.data.augment import augment_list
        from vssl_fast.data.loader import batch_seed

        idx = self._order(self.epoch)[self.step:].reshape(-1).tolist()
        dl = torch.utils.data.DataLoader(_BytesFolder(self.samples, idx), batch_size=self.batch_size,
                                         num_workers=self.workers, drop_last=True, collate_fn=_collate_bytes,
                                         generator=torch.Generator().manual_seed(0))
        for datas, y, paths in dl:
            imgs, keep = self._decode(datas, paths)
            g = torch.Generator(device=self.device).manual_seed(batch_seed(self.seed, self.rank, self.epoch, self.step))
            v1, v2 = (augment_list(imgs, s, g).to(self.out_dtype) for s in self.specs)
            if self.channels_last:
                v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
            self.step += 1
            yield v1, v2, y[keep].to(self.device, non_blocking=True)
        self.epoch, self.step = self.epoch + 1, 0
