"""The two-view DALI pipeline for class-folder trees (``data.loader=dali``, or ``auto`` when ``nvidia.dali`` imports).

A batch-mode external source (``DaliBatchSource``; in ``data.workers`` spawned processes on a GPU)
reads this rank's files of the batch and draws both views' parameters (``dali_view_params``: the
crop box by torchvision's rules, the jitter factors, the order of the four jitter ops, the coins).
One decode per image ("mixed", i.e. nvJPEG on the GPU, with memory hints from the tree's largest
image, ``decoder_hints``; CPU decoding in DALI's CPU-only mode when there is no GPU), then each view
in uint8 until one final normalisation, with the METHOD.md §3.4 settings and torchvision's semantics
op by op: the crop (sliced, then a bicubic antialiased resize), ColorJitter with p 0.8 (brightness
and contrast 0.6-1.4, saturation 0.8-1.2, hue +-0.1 of the circle) in each sample's own random order,
contrast around the image's mean grey and hue in HSV as ``torchvision.transforms.functional`` do,
grayscale p 0.2, Gaussian blur (23x23 window, sigma 0.1-2) and solarisation per view as the table
says, flip and normalisation in CropMirrorNormalize. Per-sample ops run only on the samples that
draw them (DALI conditionals), not blended for all. Views come out NHWC when channels-last is
wanted (a channels-last NCHW tensor by a permute, no copy), float16 when the trainer wants 16-bit
images. The tolerances to torchvision are in tests/data/test_folder_dali.py: 0.5 of a level (uint8
rounding) for brightness, contrast, hue, blur, 0.63 for saturation (DALI's YIQ matrix), 0.53 for
grayscale, exact for solarize, flip and normalisation; the resize 0.55 inside, while the outermost
rows and columns the cubic window reaches past the crop edge differ by edge handling (DALI repeats
the edge pixel, torchvision drops the outside taps and renormalises: at most the dropped kernel mass
times the local range, measured up to 15 levels).

The pipeline is built at the first batch, at the loader's position (evaluation never builds it); a
file that DALI still cannot decode stops the run with a line naming ``scan``.
"""

from __future__ import annotations

import collections
import os

import numpy as np
import torch

from vssl_fast.data.augment import ViewSpec, rrc_boxes
from vssl_fast.data.folder_files import BadDataError, BadFiles, FolderSamples, PositionalLoader, samples_of

__all__ = ["make_dali_pipeline", "dali_view_params", "DaliBatchSource", "DaliTwoViewLoader", "N_VIEW_PARAMS"]


# per view: crop box (top, left, height, width, in pixels), brightness, contrast, saturation, hue (a fraction of
# the hue circle, torchvision's hue_factor), the jitter, grayscale and blur coins, blur sigma, the solarize and flip
# coins, then the jitter op at each of the 4 stages (0 brightness, 1 contrast, 2 saturation, 3 hue; -1: no jitter)
N_VIEW_PARAMS = 18
JITTER_STAGE = 14  # index of the first stage's op
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def dali_view_params(spec: ViewSpec, hw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every random parameter of one view for a batch of images of sizes ``hw`` [n, 2], float32 [n, 18] (see
    ``N_VIEW_PARAMS``): the crop box by torchvision's rules, the jitter factors from torchvision's ranges,
    the coins, and the order of the four jitter ops (a uniformly random permutation, as ``ColorJitter``'s
    ``torch.randperm(4)``)."""
    H, W = hw[:, 0].astype(np.float64), hw[:, 1].astype(np.float64)
    n = len(H)
    top, left, h, w = rrc_boxes(H, W, spec.scale, spec.ratio, rng)
    u = rng.random((n, 10))
    order = np.argsort(rng.random((n, 4)), axis=1)
    out = np.empty((n, N_VIEW_PARAMS), np.float32)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = top, left, h, w  # whole pixels: exact in float32 below 2**24
    for k, amount in ((4, spec.brightness), (5, spec.contrast), (6, spec.saturation)):
        lo = max(0.0, 1 - amount)
        out[:, k] = lo + u[:, k - 4] * (1 + amount - lo)
    out[:, 7] = spec.hue * (2 * u[:, 3] - 1)
    out[:, 8] = u[:, 4] < spec.jitter_p
    out[:, 9] = u[:, 5] < spec.gray_p
    out[:, 10] = u[:, 6] < spec.blur_p
    out[:, 11] = spec.blur_sigma[0] + u[:, 7] * (spec.blur_sigma[1] - spec.blur_sigma[0])
    out[:, 12] = u[:, 8] < spec.solarize_p
    out[:, 13] = u[:, 9] < spec.flip_p
    out[:, JITTER_STAGE:] = np.where(out[:, 8:9] > 0, order, -1)
    return out


class DaliBatchSource:
    """The DALI pipeline's external source: batch ``step`` of ``epoch`` for one rank, as the encoded files,
    their labels and every random parameter of both views [B, 2, N_VIEW_PARAMS].

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


# ----------------------------------------------------------------------------- the DALI ops of a view
# Each takes and returns a uint8 HWC batch (one final normalisation makes floats), so that the colour ops move
# a quarter of float32's bytes. One graph serves the CPU (the tests) and the GPU: values computed from the
# images (the grey mean, the hue) stay regular inputs, since a GPU output cannot be a named argument; the
# factors and coins come from the source, on the CPU, as named arguments and as the conditions that route
# each sample through only the ops it draws (``enable_conditionals``). Tolerances against torchvision's
# functional ops, op by op, are derived and tested in tests/data/test_folder_dali.py.
def _to_uint8(x):
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    return fn.cast(dmath.clamp(x, 0.0, 255.0), dtype=types.UINT8)  # rounds to nearest


def dali_brightness(x, b):
    """torchvision ``adjust_brightness``: x * b, clipped."""
    from nvidia.dali import fn

    return fn.brightness_contrast(x, brightness=b)


def dali_contrast(x, c):
    """torchvision ``adjust_contrast``: a blend with the image's mean grey (``rgb_to_grayscale`` weights), clipped.
    The mean of the grey image is the weighted sum of the channel means (the mean is linear)."""
    from nvidia.dali import fn, types

    means = fn.reductions.mean(x, axes=[0, 1], dtype=types.FLOAT)
    grey = fn.reductions.sum(means * types.Constant(np.float32(GRAY_WEIGHTS)))
    return _to_uint8(c * x + (1.0 - c) * grey)


def dali_saturation(x, s):
    """torchvision ``adjust_saturation``: a blend with each pixel's grey. DALI's hsv op scales the chroma of YIQ,
    which is the same blend with the luma (0.299, 0.587, 0.114) as grey."""
    from nvidia.dali import fn

    return fn.hsv(x, saturation=s)


def dali_hue(x, h):
    """torchvision ``adjust_hue``: the HSV hue turned by ``h`` (a fraction of the circle), value and saturation
    kept. DALI's own hue ops turn the YIQ chroma instead, another colour; here HSV is computed per pixel:
    each channel n in (R, G, B) = (5, 3, 1) is ``max - (max - min) * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6 * hue) mod 6``, torchvision's six sectors in one formula."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    xf = fn.cast(x, dtype=types.FLOAT)
    v = fn.reductions.max(xf, axes=[2], keep_dims=True)
    lo = fn.reductions.min(xf, axes=[2], keep_dims=True)
    r, g, b = xf[:, :, 0:1], xf[:, :, 1:2], xf[:, :, 2:3]
    d = v - lo
    is_r = v == r  # torchvision's precedence on ties: red, then green, then blue
    is_g = (v == g) & (v != r)
    is_b = (v != g) & (v != r)
    h6 = (is_r * (g - b) + is_g * (2.0 * d + b - r) + is_b * (4.0 * d + r - g)) / (d + (d == 0.0))
    k = types.Constant(np.float32([5.0, 3.0, 1.0])) + (h6 + 6.0 * h)
    k = k - 6.0 * dmath.floor(k / 6.0)
    return _to_uint8(v - d * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0))


def dali_grayscale(x):
    """torchvision ``rgb_to_grayscale(num_output_channels=3)`` (DALI's luma weights 0.299, 0.587, 0.114)."""
    from nvidia.dali import fn, types

    g = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
    return fn.cat(g, g, g, axis=2)


def dali_blur(x, sigma, window: int):
    """torchvision ``gaussian_blur`` with a ``window`` x ``window`` kernel (both reflect at the border)."""
    from nvidia.dali import fn

    return fn.gaussian_blur(x, window_size=window, sigma=sigma)


def dali_solarize(x):
    """torchvision ``solarize`` at 128 on uint8 (PIL's): v >= 128 becomes 255 - v, which is min(v, 255 - v)."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    return fn.cast(dmath.min(x, 255 - x), dtype=types.UINT8)


def _apply(x, prob: float, coin, op):
    """``op(x)`` for every sample when ``prob`` is 1, for the samples whose coin is set when it is in (0, 1)."""
    if prob >= 1:
        x = op(x)
    elif prob > 0:
        if coin > 0:
            x = op(x)
    return x


def view_stages(spec: ViewSpec) -> list[str]:
    """The names of the stages ``make_dali_pipeline(taps=True)`` outputs for a view, in order."""
    names = ["crop"] + ([f"jitter{k}" for k in range(4)] if spec.jitter_p > 0 else [])
    names += [n for n, p in (("gray", spec.gray_p), ("blur", spec.blur_p), ("solarize", spec.solarize_p)) if p > 0]
    return names + ["out"]


def _dali_view(images, spec: ViewSpec, p, out_type, layout: str, taps: list | None):
    """One view: the crop (sliced, so that only its pixels enter the resize, as torchvision crops before it
    resizes) resized bicubically with antialiasing, the jitter ops in the sample's order, grayscale, blur,
    solarize, then flip and normalisation (CropMirrorNormalize, the one float output)."""
    from nvidia.dali import fn, types

    S = spec.crop_size
    x = fn.slice(images, p[0:2], p[2:4], axes=[0, 1], normalized_anchor=False, normalized_shape=False,
                 out_of_bounds_policy="error")
    x = fn.resize(x, size=[S, S], interp_type=types.INTERP_CUBIC, antialias=True)
    tap = taps.append if taps is not None else (lambda node: None)
    tap(x)
    if spec.jitter_p > 0:
        for k in range(4):
            op = p[JITTER_STAGE + k]
            if op == 0:
                x = dali_brightness(x, p[4])
            elif op == 1:
                x = dali_contrast(x, p[5])
            elif op == 2:
                x = dali_saturation(x, p[6])
            elif op == 3:
                x = dali_hue(x, p[7])
            tap(x)
    if spec.gray_p > 0:
        x = _apply(x, spec.gray_p, p[9], dali_grayscale)
        tap(x)
    if spec.blur_p > 0:
        x = _apply(x, spec.blur_p, p[10], lambda y: dali_blur(y, p[11], spec.blur_kernel))
        tap(x)
    if spec.solarize_p > 0:
        x = _apply(x, spec.solarize_p, p[12], dali_solarize)
        tap(x)
    out = fn.crop_mirror_normalize(x, dtype=out_type, output_layout=layout, mean=[255.0 * m for m in spec.mean],
                                   std=[255.0 * s for s in spec.std], mirror=fn.cast(p[13], dtype=types.INT32))
    tap(out)
    return out


MIN_PADDING, MAX_PADDING = 16 << 20, 256 << 20  # DALI's default device padding; a cap for trees of huge images


def largest_image(sizes) -> tuple[int, int]:
    """(H, W) of the tree's largest image by area, for the decoder's hints: per-dimension maxima of a tall
    and a wide outlier would ask for a huge buffer no image needs. Capped where the padding is capped."""
    if len(sizes) == 0:
        return 0, 0
    sizes = np.asarray(sizes, dtype=np.int64)
    H, W = (int(v) for v in sizes[int(np.argmax(sizes[:, 0] * sizes[:, 1]))])
    scale = min(1.0, (MAX_PADDING / 3 / max(H * W, 1)) ** 0.5)
    return int(H * scale), int(W * scale)


def dali_threads(setting: int = 0) -> int:
    """The pipeline's thread count for ``data.dali_threads``: the setting itself when positive; 0 = auto,
    this rank's share of the node's cores (torchrun's ``LOCAL_WORLD_SIZE`` ranks), from 2 to 8."""
    if setting > 0:
        return setting
    share = (os.cpu_count() or 2) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(2, min(8, share))


def decoder_hints(max_hw=(0, 0), hw_decoder_load: float = 0.65) -> dict:
    """The mixed decoder's memory hints from the largest image of the tree (its header size), so that nvJPEG
    never reallocates as larger images arrive (DALI's ResNet-50 example pads for ImageNet's largest with fixed
    figures, 211 MB device and 140 MB host per thread): each thread's buffers fit that image's RGB bytes
    (at least DALI's default 16 MiB, at most 256 MiB), and the hardware decoder preallocates for its size.
    ``jpeg_fancy_upsampling`` makes nvJPEG upsample chroma as libjpeg-turbo does, so that the GPU decode
    comes close to the CPU decode (and PIL's) that the tests compare with torchvision (nvJPEG's IDCT may
    still differ by a level or two: to be measured on a card, ``test_gpu_views_equal_the_cpu_views``)."""
    H, W = (int(v) for v in max_hw)
    pad = min(MAX_PADDING, max(MIN_PADDING, -(-H * W * 3 // (1 << 20)) << 20))
    return dict(hw_decoder_load=float(hw_decoder_load), device_memory_padding=pad, host_memory_padding=pad,
                preallocate_width_hint=W, preallocate_height_hint=H, jpeg_fancy_upsampling=True)


def make_dali_pipeline(source, specs: tuple[ViewSpec, ViewSpec], batch_size: int, device_id: int | None = None,
                       num_threads: int = 4, workers: int = 0, *, hw_decoder_load: float = 0.65, max_hw=(0, 0),
                       channels_last: bool = False, half: bool = False, taps: bool = False):
    """The two-view DALI pipeline fed by ``source`` (a ``DaliBatchSource``); ``device_id=None`` builds the
    CPU-only variant, an index the GPU one (nvJPEG "mixed" decode with ``decoder_hints``). ``workers`` > 0
    runs the source in that many worker processes (spawned). Views come out NHWC (``channels_last``: a
    channels-last NCHW tensor by a permute, no copy) or NCHW, float16 (``half``) or float32. ``taps``: every
    stage's output follows the views and labels, view 1's then view 2's (``view_stages``), for the tests."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    out_type = types.FLOAT16 if half else types.FLOAT
    layout = "HWC" if channels_last else "CHW"
    extra = dict(py_num_workers=workers, py_start_method="spawn") if workers > 0 else {}
    dec = decoder_hints(max_hw, hw_decoder_load) if gpu else {}

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0, exec_dynamic=True,
                  enable_conditionals=True, **extra)
    def pipe():
        es = dict(parallel=True, prefetch_queue_depth=max(2, workers)) if workers > 0 else {}
        jpegs, labels, params = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                                   dtype=[types.UINT8, types.INT32, types.FLOAT], **es)
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                   adjust_orientation=False, **dec)  # as PIL/torchvision, and the header sizes
        t1, t2 = ([], []) if taps else (None, None)
        v1 = _dali_view(images, specs[0], params[0], out_type, layout, t1)
        v2 = _dali_view(images, specs[1], params[1], out_type, layout, t2)
        return (v1, v2, labels, *t1, *t2) if taps else (v1, v2, labels)

    return pipe()


class HeldUntilDone:
    """DALI's output buffers kept referenced until the device work that reads them has finished.

    With ``exec_dynamic`` the iterator hands out DALI's own buffers (zero copy, through DLPack), and
    DALI reuses a buffer in its own stream order as soon as its last reference is dropped: PyTorch's
    caching allocator cannot ``record_stream`` memory it did not allocate, and a DLPack deleter carries
    no stream. The trainer drops a batch's views on the host when it asks for the next batch, while the
    previous step's kernels may still be reading them (the host runs steps ahead). So each batch is
    held here, with an event recorded on the consuming stream when the next batch is asked for, and
    released once that event has completed (``query``, no wait; the oldest is waited for beyond
    ``LIMIT`` held batches). On a CPU the consumer has finished when it asks again: nothing is held."""

    LIMIT = 8

    def __init__(self, make_event=None):
        self.make_event = make_event  # torch.cuda.Event on a GPU; None on a CPU
        self.held: collections.deque = collections.deque()

    def hold(self, refs) -> None:
        """``refs`` (the batch just consumed) live until the work queued so far on this stream is done."""
        if self.make_event is None:
            return
        ev = self.make_event()
        ev.record()
        self.held.append((ev, refs))
        while self.held and (self.held[0][0].query() or len(self.held) > self.LIMIT):
            ev, _ = self.held.popleft()
            ev.synchronize()  # done already, or the host is too far ahead: wait for the oldest

    def release_all(self) -> None:
        while self.held:
            ev, _ = self.held.popleft()
            ev.synchronize()


class DaliTwoViewLoader(PositionalLoader):
    """(view1, view2, labels) from DALI, exactly ``steps_per_epoch`` batches per epoch, with the trainer's
    loader interface (epoch/step state).

    ``train_dir`` is a folder (checked once with ``validate_folder``) or its ``FolderSamples``. The
    pipeline is built on the first iteration, at the loader's position, so constructing the loader
    (e.g. for evaluation) costs no pipeline and a resume costs one pipeline build, not a replay.
    """

    def __init__(self, train_dir, specs, batch_size, seed, rank, world, device, channels_last, out_dtype, *,
                 workers: int = 0, bad: BadFiles | None = None, cache_dir: str | None = "~/.cache/vssl_fast",
                 threads: int = 0, hw_decoder_load: float = 0.65):
        from vssl_fast.distributed import resolve_device

        self.bad = bad if bad is not None else BadFiles()
        self._init_position(samples_of(train_dir, cache_dir, self.bad), batch_size, seed, rank, world)
        self.specs, self.channels_last, self.out_dtype = specs, channels_last, out_dtype
        self.device = resolve_device(device)  # `cuda` without an index is the current device, never the CPU
        self.workers, self.hw_decoder_load = workers, hw_decoder_load
        self.threads = dali_threads(threads)
        self.pipe, self.it, self._at = None, None, None  # _at: the position the pipeline yields next
        self._held = HeldUntilDone(torch.cuda.Event if self.device_id is not None else None)

    @property
    def device_id(self) -> int | None:
        """DALI's device_id for this loader's device: its CUDA index (the GPU pipeline), None on a CPU."""
        return self.device.index if self.device.type == "cuda" else None

    def describe(self) -> str:
        """Which pipeline this loader builds (the benchmark rows and the run's log say it)."""
        how = (f"GPU mixed decode (nvJPEG) on cuda:{self.device_id}, hw_decoder_load {self.hw_decoder_load:g}"
               if self.device_id is not None else "CPU-only decode and augmentation")
        return f"DALI {how}, {self.threads} threads, {self.workers} reader processes"

    def _build(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.close()
        src = DaliBatchSource(self.samples, self.specs, self.seed, self.rank, self.world, self.batch_size,
                              self.steps_per_epoch, (self.epoch, self.step))
        max_hw = largest_image(self.samples.sizes)
        self.pipe = make_dali_pipeline(src, self.specs, self.batch_size, self.device_id, num_threads=self.threads,
                                       workers=self.workers, hw_decoder_load=self.hw_decoder_load, max_hw=max_hw,
                                       channels_last=self.channels_last, half=self.out_dtype != torch.float32)
        self.pipe.build()
        self.it = DALIGenericIterator([self.pipe], ["v1", "v2", "y"], auto_reset=True)
        self._at = (self.epoch, self.step)

    def _finish_views(self, v1, v2, y):
        if self.channels_last:  # NHWC from DALI: NCHW in channels-last memory by a permute, no copy
            v1, v2 = v1.permute(0, 3, 1, 2), v2.permute(0, 3, 1, 2)
        return super()._finish_views(v1, v2, y)

    def close(self):
        """Release the pipeline (and its worker processes), once no queued work reads its buffers."""
        self._held.release_all()
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
        last = None  # the batch handed out before: DALI's memory, held until the work reading it is done
        try:
            while True:
                try:
                    if self._at != (self.epoch, self.step):
                        self._build()  # runs the first batch already
                    if last is not None:
                        self._held.hold(last)
                        last = None
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
                last = b
                yield self._finish_views(b[0]["v1"], b[0]["v2"], b[0]["y"])
        finally:  # also when the consumer stops mid-epoch: its last batch may still be read on the device
            if last is not None:
                self._held.hold(last)
        if self.step != self.steps_per_epoch:
            raise RuntimeError(f"DALI ended epoch {self.epoch} after {self.step} of {self.steps_per_epoch} batches")
        self.epoch, self.step = self.epoch + 1, 0
        self._at = (self.epoch, 0)
