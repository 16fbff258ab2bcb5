"""The LPC vocoder of the speech corpus: it finds the pitch of a voiced sound, moves it by the factor
asked, keeps the vocal-tract resonances and the length, and stays repeatable."""

from __future__ import annotations

import numpy as np
from scipy.signal import lfilter

from training import vocoder

RATE = vocoder.SAMPLE_RATE


def vowel(f0: float, seconds: float = 0.5, formants: tuple[float, ...] = (700.0, 1200.0)) -> np.ndarray:
    """A pulse train at `f0` through two-pole resonators at `formants`: a synthetic /a/."""
    n = int(seconds * RATE)
    x = np.zeros(n)
    x[:: round(RATE / f0)] = 1.0
    for f in formants:
        r = np.exp(-np.pi * 80.0 / RATE)  # 80 Hz bandwidth
        x = lfilter([1.0], [1.0, -2 * r * np.cos(2 * np.pi * f / RATE), r * r], x)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def voiced_f0(pcm: np.ndarray) -> float:
    _, _, f0 = vocoder.analyse(pcm)
    return float(np.median(f0[f0 > 0]))


def spectral_peak_hz(pcm: np.ndarray, low: float, high: float) -> float:
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    freqs = np.fft.rfftfreq(len(pcm), 1 / RATE)
    band = (freqs >= low) & (freqs <= high)
    # The envelope, not a harmonic: smooth over 100 Hz.
    smooth = np.convolve(spectrum, np.ones(50) / 50, mode="same")
    return float(freqs[band][np.argmax(smooth[band])])


def test_analysis_finds_the_pitch_of_a_voiced_sound():
    assert abs(voiced_f0(vowel(125.0)) - 125.0) < 125.0 * 0.05


def test_revoicing_moves_the_pitch_and_keeps_formants_and_length():
    source = vowel(125.0)
    out = vocoder.revoice(source, np.random.default_rng(0), f0_scale=1.5, breath=0.05)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert abs(len(out) - len(source)) <= vocoder.HOP
    assert abs(voiced_f0(out) - 187.5) < 187.5 * 0.06
    assert abs(spectral_peak_hz(out, 400, 1000) - 700.0) < 120.0  # first formant stays put


def test_unvoiced_noise_stays_noise():
    noise = (0.1 * np.random.default_rng(1).standard_normal(RATE // 2)).astype(np.float32)
    _, _, f0 = vocoder.analyse(noise)
    assert (f0 > 0).mean() < 0.1


def test_same_seed_same_samples():
    source = vowel(110.0)
    a = vocoder.revoice(source, np.random.default_rng(7), f0_scale=0.8, breath=0.2)
    b = vocoder.revoice(source, np.random.default_rng(7), f0_scale=0.8, breath=0.2)
    np.testing.assert_array_equal(a, b)
