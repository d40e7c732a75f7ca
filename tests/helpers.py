"""Input generators shared by the tests: loss and kernel inputs (the regimes of METHOD.md §2.8), damaged files."""

from __future__ import annotations

import torch

REGIMES = ("random", "aligned", "anti", "mixed", "negvar")


def make_inputs(regime: str, B: int, d: int, dtype=torch.float64, seed: int = 0, device="cpu"):
    """(mu_student, mu_teacher, var_student, var_teacher) for one regime, fresh per seed."""
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(B, d, generator=g, dtype=torch.float64)  # noqa: E731
    mu1, mu2, u1, u2 = r(), r(), r(), r()
    if regime == "aligned":
        mu2 = mu1 * 1.7 + 1e-3 * mu2
        u2 = u1 * 0.6 + 1e-3 * u2
    elif regime == "anti":
        mu2 = -mu1 * 0.8 + 1e-3 * mu2
        u2 = -u1 * 2.0 + 1e-3 * u2
    elif regime == "mixed":
        mu1, u2 = mu1 * 1e-3, u2 * 1e3
        mu2, u1 = mu2 * 1e2, u1 * 1e-2
    elif regime == "negvar":
        u1, u2 = -u1.abs() - 0.1, -u2.abs()
    elif regime != "random":
        raise ValueError(regime)
    return [t.to(dtype=dtype, device=device) for t in (mu1, mu2, u1, u2)]


def tiny_backbone(width: int = 8):
    """A two-conv net with BN, small enough for CPU tests; feature dim = width."""
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


def tiny_model(method_cfg, width: int = 8, num_classes: int = 3):
    from vssl_fast.models import SSLModel

    kw = method_cfg.model_kwargs()
    kw.update(proj_hidden_dim=16, proj_output_dim=kw["proj_output_dim"], pred_hidden_dim=16, denoiser_hidden_dim=16)
    return SSLModel(**kw, num_classes=num_classes, backbone_module=tiny_backbone(width), feature_dim=width)


def garbled_jpeg(seed: int = 0) -> bytes:
    """A JPEG whose header and end marker are fine but whose data is noise: only a decode finds it."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data[:800] + rng.integers(0, 256, len(data) - 1000, dtype=np.uint8).tobytes() + data[-200:]
