"""The torchvision training loaders for class-folder trees (no DALI, or ``data.loader=torchvision``).

With a GPU (``NvjpegTwoViewLoader``), workers read the file bytes and ``torchvision.io.decode_jpeg``
decodes each batch with nvJPEG on the GPU (on a stream of its own, ordered against training; CMYK and
non-JPEG files decoded by PIL on the CPU), where both views are cropped and augmented batched
(``augment.augment_images``), every batch full (a file nothing decodes is replaced, counted). Without
one (``TorchvisionTwoViewLoader``), worker processes produce both views with the PIL transforms (PIL
GaussianBlur and Solarize, as solo-learn's torchvision pipeline), torch's and Python's generators
seeded per sample. A file that passes the check but fails to decode is skipped where it is met (the
next file takes its place), counted in the main process, logged once.
"""

from __future__ import annotations

import random

import numpy as np
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
    """(encoded bytes, sample index) of samples ``idx``; decoding happens batched on the device."""

    def __init__(self, samples: FolderSamples, idx: list[int]):
        self.samples, self.idx = samples, idx

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, j):
        i = self.idx[j]
        with open(self.samples.paths[i], "rb") as f:
            return f.read(), i  # plain bytes: pickled back, no shared-memory fds


def _collate_bytes(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(SOF marker, sample precision in bits, colour components) of a JPEG's frame header, or None when the
    bytes are no JPEG (a PNG named .JPEG, say) or the header cannot be found."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF:
            return (marker, data[i + 4], data[i + 9]) if i + 9 < n else None
        if marker == 0xDA:  # scan data before any frame header
            return None
        i += 2 + length
    return None


def jpeg_components(data: bytes) -> int | None:
    """The number of colour components a JPEG's frame header declares (1 grey, 3 YCbCr, 4 CMYK/YCCK), or None."""
    frame = jpeg_frame(data)
    return frame[2] if frame else None


# what nvJPEG decodes: Huffman-coded baseline, extended sequential and progressive frames of 8-bit samples;
# lossless (SOF3, SOF7, SOF11, SOF15), arithmetic-coded (SOF9-15) and 12-bit JPEGs go to the CPU up front
# rather than failing a batched GPU decode (which retries every file of the batch one by one)
_NVJPEG_SOF = {0xC0, 0xC1, 0xC2}


def nvjpeg_decodable(data: bytes) -> bool:
    frame = jpeg_frame(data)
    return frame is not None and frame[0] in _NVJPEG_SOF and frame[1] == 8 and frame[2] in (1, 3)


def decode_on_cpu(data: bytes) -> torch.Tensor:
    """Any image PIL reads (CMYK JPEGs, PNGs named .JPEG, ...) as uint8 RGB [3, H, W], as the PIL path sees it."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


class NvjpegTwoViewLoader(PositionalLoader):
    """torchvision path with a GPU: workers read file bytes, ``decode_jpeg(device='cuda')`` decodes the
    batch with nvJPEG, and both views are cropped and augmented on the GPU in a bounded number of launches
    (``augment.augment_images``: crops batched per size group) from parameters seeded by (seed, rank, epoch,
    step): crop boxes on the host from the decoded sizes, the rest from a device generator.

    Safe against training memory: nvJPEG's hardware engine does not keep the order of the stream it is given
    (pytorch/vision PR 9606, torchcodec PR 1634), so it may write into blocks the caching allocator hands out
    while queued kernels still read them. Here decoding runs on a stream of its own, whose pool only ever
    holds decoded images; each decoded image is marked as used by the training stream (``record_stream``),
    so its block is handed out again only after the training stream's work on it has completed, and the host
    waits for the decode (not for training) before the images are used.

    Every batch is full: files nvJPEG cannot decode (CMYK, a PNG named .JPEG) are decoded on the CPU by PIL;
    a file nothing decodes is counted as bad (logged once) and replaced by the next readable sample of the
    tree, deterministically, with its label."""

    def __init__(self, train_dir, specs, batch_size, seed, rank, world, device, workers, channels_last, out_dtype, *,
                 bad: BadFiles | None = None, cache_dir: str | None = "~/.cache/vssl_fast"):
        from vssl_fast.distributed import resolve_device

        self.bad = bad if bad is not None else BadFiles()
        self._init_position(samples_of(train_dir, cache_dir, self.bad), batch_size, seed, rank, world)
        self.specs, self.workers, self.channels_last, self.out_dtype = specs, workers, channels_last, out_dtype
        self.device = resolve_device(device)
        self._stream = None  # the decode stream, made on the first CUDA batch

    def describe(self) -> str:
        where = f"nvJPEG decode on {self.device}" if self.device.type == "cuda" else "decode_jpeg on the CPU"
        return f"torchvision {where}, batched augmentation on {self.device}, {self.workers} byte-reading workers"

    def _decode_batch(self, datas: list[torch.Tensor]) -> list[torch.Tensor]:
        """decode_jpeg on the device; on CUDA ordered against the training stream (see the class)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.device.type != "cuda":
            return list(decode_jpeg(datas, device=self.device, mode=ImageReadMode.RGB))
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            out = list(decode_jpeg(datas, device=self.device, mode=ImageReadMode.RGB))
        self._stream.synchronize()  # the decode has finished writing: nvJPEG keeps no stream order
        for img in out:
            img.record_stream(main)  # its block returns to the decode stream's pool only after main used it
        return out

    def _decode_one(self, raw: bytes) -> torch.Tensor:
        """One file: nvJPEG when it can (a JPEG of 1 or 3 components), else, or when it fails, PIL on the CPU."""
        if nvjpeg_decodable(raw):
            try:
                return self._decode_batch([torch.frombuffer(bytearray(raw), dtype=torch.uint8)])[0]
            except RuntimeError:
                pass
        return decode_on_cpu(raw).to(self.device, non_blocking=True)

    def _replacement(self, i: int) -> tuple[torch.Tensor, int]:
        """The next sample after ``i`` in the tree's order that decodes (image, sample index); files that fail on
        the way are counted as bad."""
        n = len(self.samples)
        for k in range(1, n):
            j = (i + k) % n
            path = self.samples.paths[j]
            if path in self.bad:
                continue
            try:
                with open(path, "rb") as f:
                    return self._decode_one_or_fail(f.read()), j
            except Exception as e:  # noqa: BLE001 - a bad file: count it, take the next
                self.bad.add("train", path, f"undecodable: {type(e).__name__}: {e}")
        raise BadDataError(f"no image under {self.samples.root} decodes; run `python -m vssl_fast.data scan "
                           f"{self.samples.root}`")

    def _decode_one_or_fail(self, raw: bytes) -> torch.Tensor:
        img = self._decode_one(raw)
        if img.dim() != 3 or img.shape[0] != 3 or min(img.shape[1:]) < 1:
            raise ValueError(f"decoded to shape {tuple(img.shape)}")
        return img

    def _decode(self, raw: list[bytes], idx: list[int]) -> tuple[list[torch.Tensor], list[int]]:
        """The batch's images, always as many as files, and the sample each came from (a bad file's replacement)."""
        imgs: list = [None] * len(raw)
        gpu = [k for k, b in enumerate(raw) if nvjpeg_decodable(b)]  # what nvJPEG decodes
        if gpu:
            try:
                for k, img in zip(gpu, self._decode_batch([torch.frombuffer(bytearray(raw[k]), dtype=torch.uint8)
                                                           for k in gpu])):
                    imgs[k] = img
            except RuntimeError:  # one bad file fails the batched call: one by one below
                pass
        src = list(idx)
        for k, img in enumerate(imgs):
            if img is not None:
                continue
            try:
                imgs[k] = self._decode_one_or_fail(raw[k])
            except Exception as e:  # noqa: BLE001 - a bad file: counted, replaced
                self.bad.add("train", self.samples.paths[idx[k]], f"undecodable: {type(e).__name__}: {e}")
                imgs[k], src[k] = self._replacement(idx[k])
        return imgs, src

    def __iter__(self):
        """The rest of the current epoch; afterwards the loader points at the next epoch's start."""
        from vssl_fast.data.augment import augment_images, pack_images, rrc_boxes, size_groups
        from vssl_fast.data.loader import batch_seed

        order = self._order(self.epoch)[self.step:].reshape(-1).tolist()
        dl = torch.utils.data.DataLoader(_BytesFolder(self.samples, order), batch_size=self.batch_size,
                                         num_workers=self.workers, drop_last=True, collate_fn=_collate_bytes,
                                         generator=torch.Generator().manual_seed(0))
        for raw, idx in dl:
            imgs, src = self._decode(raw, idx)
            hw = np.array([img.shape[1:] for img in imgs], dtype=np.int64)
            groups = size_groups(hw)
            canvases = pack_images(imgs, groups)
            del imgs
            seed = batch_seed(self.seed, self.rank, self.epoch, self.step)
            g = torch.Generator(device=self.device).manual_seed(seed)
            rng = np.random.default_rng(seed)
            views = []
            for s in self.specs:
                boxes = np.stack(rrc_boxes(hw[:, 0].astype(np.float64), hw[:, 1].astype(np.float64), s.scale,
                                           s.ratio, rng), axis=1)
                v = augment_images(canvases, groups, boxes, s, g).to(self.out_dtype)
                views.append(v.contiguous(memory_format=torch.channels_last) if self.channels_last else v)
            y = torch.as_tensor(self.samples.labels[src]).to(self.device, non_blocking=True)
            self.step += 1
            yield views[0], views[1], y
        self.epoch, self.step = self.epoch + 1, 0
