"""Model monitoring: input and prediction distributions, recorded once per batch.

Runs in the batch's compute thread on the merged tensors, so the reductions are vectorised over
the batch instead of repeated per request on the event loop. Drift in these histograms (darker
images, shorter texts, quieter audio, lower confidence) shows before accuracy visibly drops.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from service.codecs.text import TextModel
from service.core.model_config import ModelConfig
from service.observability.metrics import ModelMetrics, observe_many

Observer = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], None]


def batch_observer(config: ModelConfig, text: TextModel | None, metrics: ModelMetrics) -> Observer:
    scores_output = config.scores_output
    first_input = config.inputs[0].name
    task = config.task

    def observe(feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        rows = len(outputs[scores_output])
        if task == "image":
            pixels = feeds[first_input].reshape(rows, -1)
            observe_many(metrics.image_intensity, pixels.mean(axis=1) / 255.0)
        elif task == "text" and text is not None:
            if text.mask is not None:
                tokens = feeds[text.mask].sum(axis=1)
            else:
                tokens = np.full(rows, feeds[text.ids].shape[1])
            observe_many(metrics.text_tokens, tokens)
        elif task == "speech":
            wave = feeds[first_input].reshape(rows, -1).astype(np.float64, copy=False)
            observe_many(metrics.audio_rms, np.sqrt(np.einsum("ij,ij->i", wave, wave) / wave.shape[1]))
        metrics.predictions(outputs[scores_output])

    return observe
