"""PyTorch → ONNX export, the structural check, and the PyTorch-vs-ONNX-Runtime parity check.

Every served graph returns two outputs, `logits` and `probabilities` (softmax inside the graph), so
the service never re-implements a model's last step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

OPSET = 17


class WithProbabilities(nn.Module):
    """Wraps a classifier so its graph outputs both the logits and their softmax."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.classifier(*inputs)
        return logits, torch.softmax(logits, dim=-1)


def export(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """Export `model` (already wrapped in WithProbabilities) and run onnx's full checker on the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    axes = {**dynamic_axes, "logits": {0: "batch"}, "probabilities": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(
            model,
            example_inputs,
            str(path),
            input_names=input_names,
            output_names=["logits", "probabilities"],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


@dataclass(frozen=True)
class Parity:
    samples: int
    max_abs_logit_diff: float
    argmax_agreement: float

    def passed(self, tolerance: float = 1e-4, min_agreement: float = 0.999) -> bool:
        return self.max_abs_logit_diff <= tolerance and self.argmax_agreement >= min_agreement


class ParityError(AssertionError):
    pass


def cpu_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(
    model: nn.Module,
    onnx_path: Path,
    batches: list[dict[str, np.ndarray]],
    *,
    tolerance: float = 1e-4,
    min_agreement: float = 0.999,
) -> Parity:
    """Compare the logits of `model` (eval mode) and of the ONNX graph on the same feeds.

    `batches` are ONNX feeds (input name → array) whose order matches the model's forward arguments.
    Raises ParityError when the graph drifts beyond `tolerance` or flips more than 0.1 % of argmaxes.
    """
    session = cpu_session(onnx_path)
    model.eval()
    diffs, agree, total = [], 0, 0
    with torch.no_grad():
        for feeds in batches:
            expected = model(*(torch.from_numpy(v) for v in feeds.values()))[0].numpy()
            got = session.run(["logits"], feeds)[0]
            diffs.append(float(np.abs(expected - got).max()))
            agree += int((expected.argmax(-1) == got.argmax(-1)).sum())
            total += len(got)
    parity = Parity(total, max(diffs), agree / total)
    if not parity.passed(tolerance, min_agreement):
        raise ParityError(f"{onnx_path}: {parity}")
    return parity


def onnx_predict(session: ort.InferenceSession, feeds: dict[str, np.ndarray], batch: int = 256) -> np.ndarray:
    """Probabilities for a whole evaluation set, run in chunks of `batch` rows."""
    n = len(next(iter(feeds.values())))
    out = [
        session.run(["probabilities"], {k: v[i:i + batch] for k, v in feeds.items()})[0]
        for i in range(0, n, batch)
    ]
    return np.concatenate(out)
