"""Whole documents on the text task endpoint: a text longer than the model's window is read as
overlapping windows, each a row through the batcher, and the answer says how many it read; a text
over the limits refuses the request (413, naming its index) unless the caller asks for partial
results. Driven over real HTTP against a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.codecs.text import TextEncoder, aggregate
from tests.service import models as m
from tests.service.conftest import Server, start_server

MODELS = Path(__file__).resolve().parents[2] / "models"
LONG = " ".join(m.TEXT_VOCAB[i % len(m.TEXT_VOCAB)] for i in range(3, 300))  # ~300 tokens; window 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("repo")
    m.text_model(repo)
    server = start_server(repo, repo / "server.log", "--max-text-tokens", "400", "--max-text-chars", "5000")
    yield server
    server.stop()


def window_answer(server: Server, ids: np.ndarray) -> np.ndarray:
    """One window's probabilities through V2, as a client computing windows itself would get them."""
    r = httpx.post(f"{server.url}/v2/models/tiny-text/infer", json={"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, len(ids)], "data": ids.tolist()},
        {"name": "attention_mask", "datatype": "INT64", "shape": [1, len(ids)], "data": [1] * len(ids)},
    ], "outputs": [{"name": "probabilities"}]})
    r.raise_for_status()
    return np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32)


def test_long_text_is_read_whole_as_windows_and_says_how_many(tiny):
    encoder = TextEncoder(_tokenizer(tiny), 32)
    tokens = np.asarray(encoder.whole.encode(LONG).ids)
    windows = encoder.windows(LONG, max_tokens=10**6)
    # A full window every 16 tokens (half a window), the last one ending with the text.
    count = -(-(len(tokens) - 32) // 16) + 1
    assert windows.shape == (count, 32) and count > 10
    assert (windows[0] == tokens[:32]).all() and (windows[1] == tokens[16:48]).all()
    assert (windows[-1] == tokens[-32:]).all()
    expected = aggregate(np.stack([window_answer(tiny, w) for w in windows]))

    r = httpx.post(f"{tiny.url}/v1/text/tiny-text?top_k=2", json={"texts": [LONG, "good"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["windows"] == [count, 1]
    got = {p["label"]: p["probability"] for p in body["predictions"][0]}
    assert got["negative"] == pytest.approx(float(expected[0]), abs=1e-6)
    assert got["positive"] == pytest.approx(float(expected[1]), abs=1e-6)


def _tokenizer(server: Server) -> Path:
    return Path(server.log).parent / "tiny-text" / "tokenizer.json"


def test_a_text_over_the_token_limit_refuses_the_request_naming_its_index(tiny):
    too_long = " ".join(["good"] * 401)
    r = httpx.post(f"{tiny.url}/v1/text/tiny-text", json={"texts": ["good", too_long, "bad"]})
    assert r.status_code == 413, r.text
    assert r.json()["code"] == "too_large"
    assert r.json()["error"].startswith("text 1: 401 tokens; the limit is 400")


def test_partial_results_answer_the_other_texts_and_list_the_refused_ones(tiny):
    too_long, too_many_chars = " ".join(["good"] * 401), "good " * 1001
    texts = ["good", too_long, "bad", "  ", too_many_chars]
    r = httpx.post(f"{tiny.url}/v1/text/tiny-text?partial=true&top_k=1", json={"texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p is None for p in body["predictions"]] == [False, True, False, True, True]
    assert body["windows"] == [1, 0, 1, 0, 0]
    assert [(e["index"], e["code"], e["status"]) for e in body["errors"]] == [
        (1, "too_large", 413), (3, "invalid_input", 400), (4, "too_large", 413)]
    assert "5,005 characters; the limit is 5,000" in body["errors"][2]["error"]
    whole = httpx.post(f"{tiny.url}/v1/text/tiny-text?top_k=1", json={"texts": ["good", "bad"]}).json()
    assert [body["predictions"][0], body["predictions"][2]] == whole["predictions"]
    assert httpx.post(f"{tiny.url}/v1/text/tiny-text?partial=maybe", json={"text": "good"}).status_code == 400


@pytest.mark.slow
def test_shipped_sentiment_answers_whole_reviews_as_its_card_measures_them(tmp_path):
    """The service's answers for whole Amazon reviews (more than the 64-token window) are the ones
    `training/quality.py` computes for the card's "Out of domain" table."""
    from training import evaluate, quality

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "sentiment").symlink_to(MODELS / "sentiment")
    reviews = quality.vader_documents("amazon")
    texts = list(reviews.inputs[:24])
    encoder = TextEncoder(MODELS / "sentiment" / "tokenizer.json", 64)
    sess = evaluate.session(evaluate.served_graph("sentiment", MODELS))
    offline = [aggregate(p) for p in quality.window_probabilities(sess, encoder, texts)]
    server = start_server(repo, tmp_path / "server.log", timeout=300)
    try:
        r = httpx.post(f"{server.url}/v1/text/sentiment?top_k=2", json={"texts": texts}, timeout=300)
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    body = r.json()
    assert max(body["windows"]) > 1
    for prediction, expected in zip(body["predictions"], offline, strict=True):
        got = {p["label"]: p["probability"] for p in prediction}
        assert got["positive"] == pytest.approx(float(expected[1]), abs=1e-4)


def test_the_models_window_stride_sets_how_windows_overlap(tmp_path: Path):
    from service.core.catalog import text_model
    from service.core.model_config import load_model_config

    directory = m.text_model(tmp_path)
    config = load_model_config(directory)
    assert config.text is not None
    counts = {}
    for stride in (0.25, 0.5, 1.0):
        strided = config.model_copy(update={"text": config.text.model_copy(update={"window_stride": stride})})
        model = text_model(strided, directory, 10_000)
        assert model is not None
        (windows,) = model.windows([LONG], max_tokens=10_000)
        counts[stride] = len(windows)
    # Content per window is fixed by max_tokens: a quarter stride needs about twice the windows of a
    # half, and a whole stride (no overlap) about half.
    assert counts[0.25] > counts[0.5] > counts[1.0] >= 2, counts
