"""vssl-fast: Variational Self-Supervised Learning, fast and validated against plain references."""

__version__ = "0.1.0"
