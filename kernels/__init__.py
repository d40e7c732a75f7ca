"""Triton kernels of vssl-fast, importable as ``vssl_fast.kernels`` once installed.

Each module holds one kernel family with its plain-PyTorch reference beside it:
``cosine_loss`` (fused cosine KL + reparameterization, cosine LL), ``ema`` (multi-tensor EMA),
``lamb`` (apex-compatible FusedLAMB), ``lars`` (solo-learn LARS) and ``restore`` (multi-tensor
conditional restore of BatchNorm statistics on a skipped step).
"""

from .cosine_loss import cosine_kl_sample, cosine_kl_sample_reference, cosine_ll, cosine_ll_reference, sample_noise
from .ema import ema_update_, ema_update_loop_, ema_update_reference_
from .lamb import FusedLAMB, LAMBReference
from .lars import FusedLARS, LARSReference
from .restore import restore_where_, restore_where_reference_

__all__ = [
    "cosine_kl_sample",
    "cosine_kl_sample_reference",
    "cosine_ll",
    "cosine_ll_reference",
    "sample_noise",
    "ema_update_",
    "ema_update_reference_",
    "ema_update_loop_",
    "FusedLAMB",
    "LAMBReference",
    "FusedLARS",
    "LARSReference",
    "restore_where_",
    "restore_where_reference_",
]
