"""Real files for the task endpoints: images with Pillow, audio with soundfile."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import soundfile as sf
from PIL import Image


def png_of(pixels: np.ndarray) -> bytes:
    """These pixels (uint8, greyscale or RGB) as a PNG file."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def png(width: int = 64, height: int = 48, mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def encoded(fmt: str, width: int = 40, height: int = 30, mode: str = "RGB", seed: int = 1) -> bytes:
    img = Image.open(io.BytesIO(png(width, height, mode, seed)))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims a huge picture (the pixel data is a few bytes of zlib)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def wav(
    seconds: float = 0.4,
    rate: int = 44100,
    channels: int = 2,
    freq: float = 440.0,
    fmt: str = "WAV",
    subtype: str | None = None,
) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * freq * t)
    pcm = np.stack([tone * (1 - 0.2 * c) for c in range(channels)], axis=1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format=fmt, subtype=subtype)
    return buf.getvalue()
