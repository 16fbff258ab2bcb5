"""Attributions as pictures: PNG bytes of a heatmap overlay, a model input, or a spectrogram."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Positive attributions (supporting the class) in red, negative in blue.
_POSITIVE = np.array([220, 38, 38], dtype=np.float64)
_NEGATIVE = np.array([37, 99, 235], dtype=np.float64)


def encode(pixels: np.ndarray) -> bytes:
    """uint8 [H, W] (grey), [H, W, 3] (RGB) or [H, W, 4] (RGBA) → PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def model_input(pixels: np.ndarray) -> bytes:
    """The uint8 [C, H, W] tensor a model received, as a picture."""
    return encode(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))


def _scale(values: np.ndarray) -> np.ndarray:
    peak = float(np.abs(values).max()) if values.size else 0.0
    return values / peak if peak > 0 else np.zeros_like(values)


def heatmap_overlay(heat: np.ndarray) -> bytes:
    """heat [H, W] → RGBA PNG of the same size, to lay over the input: the colour says the sign,
    the opacity the size relative to the largest |heat|."""
    v = _scale(heat.astype(np.float64))
    rgba = np.zeros((*v.shape, 4), dtype=np.uint8)
    rgba[..., :3] = np.where(v[..., None] >= 0, _POSITIVE, _NEGATIVE).astype(np.uint8)
    rgba[..., 3] = (np.abs(v) ** 0.8 * 210).round().astype(np.uint8)
    return encode(rgba)


def spectrogram_with_importance(spec_db: np.ndarray, importance: np.ndarray) -> bytes:
    """spec_db [bins, frames] (low frequencies first) and importance per segment (spread evenly
    over the frames) → RGB PNG, low frequencies at the bottom, each column tinted by its segment."""
    floor = spec_db.max() - 70.0  # show 70 dB of dynamic range
    grey = np.clip((spec_db - floor) / 70.0, 0, 1)[::-1] * 235 + 10
    frames = spec_db.shape[1]
    segment = np.minimum((np.arange(frames) * len(importance)) // max(frames, 1), len(importance) - 1)
    v = _scale(importance.astype(np.float64))[segment]  # [frames]
    colour = np.where(v[:, None] >= 0, _POSITIVE, _NEGATIVE)  # [frames, 3]
    alpha = (np.abs(v) * 0.6)[None, :, None]
    rgb = grey[..., None] * (1 - alpha) + colour[None] * alpha
    return encode(rgb.round().astype(np.uint8))
