"""The audio codec: 16-bit PCM WAV through the standard library gives exactly what libsndfile
gives; every other format still goes through libsndfile; limits hold on both paths."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import soundfile as sf

from service.codecs import audio
from service.core.model_config import AudioPreprocessing
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia
from tests.service import media

SPEC = AudioPreprocessing(sample_rate=16000, duration_s=1.0)


def reference(data: bytes) -> np.ndarray:
    """libsndfile's reading of the upload, downmixed, resampled and framed like the codec does."""
    pcm, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = pcm.mean(axis=1, dtype=np.float32)
    return audio.fit_length(audio.resample(mono, rate, SPEC.sample_rate), SPEC.sample_rate)


@pytest.mark.parametrize("rate", [8000, 16000, 44100])
@pytest.mark.parametrize("channels", [1, 2])
def test_pcm16_wav_decodes_exactly_as_libsndfile_reads_it(rate: int, channels: int):
    data = media.wav(seconds=0.7, rate=rate, channels=channels, subtype="PCM_16")
    clip = audio.decode_clip(data, SPEC, max_duration_s=2)
    assert clip.pcm.dtype == np.float32 and clip.pcm.shape == (16000,)
    np.testing.assert_array_equal(clip.pcm, reference(data))
    assert clip.duration_s == pytest.approx(int(0.7 * rate) / rate)


@pytest.mark.parametrize(("fmt", "subtype"), [("WAV", "PCM_24"), ("WAV", "FLOAT"), ("WAV", "PCM_U8"),
                                              ("FLAC", None), ("OGG", None)])
def test_other_encodings_decode_through_libsndfile(fmt: str, subtype: str | None):
    data = media.wav(seconds=0.5, rate=22050, channels=2, fmt=fmt, subtype=subtype)
    clip = audio.decode_clip(data, SPEC, max_duration_s=2)
    np.testing.assert_array_equal(clip.pcm, reference(data))
    assert clip.duration_s == pytest.approx(0.5, abs=1e-3)


def test_streamed_wav_with_placeholder_sizes_decodes_what_is_there():
    data = bytearray(media.wav(seconds=0.5, rate=16000, channels=1, subtype="PCM_16"))
    data[4:8] = struct.pack("<I", 0xFFFFFFFF)  # RIFF size unknown while streaming
    data[data.index(b"data") + 4:data.index(b"data") + 8] = struct.pack("<I", 0xFFFFFFFF)
    clip = audio.decode_clip(bytes(data), SPEC, max_duration_s=2)
    assert clip.duration_s == pytest.approx(0.5)
    np.testing.assert_array_equal(clip.pcm, audio.decode(media.wav(seconds=0.5, rate=16000, channels=1,
                                                                   subtype="PCM_16"), SPEC, max_duration_s=2))


def test_truncated_wav_keeps_the_whole_samples_it_has():
    data = media.wav(seconds=0.5, rate=16000, channels=2, subtype="PCM_16")
    clip = audio.decode_clip(data[:-3], SPEC, max_duration_s=2)  # last frame cut mid-sample
    assert clip.duration_s == pytest.approx((8000 - 1) / 16000)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24"])
def test_too_long_audio_is_refused_on_both_paths(subtype: str):
    with pytest.raises(PayloadTooLarge, match=r"lasts 3\.00 s; the limit is 2 s"):
        audio.decode_clip(media.wav(seconds=3, rate=8000, channels=1, subtype=subtype), SPEC,
                          max_duration_s=2)


def test_empty_and_sampleless_and_unreadable_uploads_are_client_errors():
    header_only = media.wav(seconds=0, rate=16000, channels=1, subtype="PCM_16")
    with pytest.raises(InvalidInput):
        audio.decode_clip(b"", SPEC, max_duration_s=2)
    with pytest.raises(InvalidInput, match="no samples"):
        audio.decode_clip(header_only, SPEC, max_duration_s=2)
    with pytest.raises(UnsupportedMedia):
        audio.decode_clip(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk", SPEC, max_duration_s=2)
