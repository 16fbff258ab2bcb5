"""Occlusion over time for audio: a window of silence slides over the clip the model hears; each
segment's importance is the mean drop in the target class's probability over the windows that
silenced it. Shown over a spectrogram of the same clip."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from service.explain.windows import average_over_windows, starts


@dataclass(frozen=True)
class TimeOcclusion:
    window: int  # samples
    stride: int  # samples; also the length of one reported segment

    @classmethod
    def for_rate(cls, sample_rate: int, window_ms: float | None = None,
                 stride_ms: float | None = None) -> TimeOcclusion:
        """Defaults: 150 ms windows (about a syllable) every 50 ms."""
        window = max(1, round(sample_rate * (window_ms or 150.0) / 1000))
        stride = max(1, round(sample_rate * (stride_ms or 50.0) / 1000))
        return cls(window, min(stride, window))

    def boxes(self, samples: int) -> list[tuple[slice]]:
        return [(slice(s, s + self.window),) for s in starts(samples, self.window, self.stride)]

    def rows(self, samples: int) -> int:
        return 1 + len(self.boxes(samples))

    def perturb(self, pcm: np.ndarray) -> np.ndarray:
        """pcm [N] → [1 + windows, N]: the clip, then each copy with one window silenced."""
        boxes = self.boxes(len(pcm))
        out = np.repeat(pcm[None], 1 + len(boxes), axis=0)
        for i, (span,) in enumerate(boxes, start=1):
            out[i, span] = 0
        return out

    def segments(self, target_scores: np.ndarray, samples: int) -> np.ndarray:
        """target_scores [1 + windows] → importance per `stride`-long segment."""
        drops = target_scores[0] - target_scores[1:]
        per_sample = average_over_windows(drops, self.boxes(samples), (samples,))
        edges = [*range(0, samples, self.stride), samples]
        return np.array([per_sample[a:b].mean() for a, b in itertools.pairwise(edges)])


def spectrogram(pcm: np.ndarray, sample_rate: int, bins: int = 64) -> np.ndarray:
    """Log power in dB [bins, frames] (low frequencies first): 25 ms Hann frames every 10 ms, the
    frequency axis folded into `bins` bands of equal width on the mel scale."""
    frame, hop = round(sample_rate * 0.025), round(sample_rate * 0.010)
    if len(pcm) < frame:
        pcm = np.pad(pcm, (0, frame - len(pcm)))
    count = 1 + (len(pcm) - frame) // hop
    index = np.arange(frame)[None, :] + hop * np.arange(count)[:, None]
    power = np.abs(np.fft.rfft(pcm[index] * np.hanning(frame), axis=1)) ** 2  # [frames, freqs]
    freqs = np.fft.rfftfreq(frame, 1 / sample_rate)
    mel = 2595 * np.log10(1 + freqs / 700)
    band = np.minimum((mel / (mel[-1] + 1e-9) * bins).astype(int), bins - 1)
    folded = np.zeros((bins, count))
    np.add.at(folded, band, power.T)
    return 10 * np.log10(folded + 1e-10)
