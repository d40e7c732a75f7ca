"""DALI's views are torchvision's: each op of the pipeline against ``torchvision.transforms.v2.functional`` given
the same parameters, on real JPEG photographs (DALI's CPU-only mode), and the GPU pipeline's graph, built in
Python without a GPU (its device, decoder and operator placement).

Tolerances, in levels of 0..255 (each DALI stage rounds to uint8; the reference is torchvision on floats):
- brightness, contrast, hue, blur: 0.5 (rounding) + 0.01 (float32);
- saturation: 0.5 + 0.15: DALI's hsv op blends with the luma through YIQ matrices that are rounded inverses of
  each other (measured 0.13 on top of the rounding);
- grayscale: 0.5 + 0.03: DALI's luma weights (0.299, 0.587, 0.114) against torchvision's 0.2989 for red;
- solarize, flip, normalisation: exact (integer ops; the same float32 normalisation);
- the crop's resize: DALI is PIL's antialiased cubic filter with the edge pixel repeated past the crop's
  edge, to 0.5 + 0.1 (DALI samples the filter from float32 tables: measured 0.06); torchvision drops the
  taps past the edge and renormalises. So: 0.6 wherever the filter window lies inside the crop, and
  everywhere 0.6 plus the difference of the two edge rules, computed here exactly from the filter weights.
"""

import dataclasses
import io
import tarfile

import numpy as np
import pytest
import torch

from vssl_fast.data.augment import view_specs

pytest.importorskip("nvidia.dali", reason="DALI is the optional 'dali' extra")

ROUND = 0.5
TOL = {"brightness": ROUND + 0.01, "contrast": ROUND + 0.01, "saturation": ROUND + 0.15, "hue": ROUND + 0.01,
       "gray": ROUND + 0.03, "blur": ROUND + 0.01, "solarize": 0.0, "resize": ROUND + 0.1}
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


@pytest.fixture(scope="module")
def photos(cifar_tiny_tar, tmp_path_factory):
    """Real JPEG photographs: CIFAR-10 files as they are (32x32) and, at ImageNet-like sizes (500x375 down to
    97x131), mosaics of CIFAR photographs upsampled and saved as JPEG (quality 90)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    with tarfile.open(cifar_tiny_tar) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        raw = [tf.extractfile(m).read() for m in members[:120]]
    tiles = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in raw]
    rng = np.random.default_rng(0)
    files = []
    for k, (w, h) in enumerate([(500, 375), (320, 240), (200, 300), (97, 131)]):
        canvas = np.zeros((-(-h // 32) * 32, -(-w // 32) * 32, 3), np.uint8)
        for y in range(0, canvas.shape[0], 32):
            for x in range(0, canvas.shape[1], 32):
                canvas[y:y + 32, x:x + 32] = tiles[rng.integers(len(tiles))]
        img = Image.fromarray(canvas[:h, :w])
        smooth = img.resize((w // 3, h // 3), Image.BILINEAR).resize((w, h), Image.BICUBIC)
        blend = ((np.asarray(smooth, np.float32) + np.asarray(img.resize((w, h), Image.BICUBIC), np.float32)) / 2)
        files.append(root / f"mosaic{k}.jpg")
        Image.fromarray(blend.astype(np.uint8)).save(files[-1], quality=90)
    for k, b in enumerate(raw[:4]):
        files.append(root / f"cifar{k}.jpg")
        files[-1].write_bytes(b)
    return files


def _decoded(path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).double()  # 0..255, CHW


def _run_taps(files, specs, params, device_id=None):
    """Every stage of both views for one batch of ``files`` with the given parameters [B, 2, N_VIEW_PARAMS]
    (``device_id``: the GPU pipeline, mixed decode)."""
    from vssl_fast.data.folder_dali import make_dali_pipeline, view_stages

    raw = [np.fromfile(f, np.uint8) for f in files]
    labels = np.zeros((len(files), 1), np.int32)
    pipe = make_dali_pipeline(lambda info: (raw, labels, params), specs, len(files), device_id, 1, taps=True)
    pipe.build()
    out = [t.as_cpu() if hasattr(t, "as_cpu") else t for t in pipe.run()]
    n1 = len(view_stages(specs[0]))
    taps = [np.stack([np.array(t[i]) for i in range(len(files))]) for t in out[3:]]
    return [dict(zip(view_stages(specs[0]), taps[:n1])), dict(zip(view_stages(specs[1]), taps[n1:]))]


def _pil_cubic_weights(n_in: int, n_out: int, repeat_edge: bool) -> np.ndarray:
    """[n_out, n_in] weights of PIL's antialiased cubic (a = -0.5), which torchvision's resize uses: taps past
    the edge either dropped with the rest renormalised (torchvision, PIL) or moved to the edge pixel (DALI)."""
    from vssl_fast.data.augment import _cubic_aa

    scale = n_in / n_out
    support, ss = 2 * max(scale, 1.0), 1 / max(scale, 1.0)
    m = np.zeros((n_out, n_in))
    for j in range(n_out):
        c = (j + 0.5) * scale
        k = np.arange(int(np.floor(c - support + 0.5)) - 1, int(np.floor(c + support + 0.5)) + 1)
        w = _cubic_aa(torch.from_numpy((k - c + 0.5) * ss)).numpy()
        if not repeat_edge:
            w = w * ((k >= 0) & (k < n_in))
        np.add.at(m[j], np.clip(k, 0, n_in - 1), w / w.sum())
    return m


def _params(files, specs, seed=0):
    from vssl_fast.data.folder_dali import dali_view_params

    hw = np.array([_decoded(f).shape[1:] for f in files])
    rng = np.random.default_rng(seed)
    return np.stack([dali_view_params(s, hw, rng) for s in specs], axis=1)


def _check_view(spec, taps, i, path, p, seen: dict, border: list) -> None:
    """Sample ``i`` of one view, stage by stage, against torchvision given DALI's previous stage."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    from vssl_fast.data.folder_dali import JITTER_STAGE

    def stage(name):
        return torch.from_numpy(taps[name][i]).permute(2, 0, 1).double()

    # the crop: DALI = PIL's filter with the edge repeated; torchvision = PIL's with the taps past it dropped
    crop = spec.crop_size
    t, left, h, w = (int(x) for x in p[:4])
    src = _decoded(path)
    img = src[:, t:t + h, left:left + w].numpy()
    got = stage("crop")
    ref = TF.resized_crop(src, t, left, h, w, [crop, crop], interpolation=InterpolationMode.BICUBIC,
                          antialias=True).clamp(0, 255)
    rows_r, cols_r = _pil_cubic_weights(h, crop, True), _pil_cubic_weights(w, crop, True)
    rows_t, cols_t = _pil_cubic_weights(h, crop, False), _pil_cubic_weights(w, crop, False)
    model = torch.from_numpy(rows_r @ img @ cols_r.T).clamp(0, 255)
    edge_rule = (model - torch.from_numpy(rows_t @ img @ cols_t.T).clamp(0, 255)).abs()
    assert (got - model).abs().max() <= TOL["resize"], path
    assert ((got - ref).abs() <= TOL["resize"] + edge_rule + 1e-9).all(), path
    inside = torch.from_numpy((np.abs(rows_r - rows_t).sum(1) < 1e-12)[:, None]
                              & (np.abs(cols_r - cols_t).sum(1) < 1e-12)[None, :])
    assert inside.any() and (got - ref).abs()[:, inside].max() <= TOL["resize"], path
    border.append((got - ref).abs()[:, ~inside].max().item() if (~inside).any() else 0.0)
    prev = got
    ops = {"brightness": lambda x: TF.adjust_brightness(x, float(p[4])),
           "contrast": lambda x: TF.adjust_contrast(x, float(p[5])),
           "saturation": lambda x: TF.adjust_saturation(x, float(p[6])),
           "hue": lambda x: TF.adjust_hue(x, float(p[7])),
           "gray": lambda x: TF.rgb_to_grayscale(x, 3),
           "blur": lambda x: TF.gaussian_blur(x, [23, 23], [float(p[11])] * 2),
           "solarize": lambda x: TF.solarize(x, 128 / 255)}
    for k in range(4):  # ColorJitter: the sample's own order, each op on the previous op's output
        op = int(p[JITTER_STAGE + k])
        got = stage(f"jitter{k}")
        if op < 0:
            assert torch.equal(got, prev)
            continue
        name = JITTER_OPS[op]
        assert (got - ops[name](prev / 255) * 255).abs().max() <= TOL[name], (name, path, k)
        seen[name] += 1
        prev = got
    for name, coin in (("gray", 9), ("blur", 10), ("solarize", 12)):
        got = stage(name)
        if p[coin] > 0:
            assert (got - ops[name](prev / 255) * 255).abs().max() <= TOL[name] + 1e-9, (name, path)
            seen[name] += 1
        else:
            assert torch.equal(got, prev), name
        prev = got
    x = TF.hflip(prev / 255) if p[13] > 0 else prev / 255
    seen["flip"] += int(p[13] > 0)
    out = torch.from_numpy(taps["out"][i]).double()
    assert (out - TF.normalize(x, spec.mean, spec.std)).abs().max() <= 1e-5


@pytest.mark.parametrize("crop", [24, 40])
def test_dali_view_equals_torchvision_op_by_op(photos, crop):
    """Every stage of a DALI view against torchvision's functional op on the previous DALI stage, with the
    parameters DALI got: crop box, jitter factors in the sample's own order, grayscale, blur sigma, solarize,
    flip. Coins at 0.5 so that every op runs on some samples and is skipped (unchanged, exactly) on others;
    crops of 24 mostly downscale, 40 upscales the 32x32 photographs."""
    files = (photos * 3)[:20]
    base = view_specs("imagenet", "asymmetric", crop)
    specs = tuple(dataclasses.replace(s, jitter_p=0.9, gray_p=0.5, blur_p=0.5, solarize_p=0.5) for s in base)
    params = _params(files, specs)
    seen = {op: 0 for op in (*JITTER_OPS, "gray", "blur", "solarize", "flip")}
    border = []
    for v, (spec, taps) in enumerate(zip(specs, _run_taps(files, specs, params))):
        for i, f in enumerate(files):
            _check_view(spec, taps, i, f, params[i, v], seen, border)
    assert min(seen.values()) >= 3, seen  # every op met on several samples, in several stages
    assert max(border) > 1.0  # the edge rule is real (not an accident of this data) and within its bound above


def test_jitter_order_is_a_uniform_random_permutation_per_sample():
    """ColorJitter draws torch.randperm(4) per call: DALI's parameters carry one permutation per sample
    (all 24 appear, about equally often), and -1 in every stage when the jitter coin is off."""
    from vssl_fast.data.folder_dali import JITTER_STAGE, dali_view_params

    spec = view_specs("imagenet", "asymmetric", 224)[0]
    p = dali_view_params(spec, np.full((24_000, 2), 300), np.random.default_rng(0))
    on = p[:, 8] > 0
    assert abs(on.mean() - spec.jitter_p) < 0.01 and (p[~on, JITTER_STAGE:] == -1).all()
    orders = p[on, JITTER_STAGE:].astype(int)
    assert (np.sort(orders, 1) == np.arange(4)).all()
    _, counts = np.unique(orders, axis=0, return_counts=True)
    assert len(counts) == 24 and counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()
    assert (np.abs(p[:, 7]) <= spec.hue).all() and p[:, 7].min() < -0.09 and p[:, 7].max() > 0.09  # hue: fraction


def test_dali_keeps_constant_grey_images_grey_and_only_brightness_scales_them(tmp_path):
    """Constant grey images (value 60: solarisation never fires): contrast, saturation, hue, grayscale and blur
    leave them as they are, so each view is constant and view / source is the brightness factor, within
    [0.6, 1.4] (rounding aside) over many views, as through torchvision. Contrast centred at 0.5 of the range,
    as DALI's colour twist on float data did, took the ratio to 0.435..1.911."""
    from PIL import Image

    from vssl_fast.data.folder_dali import DaliTwoViewLoader

    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(16):
            Image.fromarray(np.full((48 + 8 * i, 64, 3), 60, np.uint8)).save(tmp_path / "train" / c / f"{i}.jpg",
                                                                            quality=95)
    specs = view_specs("imagenet", "asymmetric", 32)
    ld = DaliTwoViewLoader(tmp_path / "train", specs, 8, 0, 0, 1, torch.device("cpu"), False, torch.float32,
                           cache_dir=tmp_path / "cache")
    ratios = []
    for _ in range(3):
        for v1, v2, _ in ld:
            for v, spec in ((v1, specs[0]), (v2, specs[1])):
                m = torch.tensor(spec.mean)[None, :, None, None]
                s = torch.tensor(spec.std)[None, :, None, None]
                px = (v * s + m) * 255  # back to levels
                assert (px.amax((1, 2, 3)) - px.amin((1, 2, 3))).max() <= 1.01  # still constant (grey, rounding)
                ratios.append(px.mean((1, 2, 3)) / 60)
    r = torch.cat(ratios)
    assert len(r) == 3 * 4 * 8 * 2
    assert r.min() >= 0.6 - 0.6 / 60 and r.max() <= 1.4 + 0.6 / 60, (r.min(), r.max())
    assert r.min() < 0.7 and r.max() > 1.3  # the whole brightness range is met


def _graph(pipe) -> list:
    """(operator name, device, its arguments) of a pipeline's graph, built in Python only (no GPU needed)."""
    pipe._build_graph()
    return [(type(op._op).__name__, op._op.device, dict(getattr(op._op, "_init_args", {}) or {})) for op in pipe._ops]


@pytest.mark.parametrize("augs", ["asymmetric", "symmetric"])
def test_the_gpu_pipeline_decodes_with_nvjpeg_and_keeps_images_on_the_gpu(augs):
    """device_id given: the decoder is DALI's mixed one with the memory hints of the tree's largest image, and
    every op on images runs on the GPU. Built in Python without a GPU, which also checks DALI's placement rules
    (a GPU output used as a named argument is refused here, as it would be on a card)."""
    from vssl_fast.data.folder_dali import MIN_PADDING, make_dali_pipeline

    specs = view_specs("imagenet", augs, 224)
    pipe = make_dali_pipeline(lambda info: None, specs, 4, device_id=3, num_threads=5, hw_decoder_load=0.4,
                              max_hw=(4000, 3000), channels_last=True, half=True)
    assert pipe.device_id == 3 and pipe.num_threads == 5
    ops = _graph(pipe)
    (dec,) = [(d, a) for name, d, a in ops if name == "Image"]
    assert dec[0] == "mixed"
    assert dec[1]["hw_decoder_load"] == 0.4 and dec[1]["jpeg_fancy_upsampling"] is True
    assert dec[1]["device_memory_padding"] == dec[1]["host_memory_padding"] == 35 << 20  # 4000 x 3000 x 3 bytes, in whole MiB
    assert (dec[1]["preallocate_height_hint"], dec[1]["preallocate_width_hint"]) == (4000, 3000)
    on_images = {"Slice", "Resize", "BrightnessContrast", "Hsv", "GaussianBlur", "ColorSpaceConversion", "Cat",
                 "CropMirrorNormalize"}
    assert on_images <= {name for name, _, _ in ops}
    assert all(d == "gpu" for name, d, _ in ops if name in on_images)
    cmn = [a for name, _, a in ops if name == "CropMirrorNormalize"]
    assert len(cmn) == 2 and all(a["output_layout"] == "HWC" for a in cmn)
    small = _graph(make_dali_pipeline(lambda info: None, specs, 4, device_id=0, max_hw=(32, 32)))
    assert [a["device_memory_padding"] for name, _, a in small if name == "Image"] == [MIN_PADDING]
    cpu = _graph(make_dali_pipeline(lambda info: None, specs, 4, device_id=None))
    assert [d for name, d, _ in cpu if name == "Image"] == ["cpu"] and all(d == "cpu" for _, d, _ in cpu)


@pytest.mark.parametrize("form", ["cuda", "cuda:1"])
def test_the_dali_loader_builds_the_gpu_pipeline_for_any_cuda_device_form(small_jpegs, monkeypatch, form):
    """torch.device('cuda') has no index; the loader resolves it to the current device (here 2, faked) instead
    of handing DALI None, which builds the CPU-only pipeline. What make_dali_pipeline gets is recorded."""
    from vssl_fast.data import folder_dali

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    got = {}

    class Built(Exception):
        pass

    def record(source, specs, batch_size, device_id=None, **kw):
        got.update(kw, device_id=device_id)
        raise Built

    monkeypatch.setattr(folder_dali, "make_dali_pipeline", record)
    root, cache = small_jpegs
    ld = folder_dali.DaliTwoViewLoader(root, view_specs("imagenet", "asymmetric", 16), 2, 0, 0, 1, torch.device(form),
                                       True, torch.bfloat16, cache_dir=cache, threads=3, hw_decoder_load=0.5)
    with pytest.raises(Built):
        next(iter(ld))
    want = 2 if form == "cuda" else 1
    assert got["device_id"] == want and ld.device == torch.device("cuda", want)
    assert got["num_threads"] == 3 and got["hw_decoder_load"] == 0.5 and got["channels_last"] and got["half"]
    assert got["max_hw"] == (40, 56)
    assert f"GPU mixed decode (nvJPEG) on cuda:{want}" in ld.describe()


@pytest.fixture
def small_jpegs(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "t" / c).mkdir(parents=True)
        for i, (h, w) in enumerate([(24, 32), (40, 56), (33, 17), (16, 16)]):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "t" / c / f"{i}.jpg")
    return tmp_path / "t", tmp_path / "cache"


def test_dali_views_come_out_channels_last_without_a_copy(small_jpegs):
    """channels_last: CropMirrorNormalize writes NHWC and the loader permutes it into a channels-last NCHW
    tensor, the same memory: no copy after DALI's (counted with a dispatch mode), the same values as NCHW."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vssl_fast.data.folder_dali import DaliTwoViewLoader

    root, cache = small_jpegs
    specs = view_specs("imagenet", "asymmetric", 16)
    nchw = next(iter(DaliTwoViewLoader(root, specs, 4, 0, 0, 1, torch.device("cpu"), False, torch.float32,
                                       cache_dir=cache)))
    ld = DaliTwoViewLoader(root, specs, 4, 0, 0, 1, torch.device("cpu"), True, torch.float32, cache_dir=cache)
    ld._build()
    raw = next(ld.it)[0]  # batch 0 as DALI hands it over

    class Copies(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            copying = func.overloadpacket in (torch.ops.aten.copy_, torch.ops.aten.clone, torch.ops.aten._to_copy)
            if copying and args[0].dim() == 4:  # of a view (the labels become int64: a copy of 4 numbers)
                Copies.n += 1
            return func(*args, **(kwargs or {}))

    with Copies():
        v1, v2, y = ld._finish_views(raw["v1"], raw["v2"], raw["y"])
    assert Copies.n == 0 and v1.data_ptr() == raw["v1"].data_ptr() and raw["v1"].shape == (4, 16, 16, 3)
    assert v1.is_contiguous(memory_format=torch.channels_last) and v1.shape == nchw[0].shape
    assert torch.equal(v1, nchw[0]) and torch.equal(v2, nchw[1]) and torch.equal(y, nchw[2])
    # 16-bit training images: DALI writes float16 (half the bytes), one conversion to bfloat16, channels-last kept
    bf = next(iter(DaliTwoViewLoader(root, specs, 4, 0, 0, 1, torch.device("cpu"), True, torch.bfloat16,
                                     cache_dir=cache)))
    assert bf[0].dtype == torch.bfloat16 and bf[0].is_contiguous(memory_format=torch.channels_last)
    assert (bf[0].float() - nchw[0]).abs().max() <= 2.7 * 2 ** -8  # |values| < 2.7: one bfloat16 rounding


def test_dali_buffers_stay_held_until_the_work_that_reads_them_is_done(small_jpegs):
    """DALI's zero-copy outputs are DALI's memory, reused as soon as their last reference goes: each batch is
    held from the request for the next one until an event recorded then has completed (faked here: a GPU
    that finishes only when told), the oldest waited for beyond the limit, all released at close."""
    import weakref

    from vssl_fast.data.folder_dali import DaliTwoViewLoader, HeldUntilDone

    class Event:
        made = []

        def __init__(self):
            self.done = False
            Event.made.append(self)

        def record(self):
            pass

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True

    root, cache = small_jpegs
    ld = DaliTwoViewLoader(root, view_specs("imagenet", "asymmetric", 16), 1, 0, 0, 1, torch.device("cpu"), True,
                           torch.float32, cache_dir=cache)  # 8 batches of 1 in the epoch
    ld._held = HeldUntilDone(Event)
    ld._held.LIMIT = 2
    it = iter(ld)
    v = next(it)[0]  # a channels-last view of DALI's own tensor
    first = weakref.ref(v._base)
    del v  # the trainer drops its views when it asks for the next batch
    next(it)
    assert first() is not None and len(ld._held.held) == 1, "batch 0 was released while its step may still run"
    Event.made[0].done = True  # the device finished the step that read batch 0
    next(it)
    assert first() is None and len(ld._held.held) == 1  # released at the next request, without a wait
    next(it)
    next(it)  # two held and one more: beyond the limit the oldest is waited for
    assert len(ld._held.held) == 2 and Event.made[1].done
    ld.close()
    assert not ld._held.held and all(e.done for e in Event.made)


@pytest.mark.gpu
def test_gpu_views_equal_the_cpu_views(photos):
    """The GPU pipeline (nvJPEG decode, the GPU kernels of every op) against the CPU pipeline that the
    torchvision comparison above checks, stage by stage, on the same parameters. Decoders differ by an
    IDCT rounding (a level or two, 0-255) which the later stages carry along: mean |diff| <= 1 level,
    max <= 12 levels per stage (normalised outputs: the same in units of the normalisation's std)."""
    files = (photos * 3)[:20]
    specs = tuple(dataclasses.replace(s, jitter_p=0.9, gray_p=0.5, blur_p=0.5, solarize_p=0.5)
                  for s in view_specs("imagenet", "asymmetric", 24))
    params = _params(files, specs)
    cpu, gpu = _run_taps(files, specs, params), _run_taps(files, specs, params, device_id=0)
    for v in range(2):
        for stage, a in cpu[v].items():
            levels = 255 * 0.225 if stage == "out" else 1.0  # the output is normalised: std ~0.225 of 1.0
            d = np.abs(a.astype(np.float64) - gpu[v][stage].astype(np.float64)) * levels
            assert d.mean() <= 1.0 and d.max() <= 12.0, (v, stage, d.mean(), d.max())
