"""Model monitoring: input and prediction distributions, recorded once per batch.

Runs in the batch's executor thread on the merged tensors, so the reductions are vectorised over
the batch instead of repeated per request on the event loop. Drift in these histograms (darker
images, shorter texts, quieter audio, lower confidence) shows before accuracy visibly drops.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from service.codecs.text import TextModel
from service.metrics import ModelMetrics
from service.model_config import ModelConfig

Observer = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], None]


def batch_observer(config: ModelConfig, text: TextModel | None, metrics: ModelMetrics) -> Observer:
    scores_output = config.scores_output
    first_input = config.inputs[0].name
    task = config.task

    def observe(feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        rows = len(outputs[scores_output])
        if task == "image":
            pixels = feeds[first_input].reshape(rows, -1)
            for v in (pixels.mean(axis=1) / 255.0).tolist():
                metrics.image_intensity.observe(v)
        elif task == "text" and text is not None:
            if text.mask is not None:
                tokens = feeds[text.mask].sum(axis=1).tolist()
            else:
                tokens = [feeds[text.ids].shape[1]] * rows
            for v in tokens:
                metrics.text_tokens.observe(v)
        elif task == "speech":
            wave = feeds[first_input].reshape(rows, -1).astype(np.float64, copy=False)
            for v in np.sqrt(np.einsum("ij,ij->i", wave, wave) / wave.shape[1]).tolist():
                metrics.audio_rms.observe(v)
        metrics.predictions(outputs[scores_output])

    return observe
