"""Image bytes → the uint8 pixel tensor an image model takes (the graph scales pixels itself).

`training` evaluates through `to_pixels` too, so a picture the service receives is prepared exactly
as the model card's test images were.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.core.model_config import ImagePreprocessing
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia

FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF")


def decode(data: bytes, *, max_pixels: int) -> Image.Image:
    """Open an uploaded image, refusing unknown formats and decompression bombs before decoding."""
    if not data:
        raise InvalidInput("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            # The header alone gives the size: check it before the (possibly huge) pixel data is read.
            if img.width * img.height > max_pixels:
                raise PayloadTooLarge(
                    f"image is {img.width}x{img.height} pixels; the limit is {max_pixels} pixels"
                )
            img.seek(0)  # first frame of an animated GIF/WebP
            img.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, UnidentifiedImageError):
            raise UnsupportedMedia(f"not a readable image; accepted formats: {', '.join(FORMATS)}") from e
        raise PayloadTooLarge(str(e)) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidInput(f"corrupt image: {e}") from e
    return img


def _to_mode(img: Image.Image, color: str) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float greyscale: stretch to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels have no colour of their own; lay them on white like a viewer would.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert(color)


def to_pixels(img: Image.Image, spec: ImagePreprocessing) -> np.ndarray:
    """Return uint8 pixels shaped (channels, height, width) as the model's input wants them.

    An image already at the model's size passes through untouched; others are scaled to fit inside
    the model's frame keeping their aspect ratio and centred on the background colour.
    """
    img = _to_mode(img, spec.color)
    arr = np.asarray(img, dtype=np.uint8)
    if spec.invert == "always" or (spec.invert == "auto" and _border_brighter(arr)):
        arr = 255 - arr
        img = Image.fromarray(arr, mode=spec.color)
    if img.size != (spec.width, spec.height):
        fitted = ImageOps.contain(img, (spec.width, spec.height), Image.Resampling.LANCZOS)
        background = 0 if spec.color == "L" else (0, 0, 0)
        canvas = Image.new(spec.color, (spec.width, spec.height), background)
        canvas.paste(fitted, ((spec.width - fitted.width) // 2, (spec.height - fitted.height) // 2))
        arr = np.asarray(canvas, dtype=np.uint8)
    return arr[None, :, :] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def _border_brighter(arr: np.ndarray) -> bool:
    grey = arr if arr.ndim == 2 else arr.mean(axis=2)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    return float(border.mean()) > float(grey.mean())
