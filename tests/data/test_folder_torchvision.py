"""The torchvision nvJPEG path (``NvjpegTwoViewLoader``), run as its CPU twin (``decode_jpeg`` on the CPU):
batched crops equal per-image ones, a bounded number of ops per batch, CMYK and PNG-named-JPEG files decoded on
the CPU, full batches whatever the bad files, and the decode's ordering against the training stream (its
protocol with fakes here; the real race only on a GPU)."""

import io

import numpy as np
import pytest
import torch
from helpers import garbled_jpeg
from torch.utils._python_dispatch import TorchDispatchMode

from vssl_fast.data import augment as A


def _images(n, sizes=((375, 500), (500, 375), (333, 500), (40, 60)), seed=0):
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.integers(0, 256, (3, *sizes[i % len(sizes)]), dtype=np.uint8)) for i in range(n)]


def _boxes(hw, spec, seed=1):
    return np.stack(A.rrc_boxes(hw[:, 0].astype(np.float64), hw[:, 1].astype(np.float64), spec.scale, spec.ratio,
                                np.random.default_rng(seed)), axis=1).astype(np.int64)


def test_batched_crops_equal_torchvision_s_resized_crop_image_by_image():
    """Crops of images of four sizes, packed in size groups, equal torchvision's resized_crop of each image
    (bicubic, antialiased) to float32 rounding, in the images' order."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    imgs = _images(10)
    hw = np.array([im.shape[1:] for im in imgs])
    groups = A.size_groups(hw)
    assert sorted(np.concatenate(groups).tolist()) == list(range(10)) and len(groups) > 1  # 40x60 is an outlier
    boxes = _boxes(hw, A.view_specs("imagenet")[0])
    out = A.resized_crops(A.pack_images(imgs, groups), groups, boxes, 32)
    for k, (im, (t, left, h, w)) in enumerate(zip(imgs, boxes.tolist())):
        ref = TF.resized_crop(im.float() / 255, t, left, h, w, [32, 32], interpolation=InterpolationMode.BICUBIC,
                              antialias=True).clamp(0, 1)
        assert (out[k] - ref).abs().max() < 1e-5, k


def test_size_groups_bound_every_canvas():
    """Each group's zero-padded canvas stays within the element budget (unless one image alone exceeds it) and
    within CROP_WASTE times its images' own pixels; every image in exactly one group."""
    rng = np.random.default_rng(0)
    hw = np.concatenate([rng.integers(100, 600, (200, 2)), rng.integers(1000, 4000, (8, 2)), [[1, 1], [5000, 40]]])
    groups = A.size_groups(hw, budget=1 << 24)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(hw)))
    for idx in groups:
        h, w = hw[idx, 0].max(), hw[idx, 1].max()
        pixels = (hw[idx, 0] * hw[idx, 1]).sum()
        assert len(idx) == 1 or (len(idx) * h * w * 3 <= 1 << 24 and len(idx) * h * w <= A.CROP_WASTE * pixels)
    assert len(A.size_groups(np.full((256, 2), 200))) == 1  # a batch of one size within the budget: one group


class _Ops(TorchDispatchMode):
    """Counts the ATen ops that launch work (views, which only make a new tensor header, apart)."""

    def __init__(self):
        super().__init__()
        self.launches = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        else:
            self.launches += 1
        return func(*args, **(kwargs or {}))


def _count_batch(n):
    imgs = _images(n)
    hw = np.array([im.shape[1:] for im in imgs])
    specs = A.view_specs("imagenet", "asymmetric", 32)
    g = torch.Generator().manual_seed(0)
    with _Ops() as ops:
        groups = A.size_groups(hw)
        canvases = A.pack_images(imgs, groups)
        for s in specs:
            A.augment_images(canvases, groups, _boxes(hw, s), s, g)
    return ops, len(groups)


# Both views of a batch, CPU twin (the CPU skips colour ops no sample draws; a GPU computes them all): about
# 1,400 launches per batch plus 2.5 per image (the copy into its size group's canvas). Before, each image was
# cropped and resized alone: 314 launches per image (11,032 for 32 images), ~120k for a batch of 256 on a GPU.
PER_BATCH_BOUND, PER_IMAGE_BOUND = 1_600, 3


def test_the_nvjpeg_path_augments_a_batch_in_a_bounded_number_of_launches():
    small, g_small = _count_batch(8)
    large, g_large = _count_batch(32)
    assert g_small == g_large  # the same size groups: the difference is what each image costs
    per_image = (large.launches - small.launches) / (32 - 8)
    assert per_image <= PER_IMAGE_BOUND, per_image
    assert large.launches <= PER_BATCH_BOUND + PER_IMAGE_BOUND * 32, large.launches
    assert (large.views - small.views) / 24 <= 4  # the per-image slices of the canvas


def _tree(tmp_path, extra: dict):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "t"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (30 + 3 * i, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    for name, data in extra.items():
        (root / name).write_bytes(data)
    return root


def _cmyk_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (36, 48, 3), dtype=np.uint8)).convert("CMYK").save(
        buf, "JPEG")
    return buf.getvalue()


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _loader(root, tmp_path, bs=4):
    from vssl_fast.data.folder_files import BadFiles
    from vssl_fast.data.folder_torchvision import NvjpegTwoViewLoader

    return NvjpegTwoViewLoader(root, A.view_specs("imagenet", "asymmetric", 16), bs, 0, 0, 1, torch.device("cpu"), 0,
                               False, torch.float32, cache_dir=tmp_path / "cache", bad=BadFiles(max_fraction=0.2))


def test_jpeg_components_reads_the_frame_header():
    from PIL import Image

    from vssl_fast.data.folder_torchvision import jpeg_components

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, "JPEG")
    grey = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "JPEG", progressive=True)
    assert jpeg_components(grey) == 1 and jpeg_components(buf.getvalue()) == 3
    assert jpeg_components(_cmyk_jpeg()) == 4 and jpeg_components(_png()) is None
    assert jpeg_components(b"\xff\xd8\xff") is None and jpeg_components(b"") is None


def test_cmyk_and_png_named_jpeg_are_decoded_on_the_cpu_when_nvjpeg_cannot(tmp_path, monkeypatch):
    """nvJPEG refuses CMYK JPEGs and PNGs named .JPEG (both occur in ImageNet); decode_jpeg here is made to
    refuse them as nvJPEG does. Both come out as PIL decodes them, no file is counted bad, batches are full."""
    import torchvision.io

    from vssl_fast.data.folder_torchvision import decode_on_cpu, nvjpeg_decodable

    real = torchvision.io.decode_jpeg
    asked = []

    def nvjpeg_like(data, device=None, mode=None):
        datas = data if isinstance(data, list) else [data]
        asked.extend(len(d) for d in datas)
        if not all(nvjpeg_decodable(bytes(d.numpy())) for d in datas):
            raise RuntimeError("nvjpegDecodeBatched: NVJPEG_STATUS_JPEG_NOT_SUPPORTED")
        return real(data, device=device, mode=mode)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", nvjpeg_like)
    cmyk, png = _cmyk_jpeg(), _png()
    root = _tree(tmp_path, {"a/zz_cmyk.jpg": cmyk, "b/zz_png.JPEG": png})
    ld = _loader(root, tmp_path, bs=14)
    assert len(ld.samples) == 14 and len(ld.bad) == 0
    raw = [open(p, "rb").read() for p in ld.samples.paths]
    imgs, src = ld._decode(raw, list(range(14)))
    assert src == list(range(14)) and len(ld.bad) == 0
    for k, path in enumerate(ld.samples.paths):
        assert torch.equal(imgs[k], decode_on_cpu(raw[k])), path
    assert len(cmyk) not in asked and len(png) not in asked  # routed to the CPU by their headers, not by a failure
    v1, v2, y = next(iter(ld))
    assert v1.shape == v2.shape == (14, 3, 16, 16) and len(y) == 14 and len(ld.bad) == 0


def test_a_file_nothing_decodes_is_replaced_counted_and_the_batch_stays_full(tmp_path, caplog):
    """The garbled file passes the check (header and end marker fine) but neither nvJPEG nor PIL decodes it: it
    is counted once and logged once, its place in the batch taken by the next sample of the tree (its label
    too), the same in every run; every batch has batch_size images (CUDA graphs need static shapes)."""
    root = _tree(tmp_path, {"a/zz_garbled.jpg": garbled_jpeg()})
    import logging

    caplog.set_level(logging.WARNING, logger="vssl_fast")
    runs = []
    for _ in range(2):
        ld = _loader(root, tmp_path, bs=4)
        assert len(ld.samples) == 13 and len(ld.bad) == 0
        runs.append([b for _ in range(2) for b in ld])
        assert len(runs[-1]) == 2 * (13 // 4) and all(len(y) == v1.shape[0] == 4 for v1, _, y in runs[-1])
        assert len(ld.bad) == 1 and "zz_garbled.jpg" in next(iter(ld.bad.files))
    assert caplog.text.count("zz_garbled.jpg") == 2  # once per loader (two runs here)
    for a, b in zip(*runs):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    paths = ld.samples.paths
    bad = paths.index(str(root / "a" / "zz_garbled.jpg"))  # the last of class a
    imgs, src = ld._decode([open(p, "rb").read() for p in paths[bad - 1:bad + 2]], [bad - 1, bad, bad + 1])
    assert src == [bad - 1, bad + 1, bad + 1] and len(imgs) == 3  # the next sample, deterministically
    assert ld.samples.labels[src].tolist() == [0, 1, 1]  # with its label (class b)


class _FakeStream:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def synchronize(self):
        self.log.append(("synchronize", self.name))


def test_the_cuda_decode_runs_on_its_own_stream_and_waits_for_itself_not_for_training(tmp_path, monkeypatch):
    """The ordering protocol of _decode_batch on CUDA, with fakes (no GPU here): decode_jpeg is called under the
    loader's own stream, the host then waits for that stream, and every decoded image is recorded as used by
    the training (current) stream, so that its block is reused only after training's work on it. The real
    race (nvJPEG writing into blocks queued kernels still read) is test_decode_does_not_corrupt_training_memory."""
    import torchvision.io

    log = []
    main = _FakeStream(log, "main")

    class Img:
        def __init__(self, k):
            self.k = k

        def record_stream(self, s):
            log.append(("record_stream", self.k, s.name))

    current = [main]

    class Ctx:
        def __init__(self, s):
            self.s = s

        def __enter__(self):
            log.append(("enter", self.s.name))
            current.append(self.s)

        def __exit__(self, *a):
            current.pop()
            log.append(("exit", self.s.name))

    def fake_decode(datas, device=None, mode=None):
        log.append(("decode", current[-1].name, str(device)))
        return [Img(k) for k in range(len(datas))]

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream(log, "decode"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", Ctx)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", fake_decode)
    ld = _loader(_tree(tmp_path, {}), tmp_path)
    ld.device = torch.device("cuda", 0)  # the protocol only: nothing runs on a device here
    out = ld._decode_batch([torch.zeros(4, dtype=torch.uint8)] * 2)
    assert len(out) == 2
    assert log == [("enter", "decode"), ("decode", "decode", "cuda:0"), ("exit", "decode"), ("synchronize", "decode"),
                   ("record_stream", 0, "main"), ("record_stream", 1, "main")]


@pytest.mark.gpu
def test_decode_does_not_corrupt_training_memory(tmp_path):
    """pytorch/vision PR 9606's harness, small: queue slow work and reductions on the training stream, free
    their inputs while the reductions are queued, decode, then check every reduction. Decoding on the
    caller's stream corrupted 134 to 199 of 200 iterations on an H100 (nvJPEG's hardware path)."""
    from PIL import Image

    root = tmp_path / "t"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(root / "a" / f"{i}.jpg", quality=90)
    (root / "b").mkdir()
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(root / "b" / "0.jpg")
    from vssl_fast.data.folder_torchvision import NvjpegTwoViewLoader

    ld = NvjpegTwoViewLoader(root, A.view_specs("imagenet"), 4, 0, 0, 1, torch.device("cuda"), 0, False,
                             torch.float32, cache_dir=tmp_path / "cache")
    datas = [torch.frombuffer(bytearray(open(p, "rb").read()), dtype=torch.uint8) for p in ld.samples.paths[:8]]
    bad = 0
    for _ in range(50):
        ts = [torch.full((640 * 480 * 3 // 4,), float(k + 1), device="cuda") for k in range(8)]
        torch.cuda._sleep(50_000_000)
        sums = [t.sum() for t in ts]
        del ts  # freed while the reductions are queued
        ld._decode_batch(datas)
        bad += sum(int(s.item() != (k + 1) * (640 * 480 * 3 // 4)) for k, s in enumerate(sums))
    assert bad == 0


def test_only_what_nvjpeg_decodes_goes_to_the_gpu():
    """8-bit Huffman baseline/progressive frames of 1 or 3 components; lossless, arithmetic-coded and 12-bit
    frames (and CMYK, PNG) are decoded on the CPU up front instead of failing a batched GPU decode."""
    import io

    from PIL import Image

    from vssl_fast.data.folder_torchvision import jpeg_frame, nvjpeg_decodable

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "JPEG")
    base = buf.getvalue()
    marker, bits, comps = jpeg_frame(base)
    assert (marker, bits, comps) == (0xC0, 8, 3) and nvjpeg_decodable(base)
    at = base.index(bytes([0xFF, 0xC0]))
    for sof, precision, ok in ((0xC2, 8, True), (0xC3, 8, False), (0xC9, 8, False), (0xC1, 12, False)):
        b = bytearray(base)
        b[at + 1], b[at + 4] = sof, precision
        assert nvjpeg_decodable(bytes(b)) is ok, (hex(sof), precision)
    assert not nvjpeg_decodable(_cmyk_jpeg()) and not nvjpeg_decodable(_png())
