"""What a client needs to present the repository's models: `GET /v1/models` (task, version,
labels, input format), each model's card rendered as HTML, and the figures the card shows."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from markdown_it import MarkdownIt
from markdown_it.token import Token
from pydantic import BaseModel, Field
from starlette.responses import FileResponse, HTMLResponse, Response

from service.core.catalog import Model, State
from service.errors import ModelNotFound
from service.server.rest.common import state_of
from service.server.rest.schemas import ErrorBody

router = APIRouter(prefix="/v1/models", tags=["models"])

CARD = "README.md"
# The files a card may show: figures, never the graph, tokenizer or configuration.
FIGURE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
                ".gif": "image/gif", ".webp": "image/webp"}


class ModelSummary(BaseModel):
    name: str
    task: str = Field(examples=["image"], description="image, text or speech")
    description: str
    state: str = Field(description="READY when a version serves; else LOADING, UNAVAILABLE, UNLOADED")
    version: str | None = Field(None, description="The version requests get by default")
    versions: list[str]
    labels: list[str]
    input: dict[str, Any] = Field(description="image: width, height, color, invert; speech: "
                                  "sample_rate, duration_s; text: max_tokens")
    max_batch_size: int
    card: bool = Field(description="Whether GET /v1/models/{model}/card has a model card")


def _summary(model: Model) -> dict[str, Any]:
    config = model.config
    ready = model.ready_versions()
    section = {"image": config.image, "text": config.text, "speech": config.audio}[config.task] \
        if config is not None else None
    if ready:
        state = State.READY
    elif model.unloaded:
        state = State.UNLOADED
    elif any(v.state is State.LOADING for v in model.versions.values()):
        state = State.LOADING
    else:
        state = State.UNAVAILABLE
    return {
        "name": model.name,
        "task": config.task if config else "",
        "description": config.description if config else model.error,
        "state": state.value,
        "version": str(ready[-1].version) if ready else None,
        "versions": [str(v) for v in sorted(model.versions)],
        "labels": model.labels,
        "input": section.model_dump(exclude={"tokenizer"}) if section is not None else {},
        "max_batch_size": (ready[-1].config if ready else config).batching.max_batch_size if config else 0,
        "card": (model.directory / CARD).is_file(),
    }


@router.get("", summary="Models and how to call them", response_model=list[ModelSummary])
async def list_models(request: Request) -> Response:
    repo = state_of(request).repository
    models = [_summary(m) for _, m in sorted(repo.models.items())]
    if repo.loading:  # models further down the first load's list are not registered yet
        models += [_not_yet_loaded(name) for name in repo.scan() if name not in repo.models]
        models.sort(key=lambda m: m["name"])
    return Response(orjson.dumps(models), media_type="application/json")


def _not_yet_loaded(name: str) -> dict[str, Any]:
    return {"name": name, "task": "", "description": "", "state": State.LOADING.value, "version": None,
            "versions": [], "labels": [], "input": {}, "max_batch_size": 0, "card": False}


@router.get("/{model}/card", summary="The model's card as HTML", response_class=HTMLResponse,
            responses={404: {"model": ErrorBody}})
async def model_card(request: Request, model: str) -> HTMLResponse:
    m = state_of(request).repository.model(model)
    path = m.directory / CARD
    if not path.is_file():
        raise ModelNotFound(f"model {model!r} has no card")
    root = request.scope.get("root_path", "")
    return HTMLResponse(render_card(path.read_text(encoding="utf-8"), f"{root}/v1/models/{model}/files/"))


@router.get("/{model}/files/{name}", summary="A figure of the model's card",
            responses={200: {"content": {t: {} for t in sorted(set(FIGURE_TYPES.values()))}},
                       404: {"model": ErrorBody}})
async def model_file(request: Request, model: str, name: str) -> FileResponse:
    m = state_of(request).repository.model(model)
    # Only figures lying directly in the model's directory, by exact name: no path can lead out.
    figures = {p.name: p for p in m.directory.iterdir() if p.is_file() and p.suffix.lower() in FIGURE_TYPES}
    path = figures.get(name)
    if path is None:
        raise ModelNotFound(f"model {model!r} has no figure {name!r}")
    return FileResponse(path, media_type=FIGURE_TYPES[path.suffix.lower()])


def render_card(markdown: str, files_url: str) -> str:
    """CommonMark with tables; raw HTML in the card is shown as text, and relative image paths
    point at the model's figures."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    for token in tokens:
        for child in token.children or ():
            _rebase_image(child, files_url)
    return md.renderer.render(tokens, md.options, {})


def _rebase_image(token: Token, files_url: str) -> None:
    if token.type != "image":
        return
    src = str(token.attrGet("src") or "")
    if src and "/" not in src and ":" not in src:
        token.attrSet("src", files_url + src)
