"""`python -m training evaluate <model>`: the served graph's test accuracy on this machine, run with
the service's own ONNX Runtime session options, beside the figure its model card reports.

A shipped model must answer the same on every CPU a container may land on, so a card's figure is
one anybody can reproduce: this command prints both, where it ran, and fails when they differ by
more than `--tolerance` points. `--optimization disable` runs ONNX Runtime's reference kernels
(no fusion, no int8 kernels), the yardstick the tests compare the served kernels with.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.codecs.text import TextEncoder
from service.core.model_config import load_model_config
from service.core.runtime import CPU, session_options
from service.settings import GraphOptimization, Settings
from training import images, report, speech, text, text_data

BATCH = 64


@dataclass(frozen=True)
class TestSet:
    """A model's held-out test split as the served graph takes it: the service's own codecs made
    the inputs (image codec, tokenizer, audio decoder), exactly as for an upload."""

    inputs: dict[str, np.ndarray] | list[np.ndarray]  # image/audio tensors, or token ids per text
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, size: int = BATCH) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self), size):
            if isinstance(self.inputs, dict):
                yield {k: v[start:start + size] for k, v in self.inputs.items()}
            else:  # padded to the longest text of the batch, as the service pads
                yield text.pad(self.inputs[start:start + size])

    def head(self, n: int) -> TestSet:
        inputs = ({k: v[:n] for k, v in self.inputs.items()} if isinstance(self.inputs, dict)
                  else self.inputs[:n])
        return TestSet(inputs, self.labels[:n])


def test_set(name: str, models: Path) -> TestSet:
    """The test split of a shipped model, prepared by the service's codecs."""
    config = load_model_config(models / name)
    if config.task == "image":
        data = images.SPECS[name].load()
        return TestSet({"pixels": images.served_pixels(data.x_test, config.image)}, data.y_test)
    if config.task == "text":
        sentences = text_data.load_sentences()
        index = text_data.split(sentences["label"])["test"]
        encoder = TextEncoder(models / name / config.text.tokenizer, config.text.max_tokens)
        return TestSet(text.tokenize(encoder, sentences["text"][index]), sentences["label"][index])
    split = speech.load_split("test")
    return TestSet({"waveform": speech.served_waveforms(split.audio)}, split.labels)


def validation_set(name: str, models: Path) -> TestSet:
    """The validation split a shipped model was selected on (temperature scaling is fitted on it)."""
    config = load_model_config(models / name)
    if config.task == "image":
        data = images.SPECS[name].load()
        return TestSet({"pixels": images.served_pixels(data.x_val, config.image)}, data.y_val)
    if config.task == "text":
        texts, labels = text_data.corpus()
        encoder = TextEncoder(models / name / config.text.tokenizer, config.text.max_tokens)
        return TestSet(text.tokenize(encoder, texts["validation"]), labels["validation"])
    split = speech.load_split("val")
    return TestSet({"waveform": speech.served_waveforms(split.audio)}, split.labels)


def served_graph(name: str, models: Path, version: int | None = None) -> Path:
    """The graph the service serves by default: the highest version directory."""
    versions = sorted(int(p.name) for p in (models / name).iterdir() if p.name.isdigit())
    return models / name / str(version if version is not None else versions[-1]) / "model.onnx"


def session(path: Path, optimization: GraphOptimization = "all", threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with the options the service gives its own sessions."""
    options = session_options(Settings(graph_optimization=optimization, intra_op_threads=threads), 1)
    return ort.InferenceSession(str(path), sess_options=options, providers=[CPU])


def logits(sess: ort.InferenceSession, test: TestSet, batch: int = BATCH) -> np.ndarray:
    return np.concatenate([sess.run(["logits"], feeds)[0] for feeds in test.batches(batch)])


def card_accuracy(model_dir: Path) -> float:
    """The test accuracy a model card reports, as a fraction."""
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    return float(re.search(r"\| test accuracy \| \*\*([\d.]+)%\*\*", card).group(1)) / 100


def main(args: argparse.Namespace) -> int:
    if args.quality and args.alternatives:
        from training import quality_zoo

        return quality_zoo.main(args)
    if args.quality:
        from training import quality_report

        return quality_report.main(args)
    path = served_graph(args.model, args.models, args.version)
    test = test_set(args.model, args.models)
    predicted = logits(session(path, args.optimization), test).argmax(1)
    accuracy = float((predicted == test.labels).mean())
    card = card_accuracy(args.models / args.model)
    where = report.measured_with(args.optimization.upper())
    print(f"{args.model} ({path}): test accuracy {accuracy:.2%} on {len(test):,} samples; "
          f"card {card:.2%}; {where}")
    if abs(accuracy - card) > args.tolerance / 100:
        print(f"error: {abs(accuracy - card) * 100:.2f} points from the card (tolerance "
              f"{args.tolerance} points)", file=sys.stderr)
        return 1
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model name in the repository, e.g. fashion-mnist")
    parser.add_argument("--models", type=Path, default=Path("models"), help="model repository")
    parser.add_argument("--version", type=int, help="version directory (default: the highest)")
    parser.add_argument("--optimization", choices=("all", "extended", "basic", "disable"), default="all",
                        help="ONNX Runtime graph optimization (the service's default: all)")
    parser.add_argument("--quality", action="store_true",
                        help="calibration (ECE, temperature fitted on validation data) and the "
                             "out-of-domain sets instead of the test accuracy (training/quality.py)")
    parser.add_argument("--alternatives", action="store_true",
                        help="with --quality: the out-of-domain sets scored by the FP32 graph and the zoo's "
                             "alternatives too, as a table for docs/model-zoo.md (training/quality_zoo.py)")
    parser.add_argument("--write", action="store_true",
                        help="with --quality: fold the temperature into the served graph when it lowers "
                             "the test ECE, write reliability_diagram.png and the card's sections")
    parser.add_argument("--tolerance", type=float, default=0.1,
                        help="largest difference from the card's figure, in points")
