"""Shared launch helpers for the Triton kernels."""

from __future__ import annotations

import os

import torch


def interpret_mode() -> bool:
    """True when Triton runs kernels on CPU tensors (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(device: torch.device) -> bool:
    """Can a Triton kernel run on tensors of ``device``: CUDA, or the CPU under the interpreter."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpret_mode()


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def require_triton(fn: str, device: torch.device) -> None:
    if not triton_available(device):
        raise RuntimeError(
            f"{fn}: the Triton kernel needs a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors "
            f"(got a tensor on {device}); use the reference implementation instead"
        )


def run_closure(closure):
    """An optimizer's closure, re-evaluated with gradients enabled (torch.optim's convention)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
