"""Batched two-view augmentations on the device, with per-sample random parameters (METHOD.md §3.4).

Every op takes a float batch [N, 3, H, W] in [0, 1] and per-sample parameters, and matches
torchvision's functional transform given the same parameters (tests hold each to it):

- ``resized_crop``: bicubic with antialias, as ``torchvision.transforms.v2.functional.resized_crop``
  (PIL's a = -0.5 cubic, window truncated to the crop and renormalised), done as two batched
  matrix products with per-sample interpolation matrices;
- ``color_jitter``: brightness, contrast, saturation, hue in a per-sample random order, as
  ``ColorJitter``; ``grayscale``; ``gaussian_blur`` (per-sample sigma, reflect padding, as
  ``F.gaussian_blur``); ``solarize`` (threshold 128/255: PIL's 128 on uint8); ``hflip``;
  ``normalize``.

``sample_params`` draws everything for a batch from one ``torch.Generator`` (the loader seeds it
from (seed, rank, epoch, step), so batches are deterministic, resumable and differ across ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ViewSpec", "view_specs", "sample_params", "augment", "augment_images", "size_groups", "pack_images",
           "resized_crops", "finish", "resized_crop", "color_jitter", "grayscale", "gaussian_blur", "solarize",
           "normalize", "rrc_params", "rrc_boxes", "MEANS_STDS"]

MEANS_STDS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "cifar_val": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),  # solo-learn's val transform, both CIFARs
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass(frozen=True)
class ViewSpec:
    crop_size: int
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    blur_kernel: int = 23
    solarize_p: float = 0.0
    flip_p: float = 0.5
    mean: tuple = MEANS_STDS["cifar10"][0]
    std: tuple = MEANS_STDS["cifar10"][1]


def view_specs(dataset: str, augmentations: str = "asymmetric", crop_size: int | None = None) -> tuple[ViewSpec, ViewSpec]:
    """The two pipelines of METHOD.md §3.4 (asymmetric BYOL) or A9's symmetric alternative."""
    cifar = dataset.startswith("cifar")
    size = crop_size or (32 if cifar else 224)
    mean, std = MEANS_STDS[dataset] if dataset in MEANS_STDS else MEANS_STDS["imagenet"]
    base = dict(crop_size=size, mean=mean, std=std)
    if augmentations == "symmetric":
        sym = dict(base, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur_p=0.5)
        return ViewSpec(**sym), ViewSpec(**sym)
    if cifar:
        return ViewSpec(**base), ViewSpec(**base, solarize_p=0.2)
    return ViewSpec(**base, blur_p=1.0), ViewSpec(**base, blur_p=0.1, solarize_p=0.2)


# ----------------------------------------------------------------------------- parameters
def rrc_params(n, H, W, scale, ratio, g, device, attempts: int = 10):
    """torchvision RandomResizedCrop.get_params, vectorised: first of 10 valid draws, else the centre fallback.

    Returns int64 tensors (top, left, height, width), each [n].
    """
    area = H * W
    u = torch.rand(n, attempts, 4, generator=g, device=device, dtype=torch.float64)
    target = area * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lr0 + u[..., 1] * (lr1 - lr0))
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=device))
    # fallback: whole image clipped to the ratio range, centred
    in_ratio = W / H
    if in_ratio < min(ratio):
        fw, fh = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = H, int(round(H * max(ratio)))
    else:
        fw, fh = W, H
    idx = first.clamp_min(0)
    pick = lambda t: t.gather(1, idx[:, None]).squeeze(1)  # noqa: E731
    hh, ww = pick(h), pick(w)
    top = (pick(u[..., 2]) * (H - hh + 1).double()).floor().long()
    left = (pick(u[..., 3]) * (W - ww + 1).double()).floor().long()
    has = first >= 0
    hh = torch.where(has, hh, torch.full_like(hh, fh))
    ww = torch.where(has, ww, torch.full_like(ww, fw))
    top = torch.where(has, top, torch.full_like(top, (H - fh) // 2))
    left = torch.where(has, left, torch.full_like(left, (W - fw) // 2))
    return top, left, hh, ww


def rrc_boxes(H: np.ndarray, W: np.ndarray, scale, ratio, rng: np.random.Generator, attempts: int = 10):
    """torchvision RandomResizedCrop.get_params per image (as ``rrc_params``, in numpy on the host, one size per
    image, float64 arrays of whole numbers): the first of 10 valid draws, else the centre crop clipped to the
    ratio range. The DALI source and the nvJPEG path draw their boxes here, from the images' sizes."""
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


def sample_params(spec: ViewSpec, n: int, H: int, W: int, g: torch.Generator, device) -> dict:
    """All random parameters of one view for a batch of n, drawn from ``g``."""
    top, left, h, w = rrc_params(n, H, W, spec.scale, spec.ratio, g, device)
    u = torch.rand(n, 9, generator=g, device=device)

    def factor(x, lo_hi):
        lo, hi = lo_hi
        return lo + x * (hi - lo)

    return dict(
        top=top, left=left, height=h, width=w,
        jitter=u[:, 0] < spec.jitter_p,
        brightness=factor(u[:, 1], (max(0.0, 1 - spec.brightness), 1 + spec.brightness)),
        contrast=factor(u[:, 2], (max(0.0, 1 - spec.contrast), 1 + spec.contrast)),
        saturation=factor(u[:, 3], (max(0.0, 1 - spec.saturation), 1 + spec.saturation)),
        hue=factor(u[:, 4], (-spec.hue, spec.hue)),
        order=torch.argsort(torch.rand(n, 4, generator=g, device=device), dim=1),
        gray=u[:, 5] < spec.gray_p,
        blur=u[:, 6] < spec.blur_p,
        sigma=factor(torch.rand(n, generator=g, device=device), spec.blur_sigma),
        solarize=u[:, 7] < spec.solarize_p,
        flip=u[:, 8] < spec.flip_p,
    )


# ----------------------------------------------------------------------------- ops
def _cubic_aa(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic filter (a = -0.5), which torch's antialiased resize uses."""
    a = -0.5
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _interp_matrix(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, dtype) -> torch.Tensor:
    """[n, out, in] antialiased bicubic weights mapping crop [start, start + length) to out_size samples."""
    dev = start.device
    scale = length.to(torch.float64) / out_size  # [n]
    support = 2.0 * scale.clamp_min(1.0)
    invscale = 1.0 / scale.clamp_min(1.0)
    center = scale[:, None] * (torch.arange(out_size, device=dev, dtype=torch.float64)[None, :] + 0.5)  # [n, out]
    xmin = torch.trunc(center - support[:, None] + 0.5).clamp_min(0)
    xmax = torch.minimum(torch.trunc(center + support[:, None] + 0.5), length[:, None].to(torch.float64))
    k = torch.arange(in_size, device=dev, dtype=torch.float64)[None, None, :] - start[:, None, None].to(torch.float64)
    inside = (k >= xmin[..., None]) & (k < xmax[..., None])
    w = _cubic_aa((k - center[..., None] + 0.5) * invscale[:, None, None]) * inside
    w = w / w.sum(-1, keepdim=True)
    return w.to(dtype)


def resized_crop(x: torch.Tensor, top, left, height, width, size: int) -> torch.Tensor:
    """Per-sample crop then bicubic antialiased resize to size x size; x is float [n, C, H, W]."""
    n, _, H, W = x.shape
    wr = _interp_matrix(top, height, H, size, x.dtype)  # [n, S, H]
    wc = _interp_matrix(left, width, W, size, x.dtype)  # [n, S, W]
    y = torch.matmul(x, wc.transpose(1, 2)[:, None])  # horizontal pass: [n, C, H, S]
    return torch.matmul(wr[:, None], y)  # vertical pass: [n, C, S, S]


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(a, b, ratio):
    return (ratio * a + (1.0 - ratio) * b).clamp(0.0, 1.0)


def _rgb_to_hsv(x):
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, minc = x.max(1).values, x.min(1).values
    flat = maxc == minc
    delta = maxc - minc
    one = torch.ones_like(maxc)
    s = delta / torch.where(flat, one, maxc)
    d = torch.where(flat, one, delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), h)
    return torch.fmod(h / 6.0 + 1.0, 1.0), s, maxc


def _hsv_to_rgb(h, s, v):
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    # the six sectors of the hue circle: (r, g, b) for i = 0..5
    r = torch.stack((v, q, p, p, t, v), 1).gather(1, i[:, None]).squeeze(1)
    g = torch.stack((t, v, v, q, p, p), 1).gather(1, i[:, None]).squeeze(1)
    b = torch.stack((p, p, t, v, v, q), 1).gather(1, i[:, None]).squeeze(1)
    return torch.stack((r, g, b), 1)


def _adjust_hue(x, hue):
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + hue[:, None, None], 1.0)
    return _hsv_to_rgb(h, s, v)


def color_jitter(x, p: dict) -> torch.Tensor:
    """Brightness, contrast, saturation and hue in each sample's own order, for samples with p['jitter']."""
    b = p["brightness"].to(x.dtype)[:, None, None, None]
    c = p["contrast"].to(x.dtype)[:, None, None, None]
    s = p["saturation"].to(x.dtype)[:, None, None, None]
    out = x
    for k in range(4):
        op = p["order"][:, k]
        cand = {
            0: lambda y: _blend(y, torch.zeros_like(y), b),
            1: lambda y: _blend(y, _gray(y).mean(dim=(1, 2, 3), keepdim=True), c),
            2: lambda y: _blend(y, _gray(y), s),
            3: lambda y: _adjust_hue(y, p["hue"].to(x.dtype)),
        }
        new = out
        for idx, fn in cand.items():
            sel = op == idx
            # on the CPU skip an op no sample needs now (on a GPU that test would be a host sync)
            if out.device.type != "cpu" or bool(sel.any()):
                new = torch.where(sel[:, None, None, None], fn(out), new)
        out = new
    return torch.where(p["jitter"][:, None, None, None], out, x)


def grayscale(x, on) -> torch.Tensor:
    return torch.where(on[:, None, None, None], _gray(x).expand_as(x), x)


def gaussian_blur(x, sigma, on, kernel: int = 23) -> torch.Tensor:
    """Separable Gaussian with per-sample sigma and reflect padding (torchvision's tensor blur)."""
    n, C, H, W = x.shape
    half = (kernel - 1) * 0.5
    t = torch.linspace(-half, half, kernel, device=x.device, dtype=x.dtype)
    k1 = torch.exp(-0.5 * (t[None, :] / sigma.to(x.dtype)[:, None]) ** 2)
    k1 = k1 / k1.sum(1, keepdim=True)  # [n, k]
    pad = kernel // 2
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, n * C, H + 2 * pad, W + 2 * pad)
    kh = k1.repeat_interleave(C, 0)[:, None, None, :]  # [nC, 1, 1, k]
    kv = k1.repeat_interleave(C, 0)[:, None, :, None]
    y = F.conv2d(y, kh, groups=n * C)
    y = F.conv2d(y, kv, groups=n * C).reshape(n, C, H, W)
    return torch.where(on[:, None, None, None], y, x)


def solarize(x, on, threshold: float = 128 / 255) -> torch.Tensor:
    return torch.where(on[:, None, None, None] & (x >= threshold), 1.0 - x, x)


def normalize(x, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype)[None, :, None, None]
    s = torch.tensor(std, device=x.device, dtype=x.dtype)[None, :, None, None]
    return (x - m) / s


def finish(x: torch.Tensor, p: dict, spec: ViewSpec) -> torch.Tensor:
    """Everything after the crop: jitter, grayscale, blur, solarize, flip, normalise (float [n, 3, S, S])."""
    if spec.jitter_p > 0:
        x = color_jitter(x, p)
    if spec.gray_p > 0:
        x = grayscale(x, p["gray"])
    if spec.blur_p > 0:
        x = gaussian_blur(x, p["sigma"], p["blur"], spec.blur_kernel)
    if spec.solarize_p > 0:
        x = solarize(x, p["solarize"])
    x = torch.where(p["flip"][:, None, None, None], x.flip(-1), x)
    return normalize(x, spec.mean, spec.std)


def augment(x_uint8: torch.Tensor, spec: ViewSpec, g: torch.Generator, rows: slice | None = None) -> torch.Tensor:
    """One augmented view of a uint8 batch [n, 3, H, W] (device-resident), float32 normalised.

    ``rows``: only those rows of the batch, with the parameters drawn for all n (a process's slice of
    a global batch, pixel for pixel what the whole batch gives there)."""
    n, _, H, W = x_uint8.shape
    p = sample_params(spec, n, H, W, g, x_uint8.device)
    if rows is not None:
        x_uint8, p = x_uint8[rows], {k: v[rows] for k, v in p.items()}
    x = x_uint8.float().div_(255.0)
    x = resized_crop(x, p["top"], p["left"], p["height"], p["width"], spec.crop_size).clamp_(0.0, 1.0)
    return finish(x, p, spec)


CROP_BUDGET = 1 << 26  # elements of one float canvas of a size group (256 MB in float32)
CROP_WASTE = 1.5  # a group's canvas holds at most this many times its images' pixels


def size_groups(hw: np.ndarray, budget: int = CROP_BUDGET, waste: float = CROP_WASTE) -> list[np.ndarray]:
    """Images of sizes ``hw`` [n, 2] in groups that share one zero-padded canvas: sorted by area, an image joins
    the current group while the canvas (images x max height x max width x 3) stays within ``budget`` elements and
    ``waste`` times the group's own pixels. A batch of similar sizes is one group; outliers get their own."""
    order = np.argsort(hw[:, 0].astype(np.int64) * hw[:, 1], kind="stable")
    groups, cur, hmax, wmax, px = [], [], 0, 0, 0
    for i in order:
        h, w = int(hw[i, 0]), int(hw[i, 1])
        nh, nw, npx = max(hmax, h), max(wmax, w), px + h * w
        if cur and ((len(cur) + 1) * nh * nw * 3 > budget or (len(cur) + 1) * nh * nw > waste * npx):
            groups.append(np.asarray(cur))
            cur, nh, nw, npx = [], h, w, h * w
        cur.append(int(i))
        hmax, wmax, px = nh, nw, npx
    if cur:
        groups.append(np.asarray(cur))
    return groups


def pack_images(images: list[torch.Tensor], groups: list[np.ndarray]) -> list[torch.Tensor]:
    """Each group's uint8 images [3, H_i, W_i] in one float canvas [g, 3, max H, max W] in [0, 1], zero-padded:
    one copy per image, shared by both views (the crops' weights are zero outside each image's crop)."""
    canvases = []
    for idx in groups:
        hmax = max(images[i].shape[1] for i in idx)
        wmax = max(images[i].shape[2] for i in idx)
        canvas = images[idx[0]].new_zeros((len(idx), 3, hmax, wmax))
        for k, i in enumerate(idx):
            canvas[k, :, : images[i].shape[1], : images[i].shape[2]] = images[i]
        canvases.append(canvas.float().div_(255.0))
    return canvases


def resized_crops(canvases: list[torch.Tensor], groups: list[np.ndarray], boxes: np.ndarray, size: int) -> torch.Tensor:
    """The crops ``boxes`` [n, 4] (top, left, height, width per image, host integers) of the packed images,
    each resized to size x size as ``resized_crop`` (bicubic, antialiased): two batched matrix products per
    size group, float [n, 3, size, size] clamped to [0, 1], in the images' order."""
    dev = canvases[0].device
    b = torch.as_tensor(np.asarray(boxes, np.int64)).to(dev, non_blocking=True)  # one copy of 4 numbers per image
    order = torch.as_tensor(np.concatenate(groups)).to(dev, non_blocking=True)
    outs = []
    for idx, x in zip(groups, canvases):
        bb = b.index_select(0, torch.as_tensor(idx).to(dev, non_blocking=True))
        wr = _interp_matrix(bb[:, 0], bb[:, 2], x.shape[2], size, x.dtype)  # [g, S, H]
        wc = _interp_matrix(bb[:, 1], bb[:, 3], x.shape[3], size, x.dtype)  # [g, S, W]
        outs.append(torch.matmul(wr[:, None], torch.matmul(x, wc.transpose(1, 2)[:, None])))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return torch.empty_like(out).index_copy_(0, order, out).clamp_(0.0, 1.0)  # back to the images' order


def augment_images(canvases, groups, boxes: np.ndarray, spec: ViewSpec, g: torch.Generator) -> torch.Tensor:
    """One view of decoded images of different sizes (packed by ``pack_images``; e.g. nvJPEG output): the crops
    ``boxes`` (drawn on the host from the images' own sizes, ``rrc_boxes``) resized batched per size group,
    the rest of the pipeline batched over the whole batch, parameters from ``g``. A bounded number of
    launches per batch: per size group, not per image (tests/data/test_folder_torchvision.py counts them)."""
    n = len(boxes)
    p = sample_params(spec, n, 1, 1, g, canvases[0].device)  # the non-crop parameters, batched
    return finish(resized_crops(canvases, groups, boxes, spec.crop_size), p, spec)
