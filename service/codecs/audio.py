"""Audio bytes (WAV/FLAC/OGG, any rate or channel count) → mono float32 PCM at the model's rate.

`fit_length` is what `training` applies to its own clips, so served audio is framed like the
training data.
"""

from __future__ import annotations

import io
import struct
import wave
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from service.core.model_config import AudioPreprocessing
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia


@dataclass(frozen=True)
class Decoded:
    pcm: np.ndarray  # float32 [samples] at the model's rate, fitted to its duration
    duration_s: float  # of the upload as sent


def decode(data: bytes, spec: AudioPreprocessing, *, max_duration_s: float) -> np.ndarray:
    """Decode, downmix, resample to `spec.sample_rate` and fit to `spec.duration_s` seconds."""
    return decode_clip(data, spec, max_duration_s=max_duration_s).pcm


def decode_clip(data: bytes, spec: AudioPreprocessing, *, max_duration_s: float) -> Decoded:
    """`decode`, and how long the upload lasted."""
    if not data:
        raise InvalidInput("empty audio")
    mono, rate = _read_pcm16_wav(data, max_duration_s) or _read_any(data, max_duration_s)
    if not np.isfinite(mono).all():
        raise InvalidInput("audio holds NaN or infinite samples")
    pcm = fit_length(resample(mono, rate, spec.sample_rate), round(spec.sample_rate * spec.duration_s))
    return Decoded(pcm, len(mono) / rate)


def _read_pcm16_wav(data: bytes, max_duration_s: float) -> tuple[np.ndarray, int] | None:
    """16-bit PCM WAV, what nearly every client sends, with the standard library: libsndfile's
    virtual-file set-up costs more than the whole of this. The samples are the ones soundfile reads
    (x / 32768 as float32). None for anything else, which `_read_any` then reads."""
    if not data.startswith(b"RIFF"):
        return None
    try:
        with wave.open(io.BytesIO(data)) as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            if width != 2 or rate <= 0:
                return None
            # The data chunk's size may be a placeholder (streamed WAV): count what is there.
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError, struct.error, RuntimeError, ValueError, OSError):
        return None  # a header the standard library does not take: libsndfile decides
    frames = np.frombuffer(raw, dtype="<i2", count=len(raw) // (2 * channels) * channels)
    if frames.size == 0:
        raise InvalidInput("audio has no samples")
    _check_duration(frames.size / channels / rate, max_duration_s)
    scaled = frames.reshape(-1, channels).astype(np.float32) * np.float32(1 / 32768)
    return (scaled[:, 0] if channels == 1 else scaled.mean(axis=1, dtype=np.float32)), rate


def _read_any(data: bytes, max_duration_s: float) -> tuple[np.ndarray, int]:
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise UnsupportedMedia("not a readable audio file; accepted formats: WAV, FLAC, OGG") from e
    if info.frames <= 0 or info.samplerate <= 0:
        raise InvalidInput("audio has no samples")
    _check_duration(info.frames / info.samplerate, max_duration_s)
    try:
        pcm, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise InvalidInput(f"corrupt audio: {e}") from e
    return pcm.mean(axis=1, dtype=np.float32), rate


def _check_duration(duration: float, max_duration_s: float) -> None:
    if duration > max_duration_s:
        raise PayloadTooLarge(f"audio lasts {duration:.2f} s; the limit is {max_duration_s:g} s")


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
