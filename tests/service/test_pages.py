"""What the page at `/` and the API docs are made of, over HTTP: every asset served by the service
itself, the model list the page is built from, and model cards rendered safely with their figures."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from tests.service import models as m
from tests.service.servers import Server, start_server

CARD = """# tiny-image

A card with a table, a figure and <script>alert("raw html")</script> in it.

| class | recall |
|---|---|
| Bag | 0.99 |

![confusion matrix](confusion_matrix.png)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("page-models")
    image = m.image_model(repo)
    (image / "README.md").write_text(CARD)
    Image.new("RGB", (8, 6), "red").save(image / "confusion_matrix.png")
    m.text_model(repo)
    m.audio_model(repo)
    srv = start_server(repo, tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _references(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]*)"', html) + re.findall(r"url: '([^']*)'", html)


def test_page_and_its_assets_come_from_the_service_with_no_outside_url(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = _references(page.text)
    assert "ui/demo.js" in refs and "ui/demo.css" in refs
    assert not [r for r in refs if re.match(r"(https?:)?//", r)]
    for asset, kind in (("/ui/demo.js", "javascript"), ("/ui/demo.css", "text/css")):
        r = client.get(asset)
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert not re.search(r"https?://", r.text), asset


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_load_their_assets_from_the_service(client, path):
    page = client.get(path)
    assert page.status_code == 200
    refs = [r for r in _references(page.text) if r]
    assert refs and all(r.startswith("/") for r in refs), refs
    for ref in refs:
        assert client.get(ref).status_code == 200, ref


def test_redoc_bundle_is_served_without_its_cdn_logo(client):
    bundle = client.get("/docs/assets/redoc.standalone.js")
    assert bundle.status_code == 200 and "javascript" in bundle.headers["content-type"]
    assert "cdn.redoc.ly" not in bundle.text and len(bundle.content) > 500_000


def test_models_list_says_how_to_call_each_model(client):
    models = {x["name"]: x for x in client.get("/v1/models").json()}
    assert set(models) == {"tiny-image", "tiny-text", "tiny-audio"}
    image = models["tiny-image"]
    assert (image["task"], image["state"], image["version"], image["card"]) == ("image", "READY", "1", True)
    assert image["input"] == {"width": 28, "height": 28, "color": "L", "invert": "never"}
    assert image["labels"][-1] == "Ankle boot" and image["max_batch_size"] == 8
    assert models["tiny-audio"]["input"] == {"sample_rate": 8000, "duration_s": 0.5}
    assert models["tiny-text"]["input"] == {"max_tokens": 32, "window_stride": 0.5}
    assert not models["tiny-text"]["card"]


def test_model_card_is_rendered_with_tables_figures_and_raw_html_as_text(client):
    card = client.get("/v1/models/tiny-image/card")
    assert card.status_code == 200 and card.headers["content-type"].startswith("text/html")
    html = card.text
    assert "<table>" in html and "<td>Bag</td>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    figure = re.search(r'<img src="([^"]+)"', html).group(1)
    assert figure == "/v1/models/tiny-image/files/confusion_matrix.png"
    r = client.get(figure)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


@pytest.mark.parametrize("path", [
    "/v1/models/tiny-image/files/config.toml",
    "/v1/models/tiny-image/files/..%2F..%2Fetc%2Fpasswd",
    "/v1/models/tiny-image/files/1",
    "/v1/models/tiny-text/card",
    "/v1/models/nope/card",
])
def test_only_a_models_figures_and_card_are_served(client, path):
    r = client.get(path)
    assert r.status_code == 404 and r.json()["code"] in ("model_not_found", "not_found")
