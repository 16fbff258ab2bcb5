"""`?min_probability=P` on the task endpoints: an input whose top label's probability is below P is
labelled `_uncertain_`, its top-k list unchanged. A real server on the shipped models (mnist,
sentiment, spoken-digits, linked from `models/`) with real ONNX Runtime sessions, over HTTP."""

from __future__ import annotations

import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pydantic
import pytest

from service.codecs import image as image_codec
from service.core.model_config import ModelConfig, load_model_config
from tests.service import media
from tests.service.conftest import TOL, Server, start_server

MODELS = Path(__file__).resolve().parents[2] / "models"
UNCERTAIN = "_uncertain_"
# A configured default, far above what a doubtful drawing gets from mnist.
CAUTIOUS_DEFAULT = 0.999


def _cautious_mnist(repo: Path) -> None:
    """mnist's graph under the name `cautious-mnist`, with a default threshold in its config.toml."""
    d = repo / "cautious-mnist"
    shutil.copytree(MODELS / "mnist", d)
    config = (d / "config.toml").read_text(encoding="utf-8")
    config = config.replace('name = "mnist"', 'name = "cautious-mnist"', 1)
    config = config.replace('scores_output = "probabilities"',
                            f'scores_output = "probabilities"\nmin_probability = {CAUTIOUS_DEFAULT}', 1)
    (d / "config.toml").write_text(config, encoding="utf-8")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("repo")
    for name in ("mnist", "sentiment", "spoken-digits"):
        (repo / name).symlink_to(MODELS / name, target_is_directory=True)
    _cautious_mnist(repo)
    s = start_server(repo, repo / "server.log", "--max-text-chars", "5000", timeout=300)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def a_one() -> bytes:
    """A clear "1": a white vertical stroke on black, where MNIST keeps its digits."""
    img = np.zeros((28, 28), dtype=np.uint8)
    img[4:24, 13:16] = 255
    return media.png_of(img)


def mnist_probabilities(data: bytes) -> np.ndarray:
    """What the shipped mnist graph answers for `data`, computed here, outside the server."""
    config = load_model_config(MODELS / "mnist")
    graph = MODELS / "mnist" / "1" / "model.onnx"
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    pixels = image_codec.to_pixels(image_codec.decode(data, max_pixels=10**8), config.image)
    return sess.run(["probabilities"], {"pixels": pixels[None]})[0][0]


def post_image(http: httpx.Client, data: bytes, query: str = "", model: str = "mnist") -> httpx.Response:
    return http.post(f"/v1/image/{model}{query}", content=data, headers={"content-type": "image/png"})


def doubtful_drawing() -> tuple[bytes, np.ndarray]:
    """A picture mnist is not sure about (a plus sign, a blob, a dash, two strokes: the first whose top
    probability is well below 1), and its probabilities as the graph gives them here."""
    shapes = [((slice(4, 24), slice(13, 16)), (slice(13, 16), slice(6, 22))),
              ((slice(10, 18), slice(10, 18)),),
              ((slice(13, 15), slice(4, 24)),),
              ((slice(4, 24), slice(8, 11)), (slice(4, 24), slice(17, 20)))]
    for strokes in shapes:
        img = np.zeros((28, 28), dtype=np.uint8)
        for rows, cols in strokes:
            img[rows, cols] = 255
        data = media.png_of(img)
        probs = mnist_probabilities(data)
        if 0.2 < probs.max() < 0.9:
            return data, probs
    raise AssertionError("mnist is sure of every drawing")


def test_image_below_the_threshold_is_uncertain_above_it_is_labelled(http: httpx.Client):
    data, probs = doubtful_drawing()
    top = float(probs.max())
    plain = post_image(http, data, "?top_k=3")
    assert plain.status_code == 200, plain.text
    assert "labels" not in plain.json() and "min_probability" not in plain.json()
    predictions = plain.json()["predictions"]
    np.testing.assert_allclose(predictions[0][0]["probability"], top, **TOL)
    assert predictions[0][0]["label"] == str(int(probs.argmax()))

    above = round(min(top + 0.05, 1.0), 3)
    r = post_image(http, data, f"?top_k=3&min_probability={above}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["labels"] == [UNCERTAIN] and body["min_probability"] == above
    assert body["predictions"] == predictions  # the candidates stay, unchanged

    below = round(top - 0.05, 3)
    r = post_image(http, data, f"?top_k=3&min_probability={below}")
    assert r.status_code == 200, r.text
    assert r.json()["labels"] == [str(int(probs.argmax()))] and r.json()["min_probability"] == below


def test_each_uploaded_image_is_judged_on_its_own(http: httpx.Client):
    doubtful, probs = doubtful_drawing()
    assert mnist_probabilities(a_one()).argmax() == 1 and mnist_probabilities(a_one()).max() > 0.95
    threshold = round((float(probs.max()) + 0.95) / 2, 3)
    files = [("file", ("one.png", a_one(), "image/png")), ("file", ("noise.png", doubtful, "image/png"))]
    r = http.post(f"/v1/image/mnist?min_probability={threshold}&top_k=2", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["labels"] == ["1", UNCERTAIN]
    assert [len(p) for p in body["predictions"]] == [2, 2]


def test_texts_are_judged_one_by_one_and_a_long_text_on_all_its_windows(http: httpx.Client):
    texts = ["An absolute delight from start to finish, I loved every minute of it.",
             "It was a film.",
             " ".join(["The first hour is a tedious, overlong mess with dull acting."] * 8
                      + ["Then the ending is wonderful, moving and beautifully made."] * 8)]
    plain = http.post("/v1/text/sentiment?top_k=2", json={"texts": texts})
    assert plain.status_code == 200, plain.text
    windows = plain.json()["windows"]
    assert windows[0] == windows[1] == 1 and windows[2] > 1  # the long text is read in windows
    tops = [p[0]["probability"] for p in plain.json()["predictions"]]
    # A threshold between the least and the most confident answers: some of each side.
    threshold = round((min(tops) + max(tops)) / 2, 4)
    assert min(tops) < threshold - 0.01 and max(tops) > threshold + 0.01, tops

    r = http.post(f"/v1/text/sentiment?top_k=2&min_probability={threshold}", json={"texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["min_probability"] == threshold and body["windows"] == windows
    expected = [p[0]["label"] if p[0]["probability"] >= threshold else UNCERTAIN for p in body["predictions"]]
    assert body["labels"] == expected
    assert UNCERTAIN in expected and set(expected) - {UNCERTAIN}
    for got, before in zip(body["predictions"], plain.json()["predictions"], strict=True):
        assert [p["label"] for p in got] == [p["label"] for p in before]
        np.testing.assert_allclose([p["probability"] for p in got], [p["probability"] for p in before],
                                   rtol=1e-5, atol=1e-6)


def test_a_text_refused_under_partial_has_no_label(http: httpx.Client):
    texts = ["Loved it.", "x" * 6000]
    r = http.post("/v1/text/sentiment?partial=true&min_probability=0.5", json={"texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["predictions"][1] is None and body["errors"][0]["index"] == 1
    top = body["predictions"][0][0]
    assert body["labels"] == [top["label"] if top["probability"] >= 0.5 else UNCERTAIN, None]


def test_audio_threshold(http: httpx.Client):
    clip = media.wav(seconds=0.5)
    plain = http.post("/v1/audio/spoken-digits", content=clip, headers={"content-type": "audio/wav"})
    assert plain.status_code == 200, plain.text
    top = plain.json()["predictions"][0][0]
    r = http.post("/v1/audio/spoken-digits?min_probability=1", content=clip,
                  headers={"content-type": "audio/wav"})
    assert r.status_code == 200, r.text
    assert r.json()["labels"] == [top["label"] if top["probability"] >= 1 else UNCERTAIN]
    r = http.post("/v1/audio/spoken-digits?min_probability=1e-9", content=clip,
                  headers={"content-type": "audio/wav"})
    assert r.json()["labels"] == [top["label"]] and r.json()["predictions"] == plain.json()["predictions"]


@pytest.mark.parametrize("value", ["0", "-0.2", "1.0001", "2", "abc", "", "nan", "inf", "-inf", "0x1"])
@pytest.mark.parametrize("route", ["image", "text", "audio"])
def test_invalid_thresholds_get_the_json_400(http: httpx.Client, route: str, value: str):
    model, body, media_type = {"image": ("mnist", a_one(), "image/png"),
                               "text": ("sentiment", b"Loved it.", "text/plain"),
                               "audio": ("spoken-digits", media.wav(), "audio/wav")}[route]
    r = http.post(f"/v1/{route}/{model}", params={"min_probability": value}, content=body,
                  headers={"content-type": media_type})
    assert r.status_code == 400, r.text
    error = r.json()
    assert error["code"] == "invalid_input" and "min_probability" in error["error"]


def test_a_models_configured_default_applies_and_the_request_overrides_it(http: httpx.Client):
    data, probs = doubtful_drawing()
    r = post_image(http, data, model="cautious-mnist")
    assert r.status_code == 200, r.text
    assert r.json()["labels"] == [UNCERTAIN] and r.json()["min_probability"] == CAUTIOUS_DEFAULT
    low = round(float(probs.max()) / 2, 3)
    r = post_image(http, data, f"?min_probability={low}", model="cautious-mnist")
    assert r.json()["labels"] == [str(int(probs.argmax()))] and r.json()["min_probability"] == low
    # A model without the setting adds nothing unless asked.
    assert "labels" not in post_image(http, data).json()


def test_config_threshold_is_optional_and_checked():
    base = tomllib.loads((MODELS / "mnist" / "config.toml").read_text(encoding="utf-8"))
    assert ModelConfig.model_validate(base).min_probability is None  # older configs stay valid
    assert ModelConfig.model_validate({**base, "min_probability": 1}).min_probability == 1
    for bad in (0, -0.5, 1.5):
        with pytest.raises(pydantic.ValidationError, match="min_probability"):
            ModelConfig.model_validate({**base, "min_probability": bad})


def test_openapi_documents_the_threshold(http: httpx.Client):
    doc = http.get("/openapi.json").json()
    for route in ("image", "text", "audio"):
        op = doc["paths"][f"/v1/{route}/{{model}}"]["post"]
        (param,) = [p for p in op["parameters"] if p["name"] == "min_probability"]
        assert param["in"] == "query" and not param.get("required", False)
        schema = param["schema"]["anyOf"][0]
        assert schema["type"] == "number" and schema["exclusiveMinimum"] == 0 and schema["maximum"] == 1
        assert UNCERTAIN in param["description"]
        assert "400" in op["responses"] and "422" not in op["responses"]
    props = doc["components"]["schemas"]["ClassifyResponse"]["properties"]
    assert {"labels", "min_probability"} <= set(props)
