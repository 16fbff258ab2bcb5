"""Task endpoints with real files: images, audio clips and sentences in, top-k labels out."""

from __future__ import annotations

import tomllib

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.codecs import audio as audio_codec
from service.codecs import image as image_codec
from service.core.model_config import ModelConfig
from tests.service import media
from tests.service.conftest import TOL, Server, TestModels


@pytest.fixture(scope="module")
def http(server: Server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _model(test_models: TestModels, name: str) -> tuple[ModelConfig, ort.InferenceSession, list[str]]:
    d = test_models.repository / name
    config = ModelConfig.model_validate(tomllib.loads((d / "config.toml").read_text()))
    version = max(int(p.name) for p in d.iterdir() if p.name.isdigit())
    sess = ort.InferenceSession(str(d / str(version) / "model.onnx"), providers=["CPUExecutionProvider"])
    return config, sess, config.label_list(d)


def _check_prediction(pred: list[dict], probs: np.ndarray, labels: list[str], top_k: int) -> None:
    assert len(pred) == top_k
    order = np.argsort(-probs, kind="stable")[:top_k]
    assert [p["label"] for p in pred] == [labels[i] for i in order]
    np.testing.assert_allclose([p["probability"] for p in pred], probs[order], **TOL)


@pytest.mark.parametrize(
    "fmt,mode",
    [
        ("PNG", "RGB"),
        ("PNG", "L"),
        ("PNG", "RGBA"),
        ("JPEG", "RGB"),
        ("BMP", "RGB"),
        ("WEBP", "RGB"),
        ("GIF", "RGB"),
    ],
)
def test_image_upload_any_format_and_mode_is_classified(
    http: httpx.Client, test_models: TestModels, fmt: str, mode: str
):
    config, sess, labels = _model(test_models, test_models.image)
    data = media.encoded(fmt, 57, 33, mode) if fmt != "PNG" else media.png(57, 33, mode)
    r = http.post(
        f"/v1/image/{test_models.image}?top_k=4",
        content=data,
        headers={"content-type": f"image/{fmt.lower()}"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == test_models.image and body["version"]
    pixels = image_codec.to_pixels(image_codec.decode(data, max_pixels=10**8), config.image)
    probs = sess.run(["probabilities"], {config.inputs[0].name: pixels[None]})[0][0]
    _check_prediction(body["predictions"][0], probs, labels, 4)


def test_image_multipart_with_several_files(http: httpx.Client, test_models: TestModels):
    files = [("file", (f"img{i}.png", media.png(30 + i, 20, seed=i), "image/png")) for i in range(3)]
    r = http.post(f"/v1/image/{test_models.image}", files=files)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3 and all(len(p) == 3 for p in preds)  # default top_k is 3
    for p in preds:
        probs = [x["probability"] for x in p]
        assert probs == sorted(probs, reverse=True) and probs[-1] >= 0 and sum(probs) <= 1 + 1e-5
    assert r.headers["server-timing"].startswith("queue;dur=")


@pytest.mark.parametrize(
    "fmt,rate,channels", [("WAV", 44100, 2), ("WAV", 8000, 1), ("FLAC", 22050, 1), ("OGG", 16000, 2)]
)
def test_audio_upload_any_rate_and_channels_is_classified(
    http: httpx.Client, test_models: TestModels, fmt: str, rate: int, channels: int
):
    config, sess, labels = _model(test_models, test_models.audio)
    data = media.wav(seconds=0.3, rate=rate, channels=channels, fmt=fmt)
    r = http.post(
        f"/v1/audio/{test_models.audio}?top_k=2",
        content=data,
        headers={"content-type": f"audio/{fmt.lower()}"},
    )
    assert r.status_code == 200, r.text
    pcm = audio_codec.decode(data, config.audio, max_duration_s=60)
    probs = sess.run(["probabilities"], {config.inputs[0].name: pcm[None]})[0][0]
    _check_prediction(r.json()["predictions"][0], probs, labels, 2)


def test_audio_multipart_upload(http: httpx.Client, test_models: TestModels):
    r = http.post(f"/v1/audio/{test_models.audio}", files={"file": ("clip.wav", media.wav(), "audio/wav")})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 1


def test_text_one_or_many_sentences(http: httpx.Client, test_models: TestModels):
    config, sess, labels = _model(test_models, test_models.text)
    from service.codecs.text import TextEncoder

    encoder = TextEncoder(
        test_models.repository / test_models.text / config.text.tokenizer, config.text.max_tokens
    )
    texts = [
        "I loved this film, the music was wonderful",
        "boring",
        "the plot was a terrible mess and not fun",
    ]
    r = http.post(f"/v1/text/{test_models.text}?top_k=2", json={"texts": texts})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3
    for text, pred in zip(texts, preds, strict=True):
        ((ids, mask),) = encoder.encode([text], max_chars=10_000)
        probs = sess.run(["probabilities"], {"input_ids": ids[None], "attention_mask": mask[None]})[0][0]
        _check_prediction(pred, probs, labels, 2)
    one = http.post(f"/v1/text/{test_models.text}?top_k=1", json={"text": texts[0]})
    plain = http.post(
        f"/v1/text/{test_models.text}?top_k=1",
        content=texts[0].encode(),
        headers={"content-type": "text/plain; charset=utf-8"},
    )
    assert one.status_code == plain.status_code == 200
    assert one.json()["predictions"] == plain.json()["predictions"]
    # Alone, the sentence is not padded to its neighbours' length: on CUDA other kernels run.
    ((alone,),) = one.json()["predictions"]
    assert alone["label"] == preds[0][0]["label"]
    np.testing.assert_allclose(alone["probability"], preds[0][0]["probability"], **TOL)


def test_wrong_task_endpoint_points_to_the_right_one(http: httpx.Client, test_models: TestModels):
    r = http.post(f"/v1/audio/{test_models.text}", content=media.wav())
    assert r.status_code == 400
    assert f"/v1/text/{test_models.text}" in r.json()["error"]


def test_openapi_documents_routes_examples_and_error_shape(http: httpx.Client):
    doc = http.get("/openapi.json").json()
    paths = doc["paths"]
    for path in [
        "/v2/models/{model}/infer",
        "/v1/image/{model}",
        "/v1/text/{model}",
        "/v1/audio/{model}",
        "/v2/repository/index",
        "/v2/models/{model}/config",
        "/v2/health/ready",
        "/metrics",
    ]:
        assert path in paths, path
    infer = paths["/v2/models/{model}/infer"]["post"]
    assert "examples" in infer["requestBody"]["content"]["application/json"]
    assert infer["responses"]["429"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorBody")
    assert "422" not in paths["/v1/text/{model}"]["post"]["responses"]
    schemas = doc["components"]["schemas"]
    assert {"ErrorBody", "V2InferRequest", "ClassifyResponse", "TextRequest"} <= set(schemas)
    refs = []

    def walk(x):
        if isinstance(x, dict):
            if "$ref" in x:
                refs.append(x["$ref"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    missing = {r for r in refs if r.split("/")[-1] not in schemas}
    assert not missing, missing
