"""`POST /v1/explain/{model}` on a real server with small graphs whose answers can be worked out by
hand: what an occlusion attribution must satisfy (parts of the input that occlusion does not change
get no importance; a word's importance is what deleting it costs), how one explanation goes
through the batcher (one request, full batches, counted in the statistics and its own metric,
kept out of the monitoring histograms), and the 4xx answers to what it cannot do."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.service import models as m
from tests.service.media import png_of
from tests.service.servers import Server, start_server

MAX_BATCH = 8
QUEUE = 256


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("explain-models")
    m.image_model(repo, max_batch=MAX_BATCH, queue=QUEUE)
    m.text_model(repo, max_batch=MAX_BATCH)
    m.audio_model(repo, max_batch=MAX_BATCH)
    srv = start_server(repo, tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def corner_square() -> np.ndarray:
    """28×28 black with a bright 8×8 square in the top-left corner."""
    pixels = np.zeros((28, 28), np.uint8)
    pixels[2:10, 2:10] = 230
    return pixels


def explain_image(client: httpx.Client, pixels: np.ndarray, **params) -> dict:
    r = client.post("/v1/explain/tiny-image", params=params, content=png_of(pixels),
                    headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()["explanations"][0]


def stats(client: httpx.Client, model: str) -> dict:
    return client.get(f"/v2/models/{model}/stats").json()["model_stats"][0]


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_image_heatmap_is_zero_where_occlusion_changes_nothing_and_positive_on_the_object(client):
    e = explain_image(client, corner_square())
    heat = np.array(e["heatmap"])
    assert heat.shape == (28, 28)
    # A 6-px patch whose every position covering these pixels lies on black changes no input: its
    # drop is exactly zero. Patches start at most 9 px before a pixel; the square ends at 10.
    assert np.all(heat[20:, :] == 0) and np.all(heat[:, 20:] == 0)
    assert np.abs(heat[2:10, 2:10]).max() > 0
    assert e["target"] == e["prediction"][0]
    assert e["patch"] == 6 and e["stride"] == 2 and e["baseline"] == "zero"


def test_image_heatmap_png_and_input_png_are_the_models_size(client):
    e = explain_image(client, corner_square())
    overlay = Image.open(io.BytesIO(base64.b64decode(e["heatmap_png"])))
    seen = Image.open(io.BytesIO(base64.b64decode(e["input_png"])))
    assert overlay.size == seen.size == (28, 28) and overlay.mode == "RGBA"
    assert np.array_equal(np.asarray(seen), corner_square())
    # Transparent where the heat is zero, coloured where it is not.
    alpha = np.asarray(overlay)[..., 3]
    assert alpha[20:, 20:].max() == 0 and alpha[2:10, 2:10].max() > 0


def test_accept_image_png_answers_the_heatmap_itself(client):
    r = client.post("/v1/explain/tiny-image", content=png_of(corner_square()),
                    headers={"Content-Type": "image/png", "Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (28, 28)


def test_one_explanation_is_one_batcher_request_of_all_its_rows_in_full_batches(client):
    before = stats(client, "tiny-image")
    rows_before = metric(client, "neuroserve_explanation_rows_sum", model="tiny-image")
    r = client.post("/v1/explain/tiny-image", content=png_of(corner_square()),
                    headers={"Content-Type": "image/png"})
    e = r.json()["explanations"][0]
    after = stats(client, "tiny-image")
    # The picture and one copy per position of the 6-px patch every 2 px: 12 × 12 positions.
    assert e["rows"] == 1 + 12 * 12
    assert e["batches"] == math.ceil(e["rows"] / MAX_BATCH)
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 1
    assert after["inference_count"] - before["inference_count"] == e["rows"]
    assert after["execution_count"] - before["execution_count"] == e["batches"]
    full = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    full_before = {b["batch_size"]: b["compute_infer"]["count"] for b in before["batch_stats"]}
    assert full[MAX_BATCH] - full_before.get(MAX_BATCH, 0) == e["rows"] // MAX_BATCH
    assert metric(client, "neuroserve_explanation_rows_sum", model="tiny-image") - rows_before == e["rows"]
    assert 'batch;desc="8"' in r.headers["server-timing"]


def test_explanation_rows_stay_out_of_the_prediction_and_input_monitoring(client):
    predictions = metric(client, "neuroserve_predictions_total", model="tiny-image")
    intensity = metric(client, "neuroserve_input_image_mean_intensity_count", model="tiny-image")
    explain_image(client, corner_square())
    assert metric(client, "neuroserve_predictions_total", model="tiny-image") == predictions
    assert metric(client, "neuroserve_input_image_mean_intensity_count", model="tiny-image") == intensity
    client.post("/v1/image/tiny-image", content=png_of(corner_square()),
                headers={"Content-Type": "image/png"})
    assert metric(client, "neuroserve_predictions_total", model="tiny-image") == predictions + 1


def test_target_label_chooses_the_class_explained(client):
    e = explain_image(client, corner_square(), target="Bag")
    assert e["target"]["label"] == "Bag"
    other = explain_image(client, corner_square(), target="Sandal")
    assert other["heatmap"] != e["heatmap"]


def test_word_importance_is_what_deleting_the_word_costs_the_predicted_class(client):
    # tiny-text averages the embeddings of the tokens it attends to: masking a word's tokens is
    # the same as deleting the word, which the text endpoint can score on its own.
    text = "the film was not good but the music was brilliant"
    r = client.post("/v1/explain/tiny-text", json={"text": text})
    assert r.status_code == 200, r.text
    e = r.json()["explanations"][0]
    words = text.split()
    assert [s["text"] for s in e["spans"]] == words
    assert all(text[s["start"]:s["end"]] == s["text"] for s in e["spans"])
    label = e["target"]["label"]
    without = [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
    scored = client.post("/v1/text/tiny-text", params={"top_k": 2}, json={"texts": without}).json()
    for span, prediction in zip(e["spans"], scored["predictions"], strict=True):
        p = next(x["probability"] for x in prediction if x["label"] == label)
        assert span["importance"] == pytest.approx(e["target"]["probability"] - p, abs=1e-5)
    assert e["rows"] == 1 + len(words)


def test_words_past_the_token_limit_have_no_importance(client):
    text = " ".join(["good"] * 40)  # tiny-text reads 32 tokens
    e = client.post("/v1/explain/tiny-text", content=text, headers={"Content-Type": "text/plain"}).json()
    importance = [s["importance"] for s in e["explanations"][0]["spans"]]
    assert all(v is not None for v in importance[:32]) and importance[32:] == [None] * 8


def _wav(pcm: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_audio_segments_that_are_silent_under_every_window_have_zero_importance(client):
    rate = 8000  # tiny-audio hears 0.5 s at 8 kHz
    t = np.arange(rate // 2) / rate
    pcm = np.where(t < 0.2, 0.5 * np.sin(2 * np.pi * 440 * t), 0.0).astype(np.float32)
    r = client.post("/v1/explain/tiny-audio", content=_wav(pcm, rate), headers={"Content-Type": "audio/wav"})
    assert r.status_code == 200, r.text
    e = r.json()["explanations"][0]
    segments = e["segments"]
    assert [s["start_s"] for s in segments] == pytest.approx([i * 0.05 for i in range(10)])
    assert segments[-1]["end_s"] == pytest.approx(0.5)
    # 150 ms windows: a segment from 0.35 s on is only ever silenced inside silence.
    assert all(s["importance"] == 0 for s in segments if s["start_s"] >= 0.35)
    assert any(s["importance"] != 0 for s in segments if s["end_s"] <= 0.2)
    spectrogram = Image.open(io.BytesIO(base64.b64decode(e["spectrogram_png"])))
    assert spectrogram.size == (48, 64)  # 25 ms frames every 10 ms over 0.5 s; 64 mel bands


def test_several_inputs_are_explained_in_order(client):
    square, blank = corner_square(), np.zeros((28, 28), np.uint8)
    files = [("file", ("a.png", png_of(square), "image/png")),
             ("file", ("b.png", png_of(blank), "image/png"))]
    e = client.post("/v1/explain/tiny-image", files=files).json()["explanations"]
    assert len(e) == 2
    assert np.abs(np.array(e[0]["heatmap"])).max() > 0
    assert np.all(np.array(e[1]["heatmap"]) == 0)  # black occluded by black: nothing changes


@pytest.mark.parametrize(("path", "kwargs", "status", "code"), [
    ("/v1/explain/tiny-image?target=Spaceship", {"content": b"", "headers": {}}, 400, "invalid_input"),
    ("/v1/explain/tiny-image?patch=40", {}, 400, "invalid_input"),
    ("/v1/explain/tiny-image?patch=0", {}, 400, "invalid_request"),
    ("/v1/explain/tiny-image?baseline=noise", {}, 400, "invalid_request"),
    # Every position of a 1-px patch: 785 rows, more than the model's queue of 256 rows holds.
    ("/v1/explain/tiny-image?patch=1&stride=1", {}, 413, "too_large"),
    ("/v1/explain/nope", {}, 404, "model_not_found"),
    ("/v1/explain/tiny-text", {}, 415, "unsupported_media"),
    ("/v1/explain/tiny-image", {"content": b"not a picture"}, 415, "unsupported_media"),
    ("/v1/explain/tiny-text", {"json": {"text": " "}, "headers": {}}, 400, "invalid_input"),
])
def test_what_cannot_be_explained_is_a_4xx_json_error(client, path, kwargs, status, code):
    request = {"content": png_of(corner_square()), "headers": {"Content-Type": "image/png"}, **kwargs}
    if "json" in request:
        request.pop("content")
    r = client.post(path, **request)
    assert r.status_code == status, r.text
    assert r.json()["code"] == code and r.json()["error"]


def test_rows_past_max_explain_rows_are_refused_before_any_compute(tmp_path):
    repo = tmp_path / "models"
    m.image_model(repo, max_batch=MAX_BATCH)
    srv = start_server(repo, tmp_path / "server.log", "--max-explain-rows", "100")
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.post("/v1/explain/tiny-image", content=png_of(corner_square()),
                       headers={"Content-Type": "image/png"})
            assert r.status_code == 413 and "145 rows" in r.json()["error"] and "100" in r.json()["error"]
            assert stats(c, "tiny-image")["inference_count"] == 0
            coarse = c.post("/v1/explain/tiny-image", params={"stride": 6}, content=png_of(corner_square()),
                            headers={"Content-Type": "image/png"})
            assert coarse.status_code == 200 and coarse.json()["explanations"][0]["rows"] == 1 + 5 * 5
    finally:
        srv.stop()
