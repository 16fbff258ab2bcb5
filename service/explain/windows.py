"""Sliding occlusion windows along an axis, and the average of their effects at each position."""

from __future__ import annotations

import numpy as np


def starts(size: int, window: int, stride: int) -> list[int]:
    """Window starts every `stride` along [0, size), plus one flush with the end so that the last
    positions are covered as often as their neighbours."""
    if window >= size:
        return [0]
    out = list(range(0, size - window + 1, stride))
    if out[-1] != size - window:
        out.append(size - window)
    return out


def average_over_windows(effects: np.ndarray, boxes: list[tuple[slice, ...]],
                         shape: tuple[int, ...]) -> np.ndarray:
    """Each position's mean effect over the windows that covered it (0 where none did)."""
    total = np.zeros(shape, dtype=np.float64)
    count = np.zeros(shape, dtype=np.float64)
    for effect, box in zip(effects.tolist(), boxes, strict=True):
        total[box] += effect
        count[box] += 1
    return np.divide(total, count, out=np.zeros(shape, dtype=np.float64), where=count > 0)
