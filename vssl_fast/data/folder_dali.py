"""The two-view DALI pipeline for class-folder trees (``data.loader=dali``, or ``auto`` when ``nvidia.dali`` imports).

A batch-mode external source (``DaliBatchSource``; in ``data.workers`` spawned processes on a GPU)
reads this rank's files of the batch and draws both views' parameters; one decode per image
("mixed", i.e. nvJPEG on the GPU; CPU decoding in DALI's CPU-only mode when there is no GPU), and
both views cropped and augmented inside the pipeline with the METHOD.md §3.4 settings: random
resized crop (torchvision's box, scale 0.08-1, ratio 3/4-4/3, cubic resize), colour twist with p
0.8 (brightness/contrast 0.6-1.4, saturation 0.8-1.2, hue +-36 deg; DALI applies them in a fixed
order, torchvision in a random one), grayscale p 0.2, Gaussian blur (23x23 window, sigma 0.1-2) and
solarisation per view as the table says, then flip + normalisation in CropMirrorNormalize. The
output is NCHW float, ready for channels-last bf16. The pipeline is built at the first batch, at
the loader's position (evaluation never builds it); a file that DALI still cannot decode stops the
run with a line naming ``scan``.
"""

from __future__ import annotations

import math
import os

import numpy as np

from vssl_fast.data.augment import ViewSpec
from vssl_fast.data.folder_files import BadDataError, BadFiles, FolderSamples, PositionalLoader, samples_of

__all__ = ["make_dali_pipeline", "dali_view_params", "DaliBatchSource", "DaliTwoViewLoader", "N_VIEW_PARAMS"]


N_VIEW_PARAMS = 14  # per view: roi (4), brightness, contrast, saturation, hue, 4 coins, blur sigma, flip


def _rrc_boxes(H: np.ndarray, W: np.ndarray, scale, ratio, rng: np.random.Generator, attempts: int = 10):
    """torchvision RandomResizedCrop.get_params per image (as ``augment.rrc_params``, in numpy, one size per
    image): the first of 10 valid draws, else the centre crop clipped to the ratio range."""
    n = len(H)
    u = rng.random((n, attempts, 4))
    area = (H * W)[:, None]
    target = area * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lr0 + u[..., 1] * (lr1 - lr0))
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    first = ok.argmax(1)
    r = np.arange(n)
    hh, ww = h[r, first], w[r, first]
    top = np.floor(u[r, first, 2] * (H - hh + 1))
    left = np.floor(u[r, first, 3] * (W - ww + 1))
    in_ratio = W / H
    fw = np.where(in_ratio > max(ratio), np.round(H * max(ratio)), W)
    fh = np.where(in_ratio < min(ratio), np.round(W / min(ratio)), H)
    has = ok.any(1)
    hh, ww = np.where(has, hh, fh), np.where(has, ww, fw)
    top, left = np.where(has, top, (H - fh) // 2), np.where(has, left, (W - fw) // 2)
    return top, left, hh, ww


def dali_view_params(spec: ViewSpec, hw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every random parameter of one view for a batch of images of sizes ``hw`` [n, 2], float32 [n, 14]:
    crop box (relative top, left, bottom, right), brightness, contrast, saturation, hue (degrees), the
    jitter, grayscale, blur and solarize coins, blur sigma, the flip coin."""
    H, W = hw[:, 0].astype(np.float64), hw[:, 1].astype(np.float64)
    n = len(H)
    top, left, h, w = _rrc_boxes(H, W, spec.scale, spec.ratio, rng)
    u = rng.random((n, 10))
    out = np.empty((n, N_VIEW_PARAMS), np.float32)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = top / H, left / W, (top + h) / H, (left + w) / W
    for k, amount in ((4, spec.brightness), (5, spec.contrast), (6, spec.saturation)):
        lo = max(0.0, 1 - amount)
        out[:, k] = lo + u[:, k - 4] * (1 + amount - lo)
    out[:, 7] = 360.0 * spec.hue * (2 * u[:, 3] - 1)  # DALI's hue is in degrees
    out[:, 8] = u[:, 4] < spec.jitter_p
    out[:, 9] = u[:, 5] < spec.gray_p
    out[:, 10] = u[:, 6] < spec.blur_p
    out[:, 11] = spec.blur_sigma[0] + u[:, 7] * (spec.blur_sigma[1] - spec.blur_sigma[0])
    out[:, 12] = u[:, 8] < spec.solarize_p
    out[:, 13] = u[:, 9] < spec.flip_p
    return out


class DaliBatchSource:
    """The DALI pipeline's external source: batch ``step`` of ``epoch`` for one rank, as the encoded files,
    their labels and every random parameter of both views [B, 2, 14].

    Everything is a function of the position: the order is ``epoch_indices`` and the parameters come
    from a generator seeded with (seed, rank, epoch, step). DALI counts its own epochs from 0 and
    iterations from 0 within each, from the position the pipeline was built at (``start``); an epoch
    ends (StopIteration) after ``steps`` batches. Picklable, for DALI's worker processes.
    """

    def __init__(self, samples: FolderSamples, specs, seed, rank, world, batch_size, steps, start=(0, 0)):
        self.paths, self.labels, self.sizes = list(samples.paths), samples.labels, samples.sizes
        self.specs, self.seed, self.rank, self.world = tuple(specs), seed, rank, world
        self.batch_size, self.steps, self.start = batch_size, steps, (int(start[0]), int(start[1]))
        self._epoch, self._idx = None, None

    def position(self, epoch_idx: int, iteration: int) -> tuple[int, int]:
        return self.start[0] + epoch_idx, iteration + (self.start[1] if epoch_idx == 0 else 0)

    def batch(self, epoch: int, step: int):
        from vssl_fast.data.loader import batch_seed, epoch_indices

        if self._epoch != epoch:
            self._idx = epoch_indices(len(self.paths), self.seed, epoch, self.steps, self.world, self.batch_size,
                                      self.rank).numpy()
            self._epoch = epoch
        idx = self._idx[step]
        files = [np.fromfile(self.paths[i], dtype=np.uint8) for i in idx]
        labels = self.labels[idx].astype(np.int32).reshape(-1, 1)
        rng = np.random.default_rng(batch_seed(self.seed, self.rank, epoch, step))
        params = np.stack([dali_view_params(s, self.sizes[idx], rng) for s in self.specs], axis=1)
        return files, labels, params

    def __call__(self, info):
        epoch, step = self.position(int(info.epoch_idx), int(info.iteration))
        if step >= self.steps:
            raise StopIteration
        return self.batch(epoch, step)


def make_dali_pipeline(source, specs: tuple[ViewSpec, ViewSpec], batch_size: int, device_id: int | None = None,
                       num_threads: int = 4, workers: int = 0):
    """The two-view DALI pipeline fed by ``source`` (a ``DaliBatchSource``); ``device_id=None`` builds the
    CPU-only variant. ``workers`` > 0 runs the source in that many worker processes (spawned)."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    gpu = device_id is not None

    def view(images, spec: ViewSpec, p):
        x = fn.resize(images, size=[spec.crop_size, spec.crop_size], roi_start=p[0:2], roi_end=p[2:4],
                      roi_relative=True, interp_type=types.INTERP_CUBIC, antialias=True)
        x = fn.cast(x, dtype=types.FLOAT)
        if spec.jitter_p > 0:
            tw = fn.color_twist(x, brightness=p[4], contrast=p[5], saturation=p[6], hue=p[7])
            x = p[8] * dmath.clamp(tw, 0.0, 255.0) + (1.0 - p[8]) * x
        if spec.gray_p > 0:
            r, g, b = (fn.slice(x, start=[k], shape=[1], axes=[2], out_of_bounds_policy="error") for k in range(3))
            gray = 0.2989 * r + 0.587 * g + 0.114 * b
            x = p[9] * fn.cat(gray, gray, gray, axis=2) + (1.0 - p[9]) * x
        if spec.blur_p > 0:
            bl = fn.gaussian_blur(x, window_size=spec.blur_kernel, sigma=p[11])
            x = p[10] * bl + (1.0 - p[10]) * x
        if spec.solarize_p > 0:
            hit = fn.cast(x >= 128.0, dtype=types.FLOAT) * p[12]
            x = hit * (255.0 - x) + (1.0 - hit) * x
        return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std],
                                        mirror=fn.cast(p[13], dtype=types.INT32))

    extra = dict(py_num_workers=workers, py_start_method="spawn") if workers > 0 else {}

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0, exec_dynamic=True,
                  **extra)
    def pipe():
        es = dict(parallel=True, prefetch_queue_depth=max(2, workers)) if workers > 0 else {}
        jpegs, labels, params = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                                   dtype=[types.UINT8, types.INT32, types.FLOAT], **es)
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                   adjust_orientation=False)  # as PIL/torchvision, and the header sizes used above
        return view(images, specs[0], params[0]), view(images, specs[1], params[1]), labels

    return pipe()


class DaliTwoViewLoader(PositionalLoader):
    """(view1, view2, labels) from DALI, exactly ``steps_per_epoch`` batches per epoch, with the trainer's
    loader interface (epoch/step state).

    ``train_dir`` is a folder (checked once with ``validate_folder``) or its ``FolderSamples``. The
    pipeline is built on the first iteration, at the loader's position, so constructing the loader
    (e.g. for evaluation) costs no pipeline and a resume costs one pipeline build, not a replay.
    """

    def __init__(self, train_dir, specs, batch_size, seed, rank, world, device, channels_last, out_dtype, *,
                 workers: int = 0, bad: BadFiles | None = None, cache_dir: str | None = "~/.cache/vssl_fast"):
        self.bad = bad if bad is not None else BadFiles()
        self._init_position(samples_of(train_dir, cache_dir, self.bad), batch_size, seed, rank, world)
        self.specs, self.device, self.channels_last, self.out_dtype = specs, device, channels_last, out_dtype
        self.workers = workers
        self.pipe, self.it, self._at = None, None, None  # _at: the position the pipeline yields next

    def _build(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.close()
        src = DaliBatchSource(self.samples, self.specs, self.seed, self.rank, self.world, self.batch_size,
                              self.steps_per_epoch, (self.epoch, self.step))
        dev_id = self.device.index if self.device.type == "cuda" else None
        self.pipe = make_dali_pipeline(src, self.specs, self.batch_size, dev_id,
                                       num_threads=max(2, min(8, os.cpu_count() or 2)), workers=self.workers)
        self.pipe.build()
        self.it = DALIGenericIterator([self.pipe], ["v1", "v2", "y"], auto_reset=True)
        self._at = (self.epoch, self.step)

    def close(self):
        """Release the pipeline (and its worker processes)."""
        self.it, self.pipe, self._at = None, None, None

    def _failure(self, e: Exception) -> BadDataError:
        """DALI's error (pages of it) as one line that names the batch, the folder and ``scan``."""
        text = str(e)
        lines = [x.strip() for x in text.split("encountered:", 1)[-1].splitlines() if x.strip()]
        return BadDataError(f"DALI failed on batch {self.step} of epoch {self.epoch} from {self.samples.root} "
                            f"({(lines[0] if lines else type(e).__name__)[:300]}): a file changed or is damaged "
                            f"inside; find it with `python -m vssl_fast.data scan {self.samples.root}` and remove "
                            "it, or train with --data.loader=torchvision, which skips such files")

    def __iter__(self):
        """The rest of the current epoch; afterwards the loader points at the next epoch's start."""
        if self.step >= self.steps_per_epoch:  # every batch is out (e.g. resumed from a checkpoint at an epoch's end)
            if self.it is not None and self._at == (self.epoch, self.step):
                for _ in self.it:  # take DALI's end of epoch, so that the next epoch starts afresh
                    raise RuntimeError(f"DALI gave more than {self.steps_per_epoch} batches in epoch {self.epoch}")
            self.epoch, self.step = self.epoch + 1, 0
            self._at = (self.epoch, 0) if self.it is not None else None
            return
        while True:
            try:
                if self._at != (self.epoch, self.step):
                    self._build()  # runs the first batch already
                b = next(self.it)  # after the epoch's last batch DALI ends the epoch (and resets itself)
            except StopIteration:
                break
            except RuntimeError as e:
                self.close()
                if "decode" not in str(e).lower():
                    raise
                raise self._failure(e) from e
            self.step += 1
            self._at = (self.epoch, self.step)
            yield self._finish_views(b[0]["v1"], b[0]["v2"], b[0]["y"])
        if self.step != self.steps_per_epoch:
            raise RuntimeError(f"DALI ended epoch {self.epoch} after {self.step} of {self.steps_per_epoch} batches")
        self.epoch, self.step = self.epoch + 1, 0
        self._at = (self.epoch, 0)
