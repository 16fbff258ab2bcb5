"""`POST /v1/explain/{model}`: why the model answered what it did, by occlusion.

Takes the inputs its task endpoint takes (an image or audio upload, or texts) and answers, per
input, the prediction and an attribution for one class (the predicted one unless `target` names
another): a heatmap for images, the importance of each word for text, of each time segment for
audio. An input and all its occluded copies go to the model's batcher as one request
(`Batcher.submit_many`), computed in full batches; `--max-explain-rows` bounds the rows of one
request and `neuroserve_explanation_rows` records them.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from service.auth.gate import priority_ceiling
from service.core.batching import BatchResult
from service.core.catalog import ModelVersion
from service.errors import InvalidInput, PayloadTooLarge
from service.explain import audio as audio_explain
from service.explain import png
from service.explain import text as text_explain
from service.explain.image import ImageOcclusion
from service.server.rest.common import admit, deadline, state_of
from service.server.rest.middleware import RequestContext
from service.server.rest.schemas import ErrorBody, LabelScore
from service.server.rest.tasks import (
    TOP_K_DEFAULT,
    TopK,
    Version,
    audio_inputs,
    image_inputs,
    text_inputs,
    waveform_dtype,
)

router = APIRouter(prefix="/v1", tags=["explain"])


class Explanation(BaseModel):
    prediction: list[LabelScore] = Field(description="The top-k labels of the input itself")
    target: LabelScore = Field(description="The class explained, with its probability")
    method: Literal["occlusion"] = "occlusion"
    rows: int = Field(description="Rows computed: the input and its occluded copies")
    batches: int = Field(description="ORT calls those rows took (full batches of max_batch_size)")
    heatmap: list[list[float]] | None = Field(
        None, description="Image: [height][width] mean drop of the target's probability when the pixel "
        "was hidden (positive: it supports the target)")
    heatmap_png: str | None = Field(None, description="Image: the heatmap as a base64 RGBA PNG overlay "
                                    "(red supports, blue opposes; opacity is the size)")
    input_png: str | None = Field(None, description="Image: base64 PNG of the pixels the model saw")
    patch: int | None = Field(None, description="Image: side of the occluding square, in pixels")
    stride: int | None = Field(None, description="Image: pixels between patch positions")
    baseline: str | None = Field(None, description="Image: what the patch shows (zero: black; mean)")
    text: str | None = None
    spans: list[dict[str, Any]] | None = Field(
        None, description="Text: each word {start, end, text, importance}; importance is null for "
        "words past the model's token limit")
    segments: list[dict[str, float]] | None = Field(
        None, description="Audio: each time segment {start_s, end_s, importance}")
    spectrogram_png: str | None = Field(
        None, description="Audio: base64 PNG of the clip's spectrogram (time →, frequency ↑), each "
        "segment tinted by its importance")


class ExplainResponse(BaseModel):
    model: str
    version: str
    explanations: list[Explanation] = Field(description="One per input, in order")


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ExplainResponse, "content": {"image/png": {}}},
    **{s: {"model": ErrorBody} for s in (400, 404, 413, 415, 429, 503, 504)},
}
_BODY = {"requestBody": {"required": True, "content": {
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "audio/wav": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {
        "type": "array", "items": {"type": "string", "format": "binary"},
        "description": "One or more image or audio files"}}}},
    "application/json": {"schema": {"$ref": "#/components/schemas/TextRequest"},
                         "example": {"text": "A gripping, beautifully shot film."}},
    "text/plain": {"schema": {"type": "string"}},
}}}

Target = Annotated[str | None, Query(description="Label to explain (default: the predicted one)")]
Patch = Annotated[int | None, Query(ge=1, le=4096, description="Image: occluding square's side in "
                                    "pixels (default: a fifth of the picture's side)")]
Stride = Annotated[int | None, Query(ge=1, le=4096, description="Image: pixels between patch positions "
                                     "(default: a third of the patch)")]
BaselineQ = Annotated[Literal["zero", "mean"], Query(description="Image: what the patch shows")]
WindowMs = Annotated[float | None, Query(gt=0, le=10_000, description="Audio: silenced window in ms "
                                         "(default 150)")]
StrideMs = Annotated[float | None, Query(gt=0, le=10_000, description="Audio: ms between windows and "
                                         "length of a reported segment (default 50)")]


@router.post("/explain/{model}", summary="Explain predictions (occlusion)", response_class=Response,
             responses=_RESPONSES, openapi_extra=_BODY)
async def explain(request: Request, model: str, target: Target = None, top_k: TopK = TOP_K_DEFAULT,
                  version: Version = None, patch: Patch = None, stride: Stride = None,
                  baseline: BaselineQ = "zero", window_ms: WindowMs = None,
                  stride_ms: StrideMs = None) -> Response:
    """The same body as the model's task endpoint. With `Accept: image/png` and one image, the
    answer is the heatmap overlay itself."""
    mv, ctx = admit(request, "explain", model, version)
    target_index = _target_index(mv, target)
    task = mv.config.task
    if task == "image":
        explanations = await _explain_images(request, mv, ctx, target_index, top_k, patch, stride, baseline)
        if request.headers.get("accept", "").startswith("image/png") and len(explanations) == 1:
            return Response(base64.b64decode(explanations[0]["heatmap_png"]), media_type="image/png")
    elif task == "text":
        explanations = await _explain_texts(request, mv, ctx, target_index, top_k)
    else:
        explanations = await _explain_clips(request, mv, ctx, target_index, top_k, window_ms, stride_ms)
    return Response(orjson.dumps({"model": mv.name, "version": str(mv.version),
                                  "explanations": explanations}), media_type="application/json")


def _target_index(mv: ModelVersion, target: str | None) -> int | None:
    if target is None:
        return None
    try:
        return mv.model.labels.index(target)
    except ValueError:
        raise InvalidInput(f"query.target: {target!r} is not a label of model {mv.name!r}") from None


def _check_rows(request: Request, per_input: list[int]) -> None:
    limit = state_of(request).settings.max_explain_rows
    if sum(per_input) > limit:
        raise PayloadTooLarge(
            f"explaining these inputs takes {sum(per_input)} rows ({', '.join(map(str, per_input))} per "
            f"input); the limit is {limit}: send fewer inputs or occlude coarser (larger stride)")


async def _compute(request: Request, mv: ModelVersion, ctx: RequestContext,
                   rows: list[dict[str, np.ndarray]]) -> list[BatchResult]:
    """Each input's rows as one batcher request. One input after the other: each fills whole
    batches on its own, and side by side they could fill the model's queue with one request's rows
    (429) where one at a time fits."""
    until = deadline(request, state_of(request))
    batcher = mv.serving_batcher()
    results = []
    for feeds in rows:
        n = len(next(iter(feeds.values())))
        r = await batcher.submit_many(feeds, n, until, priority=priority_ceiling.get())
        ctx.timed(r.queue_s, r.compute_s, r.batch_rows)
        if mv.metrics is not None:
            mv.metrics.explanation_rows.observe(n)
        results.append(r)
    return results


def _summary(mv: ModelVersion, scores: np.ndarray, target: int | None, top_k: int,
             result: BatchResult) -> tuple[int, dict[str, Any]]:
    """The explained class and the explanation's common fields, from the rows' scores."""
    labels = mv.model.labels
    base = scores[0]
    chosen = int(np.argmax(base)) if target is None else target
    top = np.argsort(-base, kind="stable")[:top_k].tolist()
    return chosen, {
        "prediction": [{"label": labels[i], "probability": float(base[i])} for i in top],
        "target": {"label": labels[chosen], "probability": float(base[chosen])},
        "method": "occlusion", "rows": len(scores), "batches": result.calls,
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def _explain_images(request: Request, mv: ModelVersion, ctx: RequestContext, target: int | None,
                          top_k: int, patch: int | None, stride: int | None,
                          baseline: Literal["zero", "mean"]) -> list[dict[str, Any]]:
    spec = mv.config.image
    assert spec is not None
    height, width = spec.height, spec.width
    if patch is not None and patch > min(height, width):
        raise InvalidInput(f"query.patch: {patch} is larger than the model's {width}×{height} input")
    occlusion = ImageOcclusion.for_size(height, width, patch, stride, baseline)
    pixels = await image_inputs(request, mv)
    _check_rows(request, [occlusion.rows(height, width)] * len(pixels))
    name = mv.config.inputs[0].name
    results = await _compute(request, mv, ctx, [{name: occlusion.perturb(p)} for p in pixels])
    out = []
    for p, r in zip(pixels, results, strict=True):
        scores = r.outputs[mv.config.scores_output]
        chosen, doc = _summary(mv, scores, target, top_k, r)
        heat = occlusion.heatmap(scores[:, chosen], height, width)
        doc.update(heatmap=np.round(heat, 6).tolist(), heatmap_png=_b64(png.heatmap_overlay(heat)),
                   input_png=_b64(png.model_input(p)), patch=occlusion.patch, stride=occlusion.stride,
                   baseline=occlusion.baseline)
        out.append(doc)
    return out


async def _explain_texts(request: Request, mv: ModelVersion, ctx: RequestContext, target: int | None,
                         top_k: int) -> list[dict[str, Any]]:
    model = mv.model.text
    assert model is not None
    texts = await text_inputs(request)
    model.encode(texts)  # the task endpoint's checks: empty, too long
    encodings = [model.encoder.tokenizer.encode(t) for t in texts]
    spans = [text_explain.word_spans(t, e) for t, e in zip(texts, encodings, strict=True)]
    _check_rows(request, [1 + sum(1 for s in ss if s.tokens) for ss in spans])
    rows = []
    for encoding, ss in zip(encodings, spans, strict=True):
        ids, mask = text_explain.perturb(np.asarray(encoding.ids, dtype=np.int64), ss, model.pad_id)
        rows.append(model.feeds(list(zip(ids, mask, strict=True))))
    results = await _compute(request, mv, ctx, rows)
    out = []
    for t, ss, r in zip(texts, spans, results, strict=True):
        scores = r.outputs[mv.config.scores_output]
        chosen, doc = _summary(mv, scores, target, top_k, r)
        importance = text_explain.importances(scores[:, chosen], ss)
        doc.update(text=t, spans=[{"start": s.start, "end": s.end, "text": t[s.start:s.end],
                                   "importance": None if v is None else round(v, 6)}
                                  for s, v in zip(ss, importance, strict=True)])
        out.append(doc)
    return out


async def _explain_clips(request: Request, mv: ModelVersion, ctx: RequestContext, target: int | None,
                         top_k: int, window_ms: float | None,
                         stride_ms: float | None) -> list[dict[str, Any]]:
    spec = mv.config.audio
    assert spec is not None
    rate = spec.sample_rate
    samples = round(rate * spec.duration_s)
    occlusion = audio_explain.TimeOcclusion.for_rate(rate, window_ms, stride_ms)
    clips = await audio_inputs(request, mv)
    _check_rows(request, [occlusion.rows(samples)] * len(clips))
    name, dtype = mv.config.inputs[0].name, waveform_dtype(mv)
    results = await _compute(request, mv, ctx,
                             [{name: occlusion.perturb(c.pcm).astype(dtype, copy=False)} for c in clips])
    out = []
    for clip, r in zip(clips, results, strict=True):
        scores = r.outputs[mv.config.scores_output]
        chosen, doc = _summary(mv, scores, target, top_k, r)
        importance = occlusion.segments(scores[:, chosen], samples)
        spectrogram = audio_explain.spectrogram(clip.pcm, rate)
        doc.update(
            segments=[{"start_s": round(i * occlusion.stride / rate, 6),
                       "end_s": round(min(samples, (i + 1) * occlusion.stride) / rate, 6),
                       "importance": round(float(v), 6)} for i, v in enumerate(importance)],
            spectrogram_png=_b64(png.spectrogram_with_importance(spectrogram, importance)))
        out.append(doc)
    return out
