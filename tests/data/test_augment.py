"""Each batched device augmentation against torchvision's functional transform, given the same parameters."""

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from vssl_fast.data import augment as A


def _imgs(n=6, H=32, W=40, seed=0):
    return torch.rand(n, 3, H, W, generator=torch.Generator().manual_seed(seed))


def _params(spec, n, H, W, seed=1):
    return A.sample_params(spec, n, H, W, torch.Generator().manual_seed(seed), "cpu")


@pytest.mark.parametrize("size", [24, 32, 12])  # up-, same- and down-scaling (antialias)
def test_resized_crop_matches_torchvision(size):
    x = _imgs()
    p = _params(A.ViewSpec(crop_size=size), 6, 32, 40)
    y = A.resized_crop(x, p["top"], p["left"], p["height"], p["width"], size)
    for i in range(6):
        ref = TF.resized_crop(x[i], int(p["top"][i]), int(p["left"][i]), int(p["height"][i]), int(p["width"][i]),
                              [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        torch.testing.assert_close(y[i], ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_each_jitter_op_matches_torchvision(op):
    x = _imgs(seed=2)
    p = _params(A.ViewSpec(crop_size=32), 6, 32, 40)
    idx = ["brightness", "contrast", "saturation", "hue"].index(op)
    p["jitter"][:] = True
    p["order"] = torch.tensor([[idx] * 4] * 6)  # apply only this op (four times)
    for k in ("brightness", "contrast", "saturation"):
        if k != op:
            p[k] = torch.ones(6)
    if op != "hue":
        p["hue"] = torch.zeros(6)
    y = A.color_jitter(x, p)
    fn = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation,
          "hue": TF.adjust_hue}[op]
    for i in range(6):
        ref = x[i]
        for _ in range(4):
            ref = fn(ref, float(p[op][i]))
        torch.testing.assert_close(y[i], ref, rtol=0, atol=2e-5)


def test_full_jitter_in_per_sample_order_and_off_samples_untouched():
    x = _imgs(seed=3)
    p = _params(A.ViewSpec(crop_size=32), 6, 32, 40, seed=4)
    p["jitter"] = torch.tensor([True, True, False, True, True, False])
    y = A.color_jitter(x, p)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    keys = ["brightness", "contrast", "saturation", "hue"]
    for i in range(6):
        ref = x[i]
        if p["jitter"][i]:
            for k in p["order"][i].tolist():
                ref = fns[k](ref, float(p[keys[k]][i]))
        torch.testing.assert_close(y[i], ref, rtol=0, atol=2e-5)


def test_grayscale_blur_solarize_flip_normalize():
    x = _imgs(seed=5)
    on = torch.tensor([True, False, True, True, False, True])
    g = A.grayscale(x, on)
    sig = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7])
    b = A.gaussian_blur(x, sig, on)
    s = A.solarize(x, on)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    nrm = A.normalize(x, mean, std)
    for i in range(6):
        gi = TF.rgb_to_grayscale(x[i], num_output_channels=3) if on[i] else x[i]
        torch.testing.assert_close(g[i], gi, rtol=0, atol=1e-6)
        bi = TF.gaussian_blur(x[i], [23, 23], [float(sig[i])] * 2) if on[i] else x[i]
        torch.testing.assert_close(b[i], bi, rtol=0, atol=1e-5)
        si = TF.solarize(x[i], 128 / 255) if on[i] else x[i]
        torch.testing.assert_close(s[i], si, rtol=0, atol=0)
        torch.testing.assert_close(nrm[i], TF.normalize(x[i], mean, std), rtol=0, atol=1e-6)


def test_rrc_params_follow_torchvision_rules():
    n = 4000
    g = torch.Generator().manual_seed(0)
    top, left, h, w = A.rrc_params(n, 32, 40, (0.08, 1.0), (3 / 4, 4 / 3), g, "cpu")
    assert ((h >= 1) & (h <= 32) & (w >= 1) & (w <= 40)).all()
    assert ((top >= 0) & (top + h <= 32) & (left >= 0) & (left + w <= 40)).all()
    area = (h * w).double() / (32 * 40)
    assert area.min() >= 0.06 and area.max() <= 1.0  # rounding of w, h lets area dip slightly below 0.08
    ratio = w.double() / h.double()
    assert ratio.min() > 0.6 and ratio.max() < 1.7
    # an impossible scale forces torchvision's centre fallback
    top, left, h, w = A.rrc_params(10, 32, 40, (5.0, 6.0), (3 / 4, 4 / 3), g, "cpu")
    assert (h == 32).all() and (w == 40).all() and (top == 0).all() and (left == 0).all()  # 40/32 is inside the ratios
    top, left, h, w = A.rrc_params(10, 20, 40, (5.0, 6.0), (3 / 4, 4 / 3), g, "cpu")  # 2.0 > 4/3: clipped, centred
    assert (h == 20).all() and (w == round(20 * 4 / 3)).all() and (left == (40 - 27) // 2).all()


def test_random_parameters_follow_configured_probabilities():
    n = 20000
    spec = A.ViewSpec(crop_size=32, jitter_p=0.8, gray_p=0.2, blur_p=0.1, solarize_p=0.2, flip_p=0.5)
    p = _params(spec, n, 32, 32, seed=9)
    for key, prob in (("jitter", 0.8), ("gray", 0.2), ("blur", 0.1), ("solarize", 0.2), ("flip", 0.5)):
        rate = p[key].float().mean().item()
        assert abs(rate - prob) < 5 * math.sqrt(prob * (1 - prob) / n), (key, rate)
    assert 0.6 <= p["brightness"].min() and p["brightness"].max() <= 1.4
    assert 0.8 <= p["saturation"].min() and p["saturation"].max() <= 1.2
    assert -0.1 <= p["hue"].min() and p["hue"].max() <= 0.1
    assert abs(p["hue"].mean().item()) < 0.005 and abs(p["sigma"].mean().item() - 1.05) < 0.02
    # every permutation of the four jitter ops appears about equally often (24 of them)
    perms = torch.unique(p["order"], dim=0, return_counts=True)[1]
    assert len(perms) == 24 and perms.min() > n / 24 * 0.8


def test_view_specs_follow_method_table():
    c1, c2 = A.view_specs("cifar10")
    assert (c1.blur_p, c1.solarize_p, c2.blur_p, c2.solarize_p, c1.crop_size) == (0.0, 0.0, 0.0, 0.2, 32)
    i1, i2 = A.view_specs("imagenet")
    assert (i1.blur_p, i1.solarize_p, i2.blur_p, i2.solarize_p, i1.crop_size) == (1.0, 0.0, 0.1, 0.2, 224)
    s1, s2 = A.view_specs("cifar100", "symmetric")
    assert s1 == s2 and s1.blur_p == 0.5 and s1.brightness == 0.8 and s1.mean == A.MEANS_STDS["cifar100"][0]
