"""Triton kernels of vssl-fast, importable as ``vssl_fast.kernels`` once installed.

Each module holds one kernel family with its plain-PyTorch reference beside it.
"""

from .ema import ema_update_, ema_update_reference_

__all__ = ["ema_update_", "ema_update_reference_"]
