"""An LPC vocoder: analyse a spoken word into a vocal-tract filter, a gain and a pitch track per
5 ms, then rebuild it from a pulse train and noise at another pitch.

Statistical parametric synthesizers (flite's awb, rms and slt, festival's HTS voices) speak through a
vocoder like this one, with its buzzy pulse excitation, and no voice of the training split does.
Resynthesizing some training words this way teaches the classifier that sound, and the free choice
of pitch (independent of the formants, which sox shifts with it) gives voices none of the
synthesizers has.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve_toeplitz
from scipy.signal import lfilter, medfilt

SAMPLE_RATE = 16000
HOP = 80  # 5 ms
WINDOW = 400  # 25 ms
ORDER = 18  # poles: two per kHz of bandwidth, plus two
PRE_EMPHASIS = 0.9
F0_RANGE = (60.0, 400.0)
VOICING_THRESHOLD = 0.3  # normalised autocorrelation of the residual at the pitch lag


def analyse(pcm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """16 kHz PCM → per hop: LPC polynomial [n, ORDER+1], gain [n], f0 in Hz [n] (0 = unvoiced)."""
    x = np.asarray(pcm, np.float64)
    x = np.append(x[:1], x[1:] - PRE_EMPHASIS * x[:-1])
    padded = np.pad(x, (WINDOW // 2, WINDOW // 2 + HOP))
    frames = len(x) // HOP + 1
    window = np.hanning(WINDOW)
    poly = np.zeros((frames, ORDER + 1))
    poly[:, 0] = 1.0
    gain, f0 = np.zeros(frames), np.zeros(frames)
    shortest, longest = int(SAMPLE_RATE / F0_RANGE[1]), int(SAMPLE_RATE / F0_RANGE[0])
    for i in range(frames):
        frame = padded[i * HOP:i * HOP + WINDOW] * window
        r = np.correlate(frame, frame, "full")[WINDOW - 1:]
        if r[0] < 1e-10:
            continue  # digital silence: a silent frame
        r[0] *= 1.0001  # white-noise floor keeps the Toeplitz system well conditioned
        a = np.concatenate([[1.0], solve_toeplitz(r[:ORDER], -r[1:ORDER + 1])])
        poly[i] = a
        gain[i] = np.sqrt(max(r[0] + a[1:] @ r[1:ORDER + 1], 1e-12) / WINDOW)
        residual = lfilter(a, [1.0], frame)
        ac = np.correlate(residual, residual, "full")[WINDOW - 1:]
        lag = shortest + int(np.argmax(ac[shortest:longest]))
        if ac[0] > 0 and ac[lag] / ac[0] > VOICING_THRESHOLD:
            f0[i] = SAMPLE_RATE / lag
    return poly, gain, medfilt(f0, 5)


def synthesize(poly: np.ndarray, gain: np.ndarray, f0: np.ndarray, rng: np.random.Generator, *,
               f0_scale: float, breath: float) -> np.ndarray:
    """Pulses at `f0 × f0_scale` (plus `breath` × noise) where voiced, noise elsewhere, filtered."""
    per_sample = np.repeat(f0 * f0_scale, HOP)
    phase = np.cumsum(per_sample / SAMPLE_RATE)
    pulse = (np.diff(np.floor(phase), prepend=0.0) > 0) & (per_sample > 0)
    voiced = per_sample > 0
    # Unit-power excitation either way: a pulse every 1/f0 s of height sqrt(rate/f0), or white noise.
    excitation = np.where(pulse, np.sqrt(SAMPLE_RATE / np.maximum(per_sample, 1.0)), 0.0)
    noise = rng.standard_normal(len(per_sample))
    excitation = np.where(voiced, excitation + breath * noise, noise)
    out = np.empty_like(excitation)
    state = np.zeros(ORDER)
    for i in range(len(gain)):
        span = slice(i * HOP, (i + 1) * HOP)
        out[span], state = lfilter([gain[i]], poly[i], excitation[span], zi=state)
    return lfilter([1.0], [1.0, -PRE_EMPHASIS], out).astype(np.float32)


def revoice(pcm: np.ndarray, rng: np.random.Generator, *, f0_scale: float, breath: float) -> np.ndarray:
    """`pcm` (16 kHz) said again through the vocoder, at `f0_scale` times its pitch."""
    return synthesize(*analyse(pcm), rng, f0_scale=f0_scale, breath=breath)
