"""A tiny model repository (one image, one text, one speech model) built with onnx.helper, so the
deployment tests exercise every endpoint and every metric in a second of start-up time."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers

from tests.deploy.support import DEPLOY, background, free_port, tail, tool, wait_until

IMAGE_LABELS = ["circle", "square", "triangle"]
TEXT_LABELS = ["negative", "positive"]
SPEECH_LABELS = ["yes", "no", "maybe"]
VOCAB = ["[PAD]", "[UNK]", "good", "bad", "great", "awful", "movie", "film", "the", "a"]
IMAGE_SIZE = 8
SAMPLE_RATE = 8000
CLIP_SECONDS = 0.25


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def _weights(name: str, shape: tuple[int, ...], seed: int) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def image_model(path: Path) -> None:
    """uint8 pixels (N, 1, 8, 8) → softmax over three classes; the graph scales pixels itself."""
    pixels = IMAGE_SIZE * IMAGE_SIZE
    nodes = [
        helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "scale"], ["scaled"]),
        helper.make_node("Flatten", ["scaled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny-image",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 1, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(IMAGE_LABELS)])],
        [numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "scale"),
         _weights("w", (pixels, len(IMAGE_LABELS)), 1)])
    _save(graph, path)


def text_model(path: Path) -> None:
    """Token ids and mask (N, T) → mean of masked embeddings → softmax over two classes."""
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["logits"], keepdims=0),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny-text",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "T"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "T"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(TEXT_LABELS)])],
        [_weights("embedding", (len(VOCAB), len(TEXT_LABELS)), 2),
         numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
         numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")])
    _save(graph, path)


def speech_model(path: Path) -> None:
    """A mono clip (N, samples) → softmax over three classes."""
    samples = round(SAMPLE_RATE * CLIP_SECONDS)
    nodes = [
        helper.make_node("MatMul", ["waveform", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny-speech",
        [helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["N", samples])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(SPEECH_LABELS)])],
        [_weights("w", (samples, len(SPEECH_LABELS)), 3)])
    _save(graph, path)


def tokenizer(path: Path) -> None:
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def _labels(labels: list[str]) -> str:
    return "[" + ", ".join(f'"{label}"' for label in labels) + "]"


def build_repository(root: Path) -> Path:
    """Write tiny-image, tiny-text and tiny-speech (version 1 each) under `root`."""
    image_model(root / "tiny-image" / "1" / "model.onnx")
    (root / "tiny-image" / "config.toml").write_text(f"""\
name = "tiny-image"
task = "image"
labels = {_labels(IMAGE_LABELS)}
inputs = [{{ name = "pixels", datatype = "UINT8", shape = [-1, 1, {IMAGE_SIZE}, {IMAGE_SIZE}] }}]
outputs = [{{ name = "probabilities", datatype = "FP32", shape = [-1, {len(IMAGE_LABELS)}] }}]

[image]
width = {IMAGE_SIZE}
height = {IMAGE_SIZE}
color = "L"

[batching]
max_batch_size = 8
max_queue_delay_ms = 2
""")
    text_model(root / "tiny-text" / "1" / "model.onnx")
    tokenizer(root / "tiny-text" / "tokenizer.json")
    (root / "tiny-text" / "config.toml").write_text(f"""\
name = "tiny-text"
task = "text"
labels = {_labels(TEXT_LABELS)}
inputs = [
  {{ name = "input_ids", datatype = "INT64", shape = [-1, -1] }},
  {{ name = "attention_mask", datatype = "INT64", shape = [-1, -1] }},
]
outputs = [{{ name = "probabilities", datatype = "FP32", shape = [-1, {len(TEXT_LABELS)}] }}]

[text]
tokenizer = "tokenizer.json"
max_tokens = 16

[batching]
max_batch_size = 8
max_queue_delay_ms = 2
""")
    speech_model(root / "tiny-speech" / "1" / "model.onnx")
    (root / "tiny-speech" / "config.toml").write_text(f"""\
name = "tiny-speech"
task = "speech"
labels = {_labels(SPEECH_LABELS)}
inputs = [{{ name = "waveform", datatype = "FP32", shape = [-1, {round(SAMPLE_RATE * CLIP_SECONDS)}] }}]
outputs = [{{ name = "probabilities", datatype = "FP32", shape = [-1, {len(SPEECH_LABELS)}] }}]

[audio]
sample_rate = {SAMPLE_RATE}
duration_s = {CLIP_SECONDS}

[batching]
max_batch_size = 8
max_queue_delay_ms = 2
""")
    return root


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("models"))


# Module scope: the servers stop as soon as the module using them is done, not at the end of the run.
@pytest.fixture(scope="module")
def service_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def service(model_repository: Path, service_port: int,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service on the tiny repository, started as `python -m service serve` on a free port."""
    port = service_port
    log = tmp_path_factory.mktemp("service") / "service.log"
    args = [sys.executable, "-m", "service", "serve", "--model-repository", str(model_repository),
            "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0"]
    url = f"http://127.0.0.1:{port}"
    with background(args, log=log) as proc:
        try:
            wait_until(lambda: httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200,
                       timeout=90, what="the service to become ready", proc=proc)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- service log ---\n{tail(log)}") from None
        yield url


@pytest.fixture(scope="module")
def prometheus(service_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's Prometheus with the shipped deploy/prometheus/prometheus.yml, pointed at the service.

    Only the target address, the intervals (1 s, so a test need not wait 15 s for a scrape) and the
    absolute path of alerts.yml differ from the deployed file. Request it before `service`: it then
    starts while the service loads (Prometheus takes about 5 s to begin scraping)."""
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / name) for name in config["rule_files"]]
    port = free_port()
    for job in config["scrape_configs"]:
        target = f"127.0.0.1:{service_port if job['job_name'] == 'neuroserve' else port}"
        job["static_configs"] = [{"targets": [target]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"
    args = [tool("prometheus"), f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"]
    log = work / "prometheus.log"
    with background(args, log=log) as proc:
        try:
            wait_until(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200,
                       timeout=30, what="Prometheus to become ready", proc=proc)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- prometheus log ---\n{tail(log)}") from None
        yield url
