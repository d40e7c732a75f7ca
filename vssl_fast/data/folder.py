"""ImageNet-100 and any class-folder tree of JPEGs: NVIDIA DALI, or torchvision when DALI is missing.

Layout: ``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*.JPEG`` (or ``test``).

DALI (``data.loader=dali``, or ``auto`` when ``nvidia.dali`` imports): a sharded file reader per
rank (``shard_id=rank, num_shards=world``, shuffled with the run's seed), one decode per image
("mixed", i.e. nvJPEG on the GPU; CPU decoding in DALI's CPU-only mode when there is no GPU),
and both views cropped and augmented inside the pipeline with the METHOD.md §3.4 settings:
random resized crop (scale 0.08-1, ratio 3/4-4/3, cubic), colour twist with p 0.8
(brightness/contrast 0.6-1.4, saturation 0.8-1.2, hue +-36 deg; DALI applies them in a fixed
order, torchvision in a random one), grayscale p 0.2, Gaussian blur (23x23 window, sigma
0.1-2) and solarisation per view as the table says, then flip + normalisation in
CropMirrorNormalize. The output is NCHW float, ready for channels-last bf16. Mid-epoch resume
replays the epoch's order and skips the consumed batches.

torchvision (no DALI): with a GPU, workers read the file bytes and ``torchvision.io.decode_jpeg``
decodes each batch with nvJPEG on the GPU, where both views are cropped and augmented
(``augment_list``); without one, an ImageFolder with worker processes produces both views with
the PIL transforms (PIL GaussianBlur and Solarize, as solo-learn's torchvision pipeline).
Unreadable files are skipped, counted, logged once each; a run of ``MAX_BAD_IN_A_ROW`` (or a
whole batch on the GPU path) fails the loader.
The log says which path runs and why. Validation everywhere: resize 256, centre crop 224.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import torch

from vssl_fast.data.augment import MEANS_STDS, ViewSpec, view_specs

log = logging.getLogger("vssl_fast")

__all__ = ["build_folder_data", "dali_available", "make_dali_pipeline", "TwoViewTransform", "SkippingImageFolder",
           "NvjpegTwoViewLoader", "TorchvisionTwoViewLoader", "MAX_BAD_IN_A_ROW"]

MAX_BAD_IN_A_ROW = 16


def dali_available() -> tuple[bool, str]:
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "no DALI"
        return False, f"nvidia.dali is not importable ({type(e).__name__}: {e}); install the 'dali' extra"
    return True, "nvidia.dali is installed"


def _split_dir(root: Path, names=("train",)) -> Path:
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise FileNotFoundError(f"{root}: no {'/'.join(names)} folder; "
                            "expected <root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg")


# ----------------------------------------------------------------------------- DALI
def make_dali_pipeline(train_dir: str, specs: tuple[ViewSpec, ViewSpec], batch_size: int, seed: int, rank: int = 0,
                       world: int = 1, device_id: int | None = None, num_threads: int = 4, shuffle: bool = True):
    """The two-view DALI pipeline; ``device_id=None`` builds the CPU-only variant."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    gpu = device_id is not None

    def view(images, spec: ViewSpec):
        x = fn.random_resized_crop(images, size=(spec.crop_size, spec.crop_size), random_area=spec.scale,
                                   random_aspect_ratio=spec.ratio, interp_type=types.INTERP_CUBIC, antialias=True)
        x = fn.cast(x, dtype=types.FLOAT)
        if spec.jitter_p > 0:
            tw = fn.color_twist(x, brightness=fn.random.uniform(range=(1 - spec.brightness, 1 + spec.brightness)),
                                contrast=fn.random.uniform(range=(1 - spec.contrast, 1 + spec.contrast)),
                                saturation=fn.random.uniform(range=(1 - spec.saturation, 1 + spec.saturation)),
                                hue=fn.random.uniform(range=(-360 * spec.hue, 360 * spec.hue)))
            c = fn.cast(fn.random.coin_flip(probability=spec.jitter_p), dtype=types.FLOAT)
            x = c * dmath.clamp(tw, 0.0, 255.0) + (1.0 - c) * x
        if spec.gray_p > 0:
            r, g, b = (fn.slice(x, start=[k], shape=[1], axes=[2], out_of_bounds_policy="error") for k in range(3))
            gray = 0.2989 * r + 0.587 * g + 0.114 * b
            c = fn.cast(fn.random.coin_flip(probability=spec.gray_p), dtype=types.FLOAT)
            x = c * fn.cat(gray, gray, gray, axis=2) + (1.0 - c) * x
        if spec.blur_p > 0:
            bl = fn.gaussian_blur(x, window_size=spec.blur_kernel, sigma=fn.random.uniform(range=spec.blur_sigma))
            c = fn.cast(fn.random.coin_flip(probability=spec.blur_p), dtype=types.FLOAT)
            x = c * bl + (1.0 - c) * x
        if spec.solarize_p > 0:
            c = fn.cast(fn.random.coin_flip(probability=spec.solarize_p), dtype=types.FLOAT)
            hit = fn.cast(x >= 128.0, dtype=types.FLOAT) * c
            x = hit * (255.0 - x) + (1.0 - hit) * x
        return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std],
                                        mirror=fn.random.coin_flip(probability=spec.flip_p))

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed + 1000 * rank,
                  exec_dynamic=True)
    def pipe():
        jpegs, labels = fn.readers.file(file_root=train_dir, shard_id=rank, num_shards=world, random_shuffle=shuffle,
                                        seed=seed, name="Reader", pad_last_batch=False)
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        return view(images, specs[0]), view(images, specs[1]), labels

    return pipe()


class DaliTwoViewLoader:
    """(view1, view2, labels) from DALI, with the trainer's loader interface (epoch/step state)."""

    def __init__(self, train_dir, specs, batch_size, seed, rank, world, device, channels_last, out_dtype):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        dev_id = device.index if device.type == "cuda" else None
        self.pipe = make_dali_pipeline(str(train_dir), specs, batch_size, seed, rank, world, dev_id,
                                       num_threads=max(2, min(8, (os.cpu_count() or 2))))
        self.pipe.build()
        self.it = DALIGenericIterator([self.pipe], ["v1", "v2", "y"], reader_name="Reader",
                                      last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)
        n = self.pipe.epoch_size("Reader")
        self.steps_per_epoch = n // (world * batch_size)
        self.device, self.channels_last, self.out_dtype = device, channels_last, out_dtype
        self.seed, self.world = seed, world
        self.epoch, self.step = 0, 0

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "world": self.world}

    def load_state_dict(self, st):
        self.epoch, self.step = int(st["epoch"]), int(st["step"])
        # replay: DALI's shuffle is a function of the seed and the epoch count, so consume what was used
        for _ in range(self.epoch):
            for _ in self.it:
                pass
        for _ in range(self.step):
            next(self.it)

    def _convert(self, b):
        v1, v2, y = b[0]["v1"], b[0]["v2"], b[0]["y"]
        v1, v2 = (v.to(self.device, non_blocking=True).to(self.out_dtype) for v in (v1, v2))
        if self.channels_last:
            v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
        return v1, v2, y.reshape(-1).long().to(self.device, non_blocking=True)

    def __iter__(self):
        while self.step < self.steps_per_epoch:
            try:
                b = next(self.it)
            except StopIteration:
                break
            self.step += 1
            yield self._convert(b)
        self.epoch += 1
        self.step = 0

    def __len__(self):
        return self.steps_per_epoch


# ----------------------------------------------------------------------------- torchvision
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


class SkippingImageFolder(torch.utils.data.Dataset):
    """ImageFolder that skips unreadable files: each logged once, counted; a run of them is an error."""

    def __init__(self, root, transform):
        from torchvision.datasets import ImageFolder

        self.inner = ImageFolder(str(root))
        self.transform = transform
        self.bad: set[str] = set()

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        from PIL import Image

        for k in range(MAX_BAD_IN_A_ROW):
            path, y = self.inner.samples[(i + k) % len(self.inner)]
            try:
                with Image.open(path) as im:
                    img = im.convert("RGB")
                return (*self.transform(img), y) if isinstance(self.transform, TwoViewTransform) else (self.transform(img), y)
            except Exception as e:  # noqa: BLE001 - a bad file: skip it, say so once
                if path not in self.bad:
                    self.bad.add(path)
                    log.warning("skipping unreadable image %s (%s); %d bad so far in this worker", path, e, len(self.bad))
        raise RuntimeError(f"{MAX_BAD_IN_A_ROW} unreadable images in a row near index {i} of {self.inner.root}; "
                           f"run `python -m vssl_fast.data scan {self.inner.root}`")


class TorchvisionTwoViewLoader:
    def __init__(self, train_dir, specs, batch_size, seed, rank, world, device, workers, channels_last, out_dtype):
        self.ds = SkippingImageFolder(train_dir, TwoViewTransform(specs))
        self.sampler = torch.utils.data.distributed.DistributedSampler(self.ds, num_replicas=world, rank=rank,
                                                                       shuffle=True, seed=seed, drop_last=True)
        self.batch_size, self.device, self.workers = batch_size, device, workers
        self.channels_last, self.out_dtype, self.seed, self.world = channels_last, out_dtype, seed, world
        self.rank = rank
        self.steps_per_epoch = len(self.sampler) // batch_size
        self.epoch, self.step = 0, 0

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "world": self.world}

    def load_state_dict(self, st):
        self.epoch, self.step = int(st["epoch"]), int(st["step"])

    def __iter__(self):
        from vssl_fast.data.loader import batch_seed

        self.sampler.set_epoch(self.epoch)
        idx = list(self.sampler)[self.step * self.batch_size: self.steps_per_epoch * self.batch_size]
        # augmentation streams: deterministic per (seed, rank, epoch), different across ranks
        g = torch.Generator().manual_seed(batch_seed(self.seed, self.rank, self.epoch, -2))
        dl = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.ds, idx), batch_size=self.batch_size, num_workers=self.workers,
            drop_last=True, pin_memory=self.device.type == "cuda", generator=g, persistent_workers=False,
            worker_init_fn=lambda w: random.seed(torch.initial_seed() % 2**32))
        for v1, v2, y in dl:
            self.step += 1
            v1, v2 = (v.to(self.device, non_blocking=True).to(self.out_dtype) for v in (v1, v2))
            if self.channels_last:
                v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
            yield v1, v2, y.to(self.device, non_blocking=True)
        self.epoch += 1
        self.step = 0

    def __len__(self):
        return self.steps_per_epoch


class _BytesFolder(torch.utils.data.Dataset):
    """(encoded bytes, label) per file; decoding happens batched on the device."""

    def __init__(self, root):
        from torchvision.datasets import ImageFolder

        self.inner = ImageFolder(str(root))

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        path, y = self.inner.samples[i]
        with open(path, "rb") as f:
            return f.read(), y, path  # plain bytes: pickled back, no shared-memory file descriptors


def _collate_bytes(batch):
    return [b[0] for b in batch], torch.tensor([b[1] for b in batch]), [b[2] for b in batch]


class NvjpegTwoViewLoader(TorchvisionTwoViewLoader):
    """torchvision path with a GPU: workers read file bytes, ``decode_jpeg(device='cuda')`` decodes the
    batch with nvJPEG, and both views are cropped and augmented on the GPU (``augment_list``).
    Files that fail to decode are skipped (logged once each); a batch that is all bad is an error."""

    def __init__(self, train_dir, specs, batch_size, seed, rank, world, device, workers, channels_last, out_dtype):
        super().__init__(train_dir, specs, batch_size, seed, rank, world, device, workers, channels_last, out_dtype)
        self.ds = _BytesFolder(train_dir)
        self.specs, self.bad = specs, set()

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
                    if p not in self.bad:
                        self.bad.add(p)
                        log.warning("skipping undecodable image %s (%s); %d bad so far", p, e, len(self.bad))
            if not imgs:
                raise RuntimeError(f"a whole batch of {len(datas)} images failed to decode, e.g. {paths[:3]}; "
                                   "run `python -m vssl_fast.data scan` on the dataset") from None
            return imgs, keep

    def __iter__(self):
        from vssl_fast.data.augment import augment_list
        from vssl_fast.data.loader import batch_seed

        self.sampler.set_epoch(self.epoch)
        idx = list(self.sampler)[self.step * self.batch_size: self.steps_per_epoch * self.batch_size]
        dl = torch.utils.data.DataLoader(torch.utils.data.Subset(self.ds, idx), batch_size=self.batch_size,
                                         num_workers=self.workers, drop_last=True, collate_fn=_collate_bytes)
        for datas, y, paths in dl:
            imgs, keep = self._decode(datas, paths)
            g = torch.Generator(device=self.device).manual_seed(batch_seed(self.seed, self.rank, self.epoch, self.step))
            v1, v2 = (augment_list(imgs, s, g).to(self.out_dtype) for s in self.specs)
            if self.channels_last:
                v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
            self.step += 1
            yield v1, v2, y[keep].to(self.device, non_blocking=True)
        self.epoch += 1
        self.step = 0


class FolderEvalLoader:
    """Resize 256 (shorter side) + centre crop 224 + normalise, as solo-learn's validation transform."""

    def __init__(self, root, batch_size, rank, world, device, workers, crop=224, resize=256):
        from torchvision import transforms as T

        mean, std = MEANS_STDS["imagenet"]
        tf = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop), T.ToTensor(),
                        T.Normalize(mean, std)])
        self.ds = SkippingImageFolder(root, tf)
        idx = list(range(rank, len(self.ds), world))
        self.dl = torch.utils.data.DataLoader(torch.utils.data.Subset(self.ds, idx), batch_size=batch_size,
                                              num_workers=workers, shuffle=False)
        self.device = device

    def __iter__(self):
        for x, y in self.dl:
            yield x.to(self.device, non_blocking=True), y.to(self.device)

    def __len__(self):
        return len(self.dl)


def build_folder_data(cfg, device, rank: int = 0, world: int = 1):
    from vssl_fast.data import DataBundle

    d = cfg.data
    root = Path(d.path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.path={d.path!r} is not a folder; for ImageNet-100 build it with "
                                "`python -m vssl_fast.data imagenet100 --src /path/to/imagenet --dst data/imagenet100`")
    train_dir, val_dir = _split_dir(root, ("train",)), _split_dir(root, ("val", "test"))
    specs = view_specs("imagenet", d.augmentations, d.crop_size)
    workers = d.workers or (os.cpu_count() or 2)
    dt = torch.bfloat16 if device.type == "cuda" and cfg.train.precision in ("auto", "bf16") else torch.float32
    cl = device.type == "cuda" and cfg.model.channels_last
    ok, why = dali_available()
    use_dali = d.loader == "dali" or (d.loader == "auto" and ok)
    if d.loader == "dali" and not ok:
        raise RuntimeError(f"data.loader=dali but {why}")
    if use_dali:
        train = DaliTwoViewLoader(train_dir, specs, cfg.train.batch_size, cfg.train.seed, rank, world, device, cl, dt)
        desc = f"DALI ({'GPU mixed decode' if device.type == 'cuda' else 'CPU-only'}) on {train_dir}: {why}"
    else:
        reason = "data.loader=torchvision" if d.loader == "torchvision" else why
        cls = NvjpegTwoViewLoader if device.type == "cuda" else TorchvisionTwoViewLoader
        train = cls(train_dir, specs, cfg.train.batch_size, cfg.train.seed, rank, world, device, workers, cl, dt)
        how = "nvJPEG decode + GPU augmentation" if device.type == "cuda" else "PIL decode + augmentation in workers"
        desc = f"torchvision ImageFolder, {how}, {workers} workers, on {train_dir} (not DALI: {reason})"
    log.info("data path: %s", desc)
    ebs = max(cfg.train.batch_size, 128)
    val = FolderEvalLoader(val_dir, ebs, rank, world, device, workers)
    bank = FolderEvalLoader(train_dir, ebs, rank, world, device, workers)
    from torchvision.datasets.folder import find_classes

    return DataBundle(train, val, bank, len(find_classes(str(train_dir))[0]), desc)  # class folders, no file walk
