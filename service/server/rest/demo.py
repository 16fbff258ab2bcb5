"""The page at `/` where a person tries every model of the repository in a browser: draw or upload
a picture, type a review, record or upload a clip; see the answer, its timing and why. Plain HTML,
CSS and JavaScript in `service/web/`, served as they are (no build step, nothing from a CDN)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
ASSETS_URL = "/ui"

router = APIRouter(include_in_schema=False)


def assets() -> StaticFiles:
    return StaticFiles(directory=WEB_DIR)


@router.get("/")
async def page() -> FileResponse:
    # Revalidated on every visit, so a new release's page never runs against stale scripts.
    return FileResponse(WEB_DIR / "index.html", media_type="text/html",
                        headers={"Cache-Control": "no-cache"})
