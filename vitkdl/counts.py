"""Counts (parameters, FLOPs) in words a reader can scan: ``18.9M``, ``123.1G``. Torch-free."""

from __future__ import annotations

__all__ = ["count_words"]

_UNITS = (("G", 1e9), ("M", 1e6), ("K", 1e3))


def count_words(x: float) -> str:
    """``x`` with one decimal in the largest unit it reaches (K, M, G), else as it is."""
    for unit, scale in _UNITS:
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:g}"
