"""Audio bytes (WAV/FLAC/OGG, any rate or channel count) → mono float32 PCM at the model's rate.

`fit_length` is what `training` applies to its own clips, so served audio is framed like the
training data.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia
from service.model_config import AudioPreprocessing


def decode(data: bytes, spec: AudioPreprocessing, *, max_duration_s: float) -> np.ndarray:
    """Decode, downmix, resample to `spec.sample_rate` and fit to `spec.duration_s` seconds."""
    if not data:
        raise InvalidInput("empty audio")
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise UnsupportedMedia("not a readable audio file; accepted formats: WAV, FLAC, OGG") from e
    if info.frames <= 0 or info.samplerate <= 0:
        raise InvalidInput("audio has no samples")
    duration = info.frames / info.samplerate
    if duration > max_duration_s:
        raise PayloadTooLarge(f"audio lasts {duration:.2f} s; the limit is {max_duration_s:g} s")
    try:
        pcm, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise InvalidInput(f"corrupt audio: {e}") from e
    mono = pcm.mean(axis=1, dtype=np.float32)
    if not np.isfinite(mono).all():
        raise InvalidInput("audio holds NaN or infinite samples")
    return fit_length(resample(mono, rate, spec.sample_rate), round(spec.sample_rate * spec.duration_s))


def resample(pcm: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    if rate == target_rate:
        return pcm.astype(np.float32, copy=False)
    return soxr.resample(pcm, rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def fit_length(pcm: np.ndarray, n: int) -> np.ndarray:
    """Centre a short clip in `n` samples of silence; of a long one keep the loudest `n`-sample window."""
    if len(pcm) == n:
        return pcm
    if len(pcm) < n:
        out = np.zeros(n, dtype=np.float32)
        start = (n - len(pcm)) // 2
        out[start:start + len(pcm)] = pcm
        return out
    energy = np.concatenate([[0.0], np.cumsum(pcm.astype(np.float64) ** 2)])
    window = energy[n:] - energy[:-n]
    start = int(np.argmax(window))
    return np.ascontiguousarray(pcm[start:start + n], dtype=np.float32)
