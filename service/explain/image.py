"""Occlusion saliency for images: a square patch of the baseline colour slides over the picture
the model sees; a pixel's heat is the mean drop in the target class's probability over the
patches that hid it. Positive heat: the pixel supports the class; negative: it argues against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from service.explain.windows import average_over_windows, starts

Baseline = Literal["zero", "mean"]


@dataclass(frozen=True)
class ImageOcclusion:
    patch: int
    stride: int
    baseline: Baseline = "zero"

    @classmethod
    def for_size(cls, height: int, width: int, patch: int | None = None, stride: int | None = None,
                 baseline: Baseline = "zero") -> ImageOcclusion:
        """Defaults: a patch a fifth of the picture's side (6 px at 28×28, about a stroke's
        width and length) moved a third of a patch at a time, so each pixel is hidden by ~9 patches."""
        patch = patch or max(1, round(min(height, width) / 5))
        return cls(patch, stride or max(1, patch // 3), baseline)

    def boxes(self, height: int, width: int) -> list[tuple[slice, slice]]:
        ys = starts(height, self.patch, self.stride)
        xs = starts(width, self.patch, self.stride)
        return [(slice(y, y + self.patch), slice(x, x + self.patch)) for y in ys for x in xs]

    def rows(self, height: int, width: int) -> int:
        """Rows one explanation computes: the picture itself and one per patch position."""
        return 1 + len(self.boxes(height, width))

    def perturb(self, pixels: np.ndarray) -> np.ndarray:
        """pixels [C, H, W] → [1 + patches, C, H, W]: the picture, then each occluded copy."""
        _, height, width = pixels.shape
        boxes = self.boxes(height, width)
        out = np.repeat(pixels[None], 1 + len(boxes), axis=0)
        # Zero is the background the MNIST-style models were trained on; "mean" hides detail
        # without adding a dark blob to a photo.
        fill = pixels.mean(axis=(1, 2), keepdims=True).round().astype(pixels.dtype) \
            if self.baseline == "mean" else np.zeros((pixels.shape[0], 1, 1), pixels.dtype)
        for i, (ys, xs) in enumerate(boxes, start=1):
            out[i, :, ys, xs] = fill
        return out

    def heatmap(self, target_scores: np.ndarray, height: int, width: int) -> np.ndarray:
        """target_scores [1 + patches] (the target class's probability per row) → heat [H, W]."""
        drops = target_scores[0] - target_scores[1:]
        return average_over_windows(drops, self.boxes(height, width), (height, width))
