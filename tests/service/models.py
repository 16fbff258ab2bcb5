"""Small ONNX graphs built with onnx.helper, shaped like the shipped models, for the service tests.

Each writer creates `<repo>/<name>/config.toml` and `<repo>/<name>/<version>/model.onnx`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]
IMAGE_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
TEXT_VOCAB = [
    "[PAD]",
    "[UNK]",
    "the",
    "a",
    "film",
    "movie",
    "was",
    "is",
    "great",
    "good",
    "wonderful",
    "loved",
    "it",
    "bad",
    "terrible",
    "awful",
    "boring",
    "hated",
    "not",
    "very",
    "plot",
    "actors",
    "and",
    "but",
    "story",
    "music",
    "fun",
    "dull",
    "brilliant",
    "mess",
    "i",
    "this",
]


def _save(graph: onnx.GraphProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    model = helper.make_model(graph, opset_imports=OPSET, producer_name="neuroserve-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _write(model_dir: Path, config: str) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.toml").write_text(config)


def _head(nodes: list, features: str, n_in: int, n_out: int, rng: np.random.Generator, inits: list) -> None:
    """features [B, n_in] → logits, probabilities [B, n_out]."""
    inits += [
        numpy_helper.from_array(rng.normal(0, 1, (n_in, n_out)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(0, 0.1, (n_out,)).astype(np.float32), "b"),
    ]
    nodes += [
        helper.make_node("MatMul", [features, "W"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]


def _outputs(n: int) -> list:
    return [
        helper.make_tensor_value_info(o, TensorProto.FLOAT, ["batch", n]) for o in ("logits", "probabilities")
    ]


def _batching(max_batch: int = 8, delay_ms: float = 2.0, queue: int = 256, instances: int = 1,
              cuda: dict[str, object] | None = None, wait_ms: float | None = None) -> str:
    """[batching], and a [batching.cuda] table of the given knobs (`wait_ms`: max_queue_wait_ms)."""
    text = (
        f"[batching]\nmax_batch_size = {max_batch}\nmax_queue_delay_ms = {delay_ms}\n"
        f"max_queue_size = {queue}\ninstances = {instances}\n"
    )
    if wait_ms is not None:
        text += f"max_queue_wait_ms = {wait_ms}\n"
    if cuda:
        text += "\n[batching.cuda]\n" + "".join(f"{k} = {v}\n" for k, v in cuda.items())
    return text


def image_model(repo: Path, name: str = "tiny-image", versions: tuple[int, ...] = (1,), **batching) -> Path:
    """uint8 pixels [B,1,28,28] → /255 → linear → softmax over 10 Fashion-MNIST labels."""
    d = repo / name
    labels = ", ".join(f'"{label}"' for label in IMAGE_LABELS)
    _write(
        d,
        f'''name = "{name}"
task = "image"
description = "test image classifier"
labels = [{labels}]
inputs = [{{ name = "pixels", datatype = "UINT8", shape = [-1, 1, 28, 28] }}]
outputs = [
  {{ name = "logits", datatype = "FP32", shape = [-1, 10] }},
  {{ name = "probabilities", datatype = "FP32", shape = [-1, 10] }},
]

[image]
width = 28
height = 28
color = "L"

{_batching(**batching)}
[version_policy]
latest = {len(versions)}
''',
    )
    for v in versions:
        rng = np.random.default_rng(v)
        inits = [
            numpy_helper.from_array(np.array([-1, 784], dtype=np.int64), "flat"),
            numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "scale"),
        ]
        nodes = [
            helper.make_node("Cast", ["pixels"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["f", "scale"], ["scaled"]),
            helper.make_node("Reshape", ["scaled", "flat"], ["features"]),
        ]
        _head(nodes, "features", 784, 10, rng, inits)
        graph = helper.make_graph(
            nodes,
            name,
            [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", 1, 28, 28])],
            _outputs(10),
            inits,
        )
        _save(graph, d / str(v) / "model.onnx")
    return d


def text_model(repo: Path, name: str = "tiny-text", **batching) -> Path:
    """ids, mask [B,L] → embedding → mean over unmasked tokens → linear → softmax (2 labels).

    Padding positions are masked out, so an answer must not depend on how much padding a batch adds.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    d = repo / name
    _write(
        d,
        f'''name = "{name}"
task = "text"
labels = ["negative", "positive"]
inputs = [
  {{ name = "input_ids", datatype = "INT64", shape = [-1, -1] }},
  {{ name = "attention_mask", datatype = "INT64", shape = [-1, -1] }},
]
outputs = [
  {{ name = "logits", datatype = "FP32", shape = [-1, 2] }},
  {{ name = "probabilities", datatype = "FP32", shape = [-1, 2] }},
]

[text]
tokenizer = "tokenizer.json"
max_tokens = 32

{_batching(**batching)}''',
    )
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TEXT_VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (len(TEXT_VOCAB), 8)).astype(np.float32), "E"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "ax1"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "ax2"),
    ]
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "ax2"], ["m3"]),
        helper.make_node("Mul", ["emb", "m3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "ax1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["m", "ax1"], ["count"], keepdims=1),
        helper.make_node("Div", ["summed", "count"], ["features"]),
    ]
    _head(nodes, "features", 8, 2, rng, inits)
    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        _outputs(2),
        inits,
    )
    _save(graph, d / "1" / "model.onnx")
    return d


def audio_model(
    repo: Path, name: str = "tiny-audio", sample_rate: int = 8000, duration_s: float = 0.5,
    echo: bool = False, **batching
) -> Path:
    """waveform [B,N] → |x| → energy in 10 segments → linear → softmax (3 labels); `echo` adds an
    output `echo`, the waveform itself (answers as large as their requests)."""
    d = repo / name
    n = round(sample_rate * duration_s)
    echo_output = f'\n  {{ name = "echo", datatype = "FP32", shape = [-1, {n}] }},' if echo else ""
    _write(
        d,
        f'''name = "{name}"
task = "speech"
labels = ["yes", "no", "silence"]
inputs = [{{ name = "waveform", datatype = "FP32", shape = [-1, {n}] }}]
outputs = [
  {{ name = "logits", datatype = "FP32", shape = [-1, 3] }},
  {{ name = "probabilities", datatype = "FP32", shape = [-1, 3] }},{echo_output}
]

[audio]
sample_rate = {sample_rate}
duration_s = {duration_s}

{_batching(**batching)}''',
    )
    rng = np.random.default_rng(11)
    inits = [
        numpy_helper.from_array(np.array([-1, 10, n // 10], dtype=np.int64), "segments"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "ax2"),
    ]
    nodes = [
        helper.make_node("Abs", ["waveform"], ["a"]),
        helper.make_node("Reshape", ["a", "segments"], ["seg"]),
        helper.make_node("ReduceSum", ["seg", "ax2"], ["features"], keepdims=0),
    ]
    _head(nodes, "features", 10, 3, rng, inits)
    outputs = _outputs(3)
    if echo:
        nodes.append(helper.make_node("Identity", ["waveform"], ["echo"]))
        outputs.append(helper.make_tensor_value_info("echo", TensorProto.FLOAT, ["batch", n]))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["batch", n])],
        outputs,
        inits,
    )
    _save(graph, d / "1" / "model.onnx")
    return d


def slow_model(repo: Path, name: str = "slow", width: int = 512, **batching) -> Path:
    """A deliberately slow graph (two [width × width] matmuls on a [width × width] matrix per row)."""
    d = repo / name
    batching = {"max_batch": 4, "queue": 4, **batching}
    _write(
        d,
        f'''name = "{name}"
task = "speech"
labels = ["a", "b"]
inputs = [{{ name = "waveform", datatype = "FP32", shape = [-1, {width}] }}]
outputs = [
  {{ name = "logits", datatype = "FP32", shape = [-1, 2] }},
  {{ name = "probabilities", datatype = "FP32", shape = [-1, 2] }},
]

[audio]
sample_rate = {width}
duration_s = 1.0

{_batching(**batching)}''',
    )
    rng = np.random.default_rng(3)
    scale = 1 / np.sqrt(width)
    inits = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), "ax1"),
        numpy_helper.from_array(np.ones((width, 1), dtype=np.float32), "ones"),
        numpy_helper.from_array((rng.normal(0, 1, (width, width)) * scale).astype(np.float32), "W1"),
        numpy_helper.from_array((rng.normal(0, 1, (width, width)) * scale).astype(np.float32), "W2"),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["waveform", "ax1"], ["row"]),
        helper.make_node("Mul", ["row", "ones"], ["square"]),
        helper.make_node("MatMul", ["square", "W1"], ["h1"]),
        helper.make_node("Tanh", ["h1"], ["t1"]),
        helper.make_node("MatMul", ["t1", "W2"], ["h2"]),
        helper.make_node("ReduceSum", ["h2", "ax1"], ["features"], keepdims=0),
    ]
    _head(nodes, "features", width, 2, rng, inits)
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["batch", width])],
        _outputs(2),
        inits,
    )
    _save(graph, d / "1" / "model.onnx")
    return d


def fragile_model(repo: Path, name: str = "fragile", **batching) -> Path:
    """Values are used as table indices: a value ≥ 10 makes ONNX Runtime fail (out of bounds)."""
    d = repo / name
    _write(
        d,
        f'''name = "{name}"
task = "speech"
labels = ["x", "y", "z"]
inputs = [{{ name = "waveform", datatype = "FP32", shape = [-1, 4] }}]
outputs = [
  {{ name = "logits", datatype = "FP32", shape = [-1, 3] }},
  {{ name = "probabilities", datatype = "FP32", shape = [-1, 3] }},
]

[audio]
sample_rate = 4
duration_s = 1.0

{_batching(**batching)}''',
    )
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (10, 3)).astype(np.float32), "table"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "ax1"),
    ]
    nodes = [
        helper.make_node("Cast", ["waveform"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "idx"], ["rows"]),
        helper.make_node("ReduceSum", ["rows", "ax1"], ["logits"], keepdims=0),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["batch", 4])],
        _outputs(3),
        inits,
    )
    _save(graph, d / "1" / "model.onnx")
    return d


def broken_config_model(repo: Path, name: str = "bad-config") -> Path:
    d = repo / name
    _write(
        d,
        f'''name = "{name}"
task = "image"
labels = ["a"]
colour_typo = "RGB"
inputs = [{{ name = "pixels", datatype = "UINT8", shape = [-1, 1, 28, 28] }}]
outputs = [{{ name = "probabilities", datatype = "FP32", shape = [-1, 1] }}]

[image]
width = 28
height = 28
''',
    )
    (d / "1").mkdir()
    (d / "1" / "model.onnx").write_bytes(b"not used")
    return d


def corrupt_onnx_model(repo: Path, name: str = "bad-onnx") -> Path:
    d = image_model(repo, name)
    (d / "1" / "model.onnx").write_bytes(b"\x08\x07garbage that is not a protobuf graph" * 10)
    return d


def mismatched_model(repo: Path, name: str = "mismatch") -> Path:
    """config.toml says FP32 pixels but the graph takes UINT8: caught at load."""
    d = image_model(repo, name)
    config = (d / "config.toml").read_text().replace('datatype = "UINT8"', 'datatype = "FP32"')
    (d / "config.toml").write_text(config)
    return d
