"""Triton kernels of vssl-fast, importable as ``vssl_fast.kernels`` once installed.

Each module holds one kernel family with its plain-PyTorch reference beside it.
"""

from .cosine_loss import cosine_kl_sample, cosine_kl_sample_reference, cosine_ll, cosine_ll_reference, sample_noise
from .ema import ema_update_, ema_update_reference_

__all__ = [
    "cosine_kl_sample",
    "cosine_kl_sample_reference",
    "cosine_ll",
    "cosine_ll_reference",
    "sample_noise",
    "ema_update_",
    "ema_update_reference_",
]
