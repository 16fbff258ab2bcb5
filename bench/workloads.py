"""What the benchmark sends: model inputs and the HTTP request bodies built from them.

Inputs come from real held-out data where the data is on this machine (the Fashion-MNIST test set
from the Debian package); otherwise they are synthetic arrays of the right shape and dtype, and
`Workload.source` says so. Compute time of these models does not depend on the values, only on the
shapes, so synthetic inputs measure the same work; text is the exception (its length varies), which
is why sentences of mixed lengths are generated for text models.
"""

from __future__ import annotations

import gzip
import io
import random
import struct
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import orjson

V2_TO_NUMPY = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
FASHION_MNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")

# Words for synthetic review-like sentences; lengths are drawn so that short and long inputs mix.
_WORDS = str.split(
    "the movie was really good and i liked the acting but the plot felt slow in the middle "
    "great food terrible service would not come back again the staff were friendly though "
    "an excellent phone with a bright screen battery life is poor after the last update "
    "honestly one of the best books i have read this year the ending surprised me completely "
    "boring predictable and far too long nothing worked as promised i want my money back"
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass
class Request:
    """One HTTP request: path, extra headers and body (bytes)."""

    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Workload:
    """A model's sample inputs (one dict of arrays per request, batch axis of 1)."""

    model: str
    task: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    samples: list[dict[str, np.ndarray]]
    source: str
    texts: list[str] = field(default_factory=list)
    model_dir: Path | None = None

    def batch(self, size: int, start: int = 0) -> dict[str, np.ndarray]:
        """`size` consecutive samples stacked (and right-padded with zeros on dynamic axes)."""
        rows = [self.samples[(start + i) % len(self.samples)] for i in range(size)]
        out = {}
        for spec in self.inputs:
            arrays = [r[spec.name] for r in rows]
            shape = np.max([a.shape for a in arrays], axis=0)
            full = np.zeros((size, *shape[1:]), dtype=arrays[0].dtype)
            for i, a in enumerate(arrays):
                full[(i, *(slice(0, d) for d in a.shape[1:]))] = a[0]
            out[spec.name] = full
        return out

    def length_sorted(self) -> Workload:
        """The samples ordered by length (text), so that consecutive ones pad to the same length."""
        dynamic = [s.name for s in self.inputs if -1 in s.shape[1:]]
        if not dynamic:
            return self
        order = sorted(range(len(self.samples)), key=lambda i: self.samples[i][dynamic[0]].size)
        return replace(self, samples=[self.samples[i] for i in order],
                       texts=[self.texts[i] for i in order] if self.texts else [])


def _spec(d: dict) -> TensorSpec:
    return TensorSpec(d["name"], d["datatype"], tuple(d["shape"]))


def read_config(model_dir: Path) -> dict:
    with open(model_dir / "config.toml", "rb") as f:
        return tomllib.load(f)


def _fashion_mnist_images(n: int) -> np.ndarray | None:
    if not FASHION_MNIST_TEST.exists():
        return None
    with gzip.open(FASHION_MNIST_TEST, "rb") as f:
        _, count, rows, cols = struct.unpack(">IIII", f.read(16))
        data = np.frombuffer(f.read(count * rows * cols), dtype=np.uint8).reshape(count, rows, cols)
    return data[:n]


def _sentences(n: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(n):
        # Any length, as in real traffic: a few fixed lengths would let a length-grouping server
        # find rows of exactly the same length far more often than it ever would in production.
        length = rng.randint(3, 60)
        out.append(" ".join(rng.choice(_WORDS) for _ in range(length)))
    return out


def _synthetic(spec: TensorSpec, rng: np.random.Generator, dynamic: int = 16) -> np.ndarray:
    shape = tuple(1 if i == 0 else (dynamic if d == -1 else d) for i, d in enumerate(spec.shape))
    dtype = np.dtype(V2_TO_NUMPY[spec.datatype])
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype) * 0.1
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    high = 256 if dtype == np.uint8 else 1000
    return rng.integers(0, high, shape).astype(dtype)


def load_workload(model_dir: Path, n: int = 64, seed: int = 0) -> Workload:
    """Sample inputs for the model in `model_dir` (a `config.toml` beside integer version dirs)."""
    cfg = read_config(model_dir)
    name, task = cfg["name"], cfg["task"]
    inputs, outputs = [_spec(d) for d in cfg["inputs"]], [_spec(d) for d in cfg["outputs"]]
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    source = "synthetic inputs of the right shape and dtype (the model's data is not on this machine)"
    samples: list[dict[str, np.ndarray]] = []
    if task == "image" and name == "fashion-mnist" and (imgs := _fashion_mnist_images(n)) is not None:
        source = f"the first {n} images of the Fashion-MNIST test set (Debian dataset-fashion-mnist)"
        samples = [{inputs[0].name: img.reshape(1, 1, 28, 28)} for img in imgs]
    elif task == "text":
        texts = _sentences(n, random.Random(seed))
        tok_file = model_dir / (cfg.get("text") or {}).get("tokenizer", "tokenizer.json")
        max_tokens = (cfg.get("text") or {}).get("max_tokens", 128)
        if tok_file.exists():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_file))
            tok.no_padding()  # a tokenizer.json may pad to a fixed length; clients send real lengths
            source = ("synthetic review-like sentences of 3-60 words (uniform), tokenized with the "
                      "model's tokenizer")
            for t in texts:
                ids = tok.encode(t).ids[:max_tokens]
                samples.append(_text_sample(inputs, np.asarray(ids, dtype=np.int64)))
        else:
            source = "synthetic token ids of 5-64 tokens (no tokenizer.json beside the model)"
            for t in texts:
                ids = rng.integers(1, 1000, min(64, 2 + len(t.split()))).astype(np.int64)
                samples.append(_text_sample(inputs, ids))
    if not samples:
        samples = [{s.name: _synthetic(s, rng) for s in inputs} for _ in range(n)]
    return Workload(name, task, inputs, outputs, samples, source, texts, model_dir)


RAW_TEXT_SAMPLES = 1024  # enough sentences of each length for length-uniform batches of 128


def raw_workload(model_dir: Path) -> Workload:
    """The workload of the raw ORT ceiling: for text, many sentences sorted by length, so each batch
    pads as little as the best length-grouping server could (the same sentence-length mix as the
    load tests, whose first sentences are these)."""
    if read_config(model_dir)["task"] == "text":
        return load_workload(model_dir, n=RAW_TEXT_SAMPLES).length_sorted()
    return load_workload(model_dir)


def _text_sample(inputs: list[TensorSpec], ids: np.ndarray) -> dict[str, np.ndarray]:
    sample = {}
    for spec in inputs:
        if "mask" in spec.name:
            sample[spec.name] = np.ones((1, len(ids)), dtype=V2_TO_NUMPY[spec.datatype])
        else:
            sample[spec.name] = ids.astype(V2_TO_NUMPY[spec.datatype]).reshape(1, -1)
    return sample


def find_models(repository: Path) -> list[Path]:
    """Model directories of a repository: those with a config.toml and at least one version dir."""
    out = []
    for d in sorted(repository.iterdir()) if repository.is_dir() else []:
        if (d / "config.toml").exists() and any(p.is_dir() and p.name.isdigit() for p in d.iterdir()):
            out.append(d)
    return out


def model_file(model_dir: Path) -> Path:
    """The newest version's model.onnx."""
    versions = sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                      key=lambda p: int(p.name))
    return versions[-1] / "model.onnx"


# --- request bodies ---------------------------------------------------------------------------

def v2_json(w: Workload, sample: dict[str, np.ndarray]) -> Request:
    body = {"inputs": [
        {"name": s.name, "shape": list(sample[s.name].shape), "datatype": s.datatype,
         "data": sample[s.name].ravel().tolist()}
        for s in w.inputs
    ]}
    return Request(f"/v2/models/{w.model}/infer", orjson.dumps(body),
                   {"Content-Type": "application/json"})


def v2_binary(w: Workload, sample: dict[str, np.ndarray]) -> Request:
    """The binary tensor data extension: a JSON header, then the raw tensors; binary outputs too."""
    raws = [np.ascontiguousarray(sample[s.name]).tobytes() for s in w.inputs]
    header = {
        "inputs": [
            {"name": s.name, "shape": list(sample[s.name].shape), "datatype": s.datatype,
             "parameters": {"binary_data_size": len(raw)}}
            for s, raw in zip(w.inputs, raws, strict=True)
        ],
        "outputs": [{"name": o.name, "parameters": {"binary_data": True}} for o in w.outputs],
    }
    head = orjson.dumps(header)
    return Request(f"/v2/models/{w.model}/infer", head + b"".join(raws),
                   {"Content-Type": "application/octet-stream",
                    "Inference-Header-Content-Length": str(len(head))})


TASK_ENDPOINT = {"image": "image", "text": "text", "speech": "audio"}


def task_request(w: Workload, i: int) -> Request:
    """A task-endpoint request: a PNG (image) or WAV (speech) file as the body, or JSON text."""
    path = f"/v1/{TASK_ENDPOINT.get(w.task, w.task)}/{w.model}"
    sample = w.samples[i % len(w.samples)]
    if w.task == "text":
        text = w.texts[i % len(w.texts)] if w.texts else "a fine day"
        return Request(path, orjson.dumps({"text": text}), {"Content-Type": "application/json"})
    if w.task == "image":
        from PIL import Image

        arr = next(iter(sample.values()))[0]
        img = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return Request(path, buf.getvalue(), {"Content-Type": "image/png"})
    import soundfile as sf

    wav = next(iter(sample.values()))[0].astype(np.float32)
    wav = np.clip(wav / max(1e-6, float(np.abs(wav).max())) * 0.5, -1, 1)
    buf = io.BytesIO()
    sf.write(buf, wav, 16000, format="WAV", subtype="PCM_16")
    return Request(path, buf.getvalue(), {"Content-Type": "audio/wav"})


def requests_for(w: Workload, protocol: str, n: int = 64) -> list[Request]:
    """`n` requests of one protocol (`v2-json`, `v2-binary`, `task`), cycling over the samples."""
    n = min(n, len(w.samples))
    if protocol == "v2-json":
        return [v2_json(w, w.samples[i]) for i in range(n)]
    if protocol == "v2-binary":
        return [v2_binary(w, w.samples[i]) for i in range(n)]
    if protocol == "task":
        return [task_request(w, i) for i in range(n)]
    raise ValueError(f"unknown protocol {protocol!r}")
