"""The schema of `models/<name>/config.toml`: what a model takes, returns and how it is batched.

`training` writes these files and the service reads them; this module is the contract between the
two. Unknown keys are errors so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# V2 (Open Inference Protocol) datatype names, mapped to numpy dtype strings.
V2_TO_NUMPY: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
NUMPY_TO_V2: dict[str, str] = {v: k for k, v in V2_TO_NUMPY.items()}

Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                   "FP16", "FP32", "FP64"]
Task = Literal["image", "text", "speech"]


# The CUDA execution provider as ONNX Runtime names it (what versions report as their provider).
CUDA = "CUDAExecutionProvider"

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(Strict):
    """One graph input or output. `shape` includes the batch axis; -1 marks a dynamic axis."""

    name: str
    datatype: Datatype
    shape: list[int]

    @model_validator(mode="after")
    def _check_shape(self) -> TensorSpec:
        if not self.shape or self.shape[0] != -1:
            raise ValueError(f"tensor {self.name!r}: the first axis must be the dynamic batch axis (-1)")
        if any(d == 0 or d < -1 for d in self.shape):
            raise ValueError(f"tensor {self.name!r}: dimensions are positive or -1, got {self.shape}")
        return self


class ImagePreprocessing(Strict):
    """How an uploaded picture becomes the uint8 pixel tensor the graph scales itself."""

    width: int = Field(gt=0)
    height: int = Field(gt=0)
    color: Literal["L", "RGB"] = "L"
    # Fashion-MNIST and MNIST show a light object on black; photos of dark-on-light drawings need
    # inverting to look like the training data. "auto" inverts when the border is brighter than the
    # centre.
    invert: Literal["never", "always", "auto"] = "never"


class TextPreprocessing(Strict):
    tokenizer: str = "tokenizer.json"
    max_tokens: int = Field(default=128, gt=1)  # the model's window; a longer text is read in windows
    # Between the starts of two windows of a long text, as a share of a window's content tokens.
    window_stride: float = Field(default=0.5, gt=0, le=1)


class AudioPreprocessing(Strict):
    sample_rate: int = Field(default=16000, gt=0)
    duration_s: float = Field(default=1.0, gt=0)


class CudaBatching(Strict):
    """`[batching.cuda]`: knobs that replace `[batching]`'s where a version runs on the CUDA provider.
    A GPU computes a larger batch for little more than a small one, so the best knobs differ from a
    CPU's (docs/benchmarks-gpu.md). `instances` is not among them: sessions are made before the
    provider they bind to is known."""

    max_batch_size: int | None = Field(default=None, ge=1)
    max_queue_delay_ms: float | None = Field(default=None, ge=0)
    max_queue_size: int | None = Field(default=None, ge=1)
    max_padding_ratio: float | None = Field(default=None, ge=0, lt=1)
    max_queue_wait_ms: float | None = Field(default=None, ge=0)


# A request expected to wait longer than this in the queue is refused (429 with Retry-After). Off
# unless a model sets it: a client's own batch of texts, each a row, would otherwise be refused by
# an idle server once its rows alone outlast the bound (32 reviews for the CPU sentiment model).
# The shipped image models, one row per request, set 100 ms.
DEFAULT_MAX_QUEUE_WAIT_MS = 0.0


class Batching(Strict):
    max_batch_size: int = Field(default=32, ge=1)
    max_queue_delay_ms: float = Field(default=2.0, ge=0)
    max_queue_size: int = Field(default=512, ge=1)
    # Refuse a request whose expected wait (the rows ahead of it times the measured compute time
    # per row) is over this: the queue's latency bound, beside `max_queue_size`'s rows. 0: off.
    max_queue_wait_ms: float = Field(default=DEFAULT_MAX_QUEUE_WAIT_MS, ge=0)
    instances: int = Field(default=1, ge=1)
    # Largest share of a padded batch tensor that may be padding (variable-length inputs only). What
    # a batch saves against what its padding costs depends on the model and the hardware: on a
    # CPU with one thread per session, batching a transformer gains little and padding is pure loss.
    max_padding_ratio: float = Field(default=0.5, ge=0, lt=1)
    cuda: CudaBatching | None = None


class VersionPolicy(Strict):
    """Which integer version directories are served: the newest `latest` ones, or a fixed list."""

    latest: int | None = Field(default=1, ge=1)
    specific: list[int] | None = None

    @model_validator(mode="after")
    def _one_policy(self) -> VersionPolicy:
        if self.specific is not None and self.latest is not None and "latest" in self.model_fields_set:
            raise ValueError("version_policy: give either `latest` or `specific`, not both")
        return self


class ModelConfig(Strict):
    name: str
    task: Task
    description: str = ""
    inputs: Annotated[list[TensorSpec], Field(min_length=1)]
    outputs: Annotated[list[TensorSpec], Field(min_length=1)]
    # A file of one label per line, relative to the model directory, or the labels inline.
    labels: str | list[str]
    # The output that task endpoints and the V2 classification extension read probabilities from.
    scores_output: str = "probabilities"
    # The task endpoints' default `?min_probability`: below it, an input's decided label is
    # `_uncertain_` (the request's own value wins). None: no decided labels unless a request asks.
    min_probability: float | None = Field(default=None, gt=0, le=1)
    image: ImagePreprocessing | None = None
    text: TextPreprocessing | None = None
    audio: AudioPreprocessing | None = None
    batching: Batching = Batching()
    version_policy: VersionPolicy = VersionPolicy()

    @model_validator(mode="after")
    def _check_task_section(self) -> ModelConfig:
        section = {"image": self.image, "text": self.text, "speech": self.audio}[self.task]
        if section is None:
            key = "audio" if self.task == "speech" else self.task
            raise ValueError(f"task {self.task!r} needs a [{key}] section")
        if self.scores_output not in {o.name for o in self.outputs}:
            raise ValueError(f"scores_output {self.scores_output!r} is not one of the outputs")
        return self

    def on_provider(self, on_cuda: bool) -> ModelConfig:
        """This config as a version serves it: on CUDA, with `[batching.cuda]`'s knobs over `[batching]`'s."""
        cuda = self.batching.cuda
        if not on_cuda or cuda is None:
            return self
        batching = self.batching.model_copy(update=cuda.model_dump(exclude_none=True))
        return self.model_copy(update={"batching": batching})

    def label_list(self, model_dir: Path) -> list[str]:
        if isinstance(self.labels, list):
            return list(self.labels)
        lines = (model_dir / self.labels).read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip()]


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read and validate `model_dir/config.toml` (raises pydantic.ValidationError or OSError)."""
    with open(model_dir / "config.toml", "rb") as f:
        return ModelConfig.model_validate(tomllib.load(f))
