"""What a trained model leaves behind besides its graph: metrics, plots, config.toml and model card."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import onnxruntime as ort
import tomli_w

from service.core.model_config import ModelConfig


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    precision: np.ndarray  # per class
    recall: np.ndarray  # per class
    confusion: np.ndarray  # rows: true class, columns: predicted class
    samples: int


def evaluate(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> Evaluation:
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(tp / confusion.sum(axis=0))
        recall = np.nan_to_num(tp / confusion.sum(axis=1))
    return Evaluation(float(tp.sum() / len(y_true)), precision, recall, confusion, len(y_true))


# The instruction sets that pick different ONNX Runtime (MLAS) kernels, best first, as the kernel's
# /proc/cpuinfo names them.
_ISAS = [("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"), ("avx512bw", "AVX-512"), ("avx2", "AVX2")]


def cpu_description() -> str:
    """The CPU's model name and the best of the instruction sets that change ORT's kernels."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = next((name for flag, name in _ISAS if flag in flags), "no AVX2")
    return f"{model} ({isa})"


def measured_with(optimization: str = "ALL") -> str:
    """What a card's figures ran on: ONNX Runtime version, provider, optimization level and CPU."""
    return (f"ONNX Runtime {ort.__version__}, CPUExecutionProvider, graph optimization {optimization}, "
            f"{cpu_description()}")


def plot_confusion(ev: Evaluation, labels: list[str], path: Path, title: str) -> None:
    n = len(labels)
    # At least 5 inches wide so the title of a two-class matrix is not cut off.
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.6 * n), max(4.0, 0.8 + 0.6 * n)), dpi=100)
    normalised = ev.confusion / np.maximum(ev.confusion.sum(axis=1, keepdims=True), 1)
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if ev.confusion[i, j]:
                ax.text(j, i, str(ev.confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if normalised[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} — accuracy {ev.accuracy:.2%}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(history: dict[str, list[float]], path: Path, title: str) -> None:
    """`history` maps a series name (e.g. "train loss", "val accuracy") to one value per epoch."""
    losses = {k: v for k, v in history.items() if "loss" in k}
    others = {k: v for k, v in history.items() if "loss" not in k}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    for ax, series, ylabel in ((axes[0], losses, "loss"), (axes[1], others, "accuracy")):
        for name, values in series.items():
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_config(model_dir: Path, config: ModelConfig) -> None:
    """Write config.toml, validating it through the same schema the service loads it with."""
    data = ModelConfig.model_validate(config.model_dump()).model_dump(exclude_none=True)
    (model_dir / "config.toml").write_text(tomli_w.dumps(data), encoding="utf-8")


@dataclass
class ModelCard:
    """Everything `models/<name>/README.md` says; figures are filled from measured values only."""

    name: str
    title: str
    summary: str
    architecture: str
    parameters: int
    data_sources: list[str]  # markdown lines: source, package and version, licence, sha256s
    split: str
    evaluation: Evaluation
    labels: list[str]
    training_seconds: float
    onnx_bytes: int
    parity: str
    training_command: str
    notes: list[str] = field(default_factory=list)
    measured_with: str = field(default_factory=measured_with)

    def render(self) -> str:
        ev = self.evaluation
        rows = "\n".join(
            f"| {label} | {p:.3f} | {r:.3f} | {int(ev.confusion[i].sum())} |"
            for i, (label, p, r) in enumerate(zip(self.labels, ev.precision, ev.recall, strict=True))
        )
        sources = "\n".join(f"- {line}" for line in self.data_sources)
        notes = "\n".join(f"- {line}" for line in self.notes)
        return f"""# {self.title}

{self.summary}

| | |
|---|---|
| architecture | {self.architecture} |
| parameters | {self.parameters:,} |
| test accuracy | **{ev.accuracy:.2%}** on {ev.samples:,} held-out samples |
| measured with | {self.measured_with} |
| training time | {self.training_seconds / 60:.1f} min on 2 CPU cores |
| ONNX file | {self.onnx_bytes / 1e6:.2f} MB |
| PyTorch vs ONNX Runtime | {self.parity} |

## Data
{sources}

Split: {self.split}

## Per-class results (test set)
| class | precision | recall | support |
|---|---|---|---|
{rows}

![confusion matrix](confusion_matrix.png)

![training curves](training_curves.png)

## Notes
{notes}

Reproduce: `{self.training_command}`; check the served graph's figure on this machine:
`python -m training evaluate {self.name}`
"""

    def write(self, model_dir: Path) -> None:
        (model_dir / "README.md").write_text(self.render(), encoding="utf-8")
