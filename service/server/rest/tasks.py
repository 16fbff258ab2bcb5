"""Task endpoints for people who are not writing tensors: an image, an audio clip or text in,
the top-k `{label, probability}` per input out.

    POST /v1/image/{model}   image file: raw body (image/*) or multipart (one or more files)
    POST /v1/text/{model}    JSON {"text": "..."} or {"texts": [...]}, or a text/plain body
    POST /v1/audio/{model}   WAV/FLAC/OGG: raw body (audio/*) or multipart (one or more files)

`?min_probability=P` (or the model's `min_probability` in config.toml) adds each input's decided
label: the top label, or `_uncertain_` when its probability is below P; the top-k lists are unchanged.

Each input is queued as its own row, so the batcher merges them with other requests' rows (and,
for text, with rows of similar length).
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Callable
from time import perf_counter
from typing import Annotated, Any, TypeVar

import numpy as np
import orjson
from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.responses import Response

from service.auth.gate import priority_ceiling
from service.codecs import audio, image
from service.codecs import text as text_codec
from service.core.catalog import ModelVersion
from service.errors import InvalidInput, PayloadTooLarge, ServiceError, UnsupportedMedia
from service.observability import metrics
from service.server.rest.common import admit, deadline, refuse_early, state_of
from service.server.rest.middleware import RequestContext
from service.server.rest.routing import direct
from service.server.rest.schemas import ClassifyResponse, ErrorBody, TextRequest

router = APIRouter(prefix="/v1", tags=["tasks"])

T = TypeVar("T")
# Decoding a large upload takes milliseconds; do it off the event loop so other requests flow.
_DECODE_IN_THREAD_BYTES = 256 * 1024

TOP_K_DEFAULT, TOP_K_MAX = 3, 1000
TopK = Annotated[int, Query(ge=1, le=TOP_K_MAX, description="How many labels to return per input")]
Version = Annotated[str | None, Query(description="Model version (default: the newest ready one)")]
Partial = Annotated[bool, Query(description="Answer the texts that can be read and name the refused ones "
                                "in `errors` (their prediction is null) instead of refusing the request")]
UNCERTAIN = "_uncertain_"
MinProbability = Annotated[float | None, Query(
    gt=0, le=1, description="Per input, `labels` in the answer names the top label, or "
    f"`{UNCERTAIN}` when the top label's probability is below this (the top-k lists are unchanged; "
    "the threshold used is echoed as `min_probability`). Default: the model's own `min_probability` "
    "from its config.toml, if it sets one; otherwise no `labels`")]

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ClassifyResponse},
    **{s: {"model": ErrorBody} for s in (400, 404, 413, 415, 429, 503, 504)},
}


def _upload_doc(kind: str, media: list[str]) -> dict[str, Any]:
    raw = {m: {"schema": {"type": "string", "format": "binary"}} for m in media}
    return {"requestBody": {"required": True, "content": {
        **raw,
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                     "description": f"One or more {kind} files"}}}},
    }}}


async def task_request(request: Request, task: str, model: str) -> Response:
    """A task route without FastAPI's parameter solving (see `service.server.rest.routing`): the query
    parameters are read and checked here, as the route signatures below declare them."""
    query = request.query_params
    raw_top_k = query.get("top_k")
    top_k = TOP_K_DEFAULT
    if raw_top_k is not None:
        try:
            top_k = int(raw_top_k)
        except ValueError:
            top_k = 0
        if not 1 <= top_k <= TOP_K_MAX:
            raise InvalidInput(f"query.top_k: must be an integer from 1 to {TOP_K_MAX}, not {raw_top_k!r}")
    min_probability = parse_min_probability(query.get("min_probability"))
    if task == "text":
        raw_partial = query.get("partial", "false").lower()
        if raw_partial not in ("true", "false", "1", "0"):
            raise InvalidInput(f"query.partial: must be true or false, not {raw_partial!r}")
        return await classify_text(request, model, top_k, query.get("version"), raw_partial in ("true", "1"),
                                   min_probability)
    return await _HANDLERS[task](request, model, top_k, query.get("version"), min_probability)


def parse_min_probability(raw: str | None) -> float | None:
    """`?min_probability=`: a number above 0 and at most 1 (None when the query does not give it)."""
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:  # NaN fails too
        raise InvalidInput(f"query.min_probability: must be a number above 0 and at most 1, not {raw!r}")
    return value


def decided_labels(predictions: list[list[dict[str, Any]] | None], threshold: float) -> list[str | None]:
    """Per input, its top label, or `UNCERTAIN` when the top label's probability is below `threshold`
    (None for a text refused under `?partial=true`)."""
    return [None if p is None else p[0]["label"] if p[0]["probability"] >= threshold else UNCERTAIN
            for p in predictions]


def _with_decisions(body: dict[str, Any], mv: ModelVersion, min_probability: float | None) -> dict[str, Any]:
    threshold = min_probability if min_probability is not None else mv.config.min_probability
    if threshold is not None:
        body["labels"] = decided_labels(body["predictions"], threshold)
        body["min_probability"] = threshold
    return body


@router.post("/image/{model}", summary="Classify an image", responses=_RESPONSES, response_class=Response,
             openapi_extra=_upload_doc("image", ["image/png", "image/jpeg", "image/bmp", "image/webp",
                                                 "image/gif", "application/octet-stream"]))
@direct(functools.partial(task_request, task="image"))
async def classify_image(request: Request, model: str, top_k: TopK = TOP_K_DEFAULT,
                         version: Version = None, min_probability: MinProbability = None) -> Response:
    """PNG, JPEG, BMP, WebP or GIF of any size and colour mode; resized to the model's input."""
    mv, ctx = admit(request, "image", model, version)
    check_task(mv, "image")
    await refuse_early(request, mv)
    pixels = await image_inputs(request, mv)
    name = mv.config.inputs[0].name
    return await _classify(request, mv, ctx, [{name: p[None]} for p in pixels], top_k, min_probability)


async def image_inputs(request: Request, mv: ModelVersion) -> list[np.ndarray]:
    """The uploaded pictures as the model's uint8 [C, H, W] pixels."""
    settings = state_of(request).settings
    spec = mv.config.image
    assert spec is not None

    def prepare(data: bytes) -> np.ndarray:
        return image.to_pixels(image.decode(data, max_pixels=settings.max_image_pixels), spec)

    uploads = await read_uploads(request, ("image/",))
    return [await _off_loop_if_large(prepare, data) for data in uploads]


@router.post("/audio/{model}", summary="Classify an audio clip", responses=_RESPONSES,
             response_class=Response,
             openapi_extra=_upload_doc("audio", ["audio/wav", "audio/flac", "audio/ogg",
                                                 "application/octet-stream"]))
@direct(functools.partial(task_request, task="audio"))
async def classify_audio(request: Request, model: str, top_k: TopK = TOP_K_DEFAULT,
                         version: Version = None, min_probability: MinProbability = None) -> Response:
    """WAV, FLAC or OGG at any sample rate and channel count; downmixed, resampled, fitted in length."""
    mv, ctx = admit(request, "audio", model, version)
    check_task(mv, "speech")
    await refuse_early(request, mv)
    clips = await audio_inputs(request, mv)
    if mv.metrics is not None:
        for clip in clips:
            mv.metrics.audio_duration.observe(clip.duration_s)
    name = mv.config.inputs[0].name
    dtype = waveform_dtype(mv)
    rows = [{name: clip.pcm[None].astype(dtype, copy=False)} for clip in clips]
    return await _classify(request, mv, ctx, rows, top_k, min_probability)


async def audio_inputs(request: Request, mv: ModelVersion) -> list[audio.Decoded]:
    """The uploaded clips, decoded, at the model's rate and fitted to its duration."""
    settings = state_of(request).settings
    spec = mv.config.audio
    assert spec is not None

    def prepare(data: bytes) -> audio.Decoded:
        return audio.decode_clip(data, spec, max_duration_s=settings.max_audio_duration_s)

    uploads = await read_uploads(request, ("audio/",))
    return [await _off_loop_if_large(prepare, data) for data in uploads]


def waveform_dtype(mv: ModelVersion) -> type[np.floating]:
    return np.float16 if mv.config.inputs[0].datatype == "FP16" else np.float32


@router.post(
    "/text/{model}", summary="Classify text", responses=_RESPONSES, response_class=Response,
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/TextRequest"}, "examples": {
            "one": {"value": {"text": "An absolute delight from start to finish."}},
            "many": {"value": {"texts": ["Loved it.", "A tedious, overlong mess."]}}}},
        "text/plain": {"schema": {"type": "string"}, "example": "Loved it."},
    }}},
)
@direct(functools.partial(task_request, task="text"))
async def classify_text(request: Request, model: str, top_k: TopK = TOP_K_DEFAULT,
                        version: Version = None, partial: Partial = False,
                        min_probability: MinProbability = None) -> Response:
    """One text or a list of texts, tokenized with the model's own tokenizer and read whole: a text
    longer than the model's window is read as overlapping windows (`windows` in the answer says how
    many per text). A text over the limits (`--max-text-chars`, `--max-text-tokens`) refuses the
    request with 413 naming its index, or with `?partial=true` gets a null prediction and an entry
    in `errors` while the others are answered. With `?min_probability`, each text is judged on its
    own, on the probabilities of its whole (all its windows combined)."""
    mv, ctx = admit(request, "text", model, version)
    check_task(mv, "text")
    await refuse_early(request, mv)
    text = mv.model.text
    assert text is not None
    settings = state_of(request).settings
    encoded = text.windows(await text_inputs(request), max_tokens=settings.max_text_tokens)
    received = perf_counter()  # a slow upload is the client's time, not the queue's to make up
    refused = [e for e in encoded if isinstance(e, ServiceError)]
    if refused and not partial:
        raise refused[0]
    until = deadline(request, state_of(request))
    batcher = mv.serving_batcher()
    max_rows = mv.config.batching.max_batch_size
    priority = priority_ceiling.get()  # a task request has no parameters: its key's class

    async def compute(windows: np.ndarray) -> Any:
        feeds = text.window_feeds(windows)
        if len(windows) <= max_rows:  # batches with other requests' rows
            return await batcher.submit(feeds, len(windows), until, priority=priority, arrived=received)
        return await batcher.submit_many(feeds, len(windows), until, priority=priority)

    readable = [e for e in encoded if not isinstance(e, ServiceError)]
    ctx.rows = sum(len(w) for w in readable)
    results = await asyncio.gather(*(compute(w) for w in readable), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    labels = mv.model.labels
    answers = iter(results)
    predictions: list[list[dict[str, Any]] | None] = []
    windows: list[int] = []
    errors = []
    for i, item in enumerate(encoded):
        if isinstance(item, ServiceError):
            predictions.append(None)
            windows.append(0)
            errors.append({"index": i, "error": item.message, "code": item.code, "status": item.status})
            continue
        r = next(answers)
        ctx.timed(r.queue_s, r.compute_s, r.batch_rows)
        scores = text_codec.aggregate(r.outputs[mv.config.scores_output])
        top = np.argsort(-scores, kind="stable")[:top_k].tolist()
        predictions.append([{"label": labels[k], "probability": float(scores[k])} for k in top])
        windows.append(len(item))
    body: dict[str, Any] = {"model": mv.name, "version": str(mv.version), "predictions": predictions,
                            "windows": windows}
    if partial:
        body["errors"] = errors
    return Response(orjson.dumps(_with_decisions(body, mv, min_probability)), media_type="application/json")


async def text_inputs(request: Request) -> list[str]:
    """The texts of a JSON `{"text": ...}` / `{"texts": [...]}` or a text/plain body."""
    body = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "text/plain":
        try:
            texts = [body.decode("utf-8")]
        except UnicodeDecodeError:
            raise InvalidInput("text/plain body is not UTF-8") from None
    elif content_type.startswith(("multipart/", "image/", "audio/", "application/octet-stream")):
        raise UnsupportedMedia(f"send application/json ({{\"text\": ...}}) or text/plain, not {content_type}")
    else:
        # JSON, whatever the label says: `curl -d '{"text": ...}'` sends it as form-urlencoded.
        try:
            texts = TextRequest.model_validate_json(body).items()
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}"
                                 for err in e.errors())
            raise InvalidInput(problems) from None
    check_items(len(texts), state_of(request).settings.max_items)
    return texts


_HANDLERS = {"image": classify_image, "audio": classify_audio, "text": classify_text}


def check_task(mv: ModelVersion, task: str) -> None:
    if mv.config.task != task:
        raise InvalidInput(f"model {mv.name!r} is a {mv.config.task} model; "
                           f"use /v1/{metrics.TASK_ENDPOINTS[mv.config.task]}/{mv.name}")


def check_items(n: int, limit: int) -> None:
    if n > limit:
        raise PayloadTooLarge(f"{n} inputs in one request; the limit is {limit}")


async def read_uploads(request: Request, media_prefixes: tuple[str, ...]) -> list[bytes]:
    """The uploaded files: multipart parts, or the raw body when it is itself the file."""
    settings = state_of(request).settings
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=settings.max_items, max_fields=settings.max_items)
        try:
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if not files:
                raise InvalidInput("the multipart body has no file part")
            check_items(len(files), settings.max_items)
            return [await f.read() for f in files]
        finally:
            await form.close()
    if content_type in ("", "application/octet-stream") or content_type.startswith(media_prefixes):
        return [await request.body()]
    raise UnsupportedMedia(
        f"unsupported Content-Type {content_type!r}: send the file as the body "
        f"({media_prefixes[0]}*) or as multipart/form-data")


async def _off_loop_if_large(fn: Callable[[bytes], T], data: bytes) -> T:
    if len(data) > _DECODE_IN_THREAD_BYTES:
        return await asyncio.to_thread(fn, data)
    return fn(data)


async def _classify(request: Request, mv: ModelVersion, ctx: RequestContext,
                    rows: list[dict[str, np.ndarray]], top_k: int, min_probability: float | None) -> Response:
    received = perf_counter()  # its uploads read and decoded
    state = state_of(request)
    until = deadline(request, state)
    batcher = mv.serving_batcher()
    ctx.rows = len(rows)
    priority = priority_ceiling.get()  # a task request has no parameters: its key's class
    results = await asyncio.gather(*(batcher.submit(feeds, 1, until, priority=priority, arrived=received)
                                     for feeds in rows), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    labels = mv.model.labels
    predictions = []
    for r in results:
        ctx.timed(r.queue_s, r.compute_s, r.batch_rows)
        scores = r.outputs[mv.config.scores_output][0]
        top = np.argsort(-scores, kind="stable")[:top_k].tolist()
        predictions.append([{"label": labels[i], "probability": float(scores[i])} for i in top])
    body = {"model": mv.name, "version": str(mv.version), "predictions": predictions}
    return Response(orjson.dumps(_with_decisions(body, mv, min_probability)), media_type="application/json")
