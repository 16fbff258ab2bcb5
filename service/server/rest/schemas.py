"""Wire formats as pydantic models.

The V2 infer route parses its body with orjson for speed; its models here exist to document that
body in the OpenAPI schema. The task endpoints validate with them for real.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ErrorBody(BaseModel):
    """Every error response."""

    error: str = Field(examples=["unknown model 'nope'"])
    code: str = Field(examples=["model_not_found"], description="Machine-readable: invalid_input, "
                      "model_not_found, too_large, unsupported_media, queue_full, not_ready, deadline, ...")


# -- V2 -------------------------------------------------------------------------------------------


class V2Tensor(BaseModel):
    name: str
    datatype: Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                      "FP16", "FP32", "FP64", "BYTES"]
    shape: list[int] = Field(description="Full shape, batch axis first")
    data: list[Any] | None = Field(None, description="Row-major elements, flat or nested; omitted when "
                                   "parameters.binary_data_size places the tensor in the binary part")
    parameters: dict[str, Any] | None = Field(None, examples=[{"binary_data_size": 784}])


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data: bool; classification: k (top-k 'score:index:label' strings)",
        examples=[{"classification": 3}])


class V2InferRequest(BaseModel):
    id: str | None = Field(None, description="Echoed in the response")
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_output: bool (all outputs binary); timeout: microseconds")
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = Field(None, description="Default: every output")


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2Tensor]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str = "onnxruntime_onnx"
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]
    parameters: dict[str, Any] = Field(default_factory=dict, description="task, provider, labels")


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class RepositoryIndexRequest(BaseModel):
    ready: bool = Field(False, description="Only READY model versions")


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str | None = None
    state: Literal["LOADING", "READY", "UNAVAILABLE", "UNLOADED"]
    reason: str = ""


IMAGE_EXAMPLE = {
    "id": "req-1",
    "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}],
    "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
}
TEXT_EXAMPLE = {
    "inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, 4], "data": [[2, 17, 43, 3]]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [1, 4], "data": [[1, 1, 1, 1]]},
    ]
}
BYTES_EXAMPLE = {
    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["what a great film"]}]
}
RESPONSE_EXAMPLE = {
    "model_name": "fashion-mnist", "model_version": "1", "id": "req-1",
    "outputs": [{"name": "probabilities", "datatype": "BYTES", "shape": [1, 3],
                 "data": ["0.912000:9:Ankle boot", "0.051000:7:Sneaker", "0.020000:5:Sandal"]}],
}


# -- tasks ----------------------------------------------------------------------------------------


class TextRequest(BaseModel):
    """Either one `text` or a list of `texts`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"text": "An absolute delight from start to finish."},
                     {"texts": ["Loved it.", "A tedious, overlong mess."]}]})

    text: str | None = None
    texts: list[str] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> TextRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        if self.texts is not None and not self.texts:
            raise ValueError("'texts' is empty")
        return self

    def items(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class LabelScore(BaseModel):
    label: str
    probability: float


class ItemError(BaseModel):
    """A text the request could not read (`?partial=true`): its index, and the error it alone got."""

    index: int
    error: str = Field(examples=["text 1: 31,208 tokens; the limit is 25,000"])
    code: str = Field(examples=["too_large"])
    status: int = Field(examples=[413], description="The HTTP status the text alone would have got")


class ClassifyResponse(BaseModel):
    model: str = Field(examples=["fashion-mnist"])
    version: str = Field(examples=["1"])
    predictions: list[list[LabelScore] | None] = Field(
        description="Per input, the top-k labels, most probable first (null: a text refused under "
                    "`?partial=true`, named in `errors`)",
        examples=[[[{"label": "Ankle boot", "probability": 0.91},
                    {"label": "Sneaker", "probability": 0.05}]]],
    )
    windows: list[int] | None = Field(
        None, description="Text models: per text, how many token windows were read (0: refused); a "
                          "text longer than the model's window is read whole, in overlapping windows")
    errors: list[ItemError] | None = Field(
        None, description="With `?partial=true`: the texts that were refused, by index")
    labels: list[str | None] | None = Field(
        None, description="With `?min_probability` (or the model's configured default): per input, the "
                          "top label, or `_uncertain_` when its probability is below `min_probability` "
                          "(null: a text refused under `?partial=true`)",
        examples=[["Ankle boot", "_uncertain_"]])
    min_probability: float | None = Field(
        None, description="The threshold `labels` were decided with (the request's `?min_probability`, "
                          "else the model's default); absent when none applies", examples=[0.8])


DOC_MODELS: list[type[BaseModel]] = [ErrorBody, V2InferRequest, V2InferResponse, V2ModelMetadata,
                                     V2ServerMetadata, RepositoryIndexEntry, RepositoryIndexRequest,
                                     ClassifyResponse, TextRequest]
