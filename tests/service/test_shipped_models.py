"""The service answers for the shipped models what their model cards report.

A real server on the real `models/` repository is driven the ways users drive it — `tritonclient`
over V2 binary and JSON (with the classification extension), and the task endpoints with PNG, text
and WAV uploads — over each model's whole held-out test set, and the accuracy it yields must be
the card's figure on whatever CPU runs the tests:

- exactly, for the int8 image graphs, which compute bit for bit the same on AVX2, AVX-512 and VNNI
  kernels (tests/training/test_cpu_portability.py);
- within 0.1 point for the float graphs (sentiment, spoken-digits): the order of float additions
  differs between the AVX2 and AVX-512 kernels, which moves logits by about 1e-6, enough to flip a
  test row whose two best classes lie closer than that — one sentence of 1,057, two clips of 2,400.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image

from service.core.model_config import load_model_config
from tests.service.conftest import Server, start_server
from training import evaluate, images, speech_corpus, text_data
from training.speech import wav_bytes

MODELS = Path(__file__).resolve().parents[2] / "models"


FLOAT_TOLERANCE = 0.001  # 0.1 point: see the module's docstring


def card_accuracy(name: str) -> float:
    return evaluate.card_accuracy(MODELS / name)


def assert_card_figure_exactly(name: str, accuracy: float) -> None:
    """The accuracy as the card prints it (two decimals of a percentage) is the card's."""
    assert f"{accuracy:.2%}" == f"{card_accuracy(name):.2%}", accuracy


def batch_size(name: str) -> int:
    return load_model_config(MODELS / name).batching.max_batch_size


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(MODELS, tmp_path_factory.mktemp("shipped") / "server.log", timeout=300)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fashion() -> images.ImageData:
    return images.load_fashion()


def v2_predict(server: Server, model: str, pixels: np.ndarray, *, binary: bool) -> np.ndarray:
    client = triton.InferenceServerClient(server.host_port)
    step, predicted = batch_size(model), []
    for i in range(0, len(pixels), step):
        chunk = np.ascontiguousarray(pixels[i:i + step, None])
        inp = triton.InferInput("pixels", list(chunk.shape), "UINT8")
        inp.set_data_from_numpy(chunk, binary_data=binary)
        if binary:
            out = triton.InferRequestedOutput("probabilities", binary_data=True)
            result = client.infer(model, [inp], outputs=[out]).as_numpy("probabilities")
            predicted.extend(result.argmax(1).tolist())
        else:  # the classification extension: "score:index:label" strings, best first
            out = triton.InferRequestedOutput("probabilities", binary_data=False, class_count=1)
            result = client.infer(model, [inp], outputs=[out]).as_numpy("probabilities")
            entries = (e.decode() if isinstance(e, bytes) else e for e in result.reshape(-1))
            predicted.extend(int(entry.split(":")[1]) for entry in entries)
    client.close()
    return np.asarray(predicted)


def test_fashion_mnist_over_v2_binary_scores_its_card_accuracy(shipped, fashion):
    predicted = v2_predict(shipped, "fashion-mnist", fashion.x_test, binary=True)
    assert_card_figure_exactly("fashion-mnist", float((predicted == fashion.y_test).mean()))


def test_mnist_over_v2_json_classification_scores_its_card_accuracy(shipped):
    digits = images.load_digits()
    predicted = v2_predict(shipped, "mnist", digits.x_test, binary=False)
    assert_card_figure_exactly("mnist", float((predicted == digits.y_test).mean()))


def test_image_uploads_get_the_same_answers_as_v2_tensors(shipped, fashion):
    pixels, n = fashion.x_test, 300
    tensor_answers = v2_predict(shipped, "fashion-mnist", pixels[:n], binary=True)
    labels = fashion.labels

    def upload(img: np.ndarray) -> str:
        png = io.BytesIO()
        Image.fromarray(img).save(png, format="PNG")
        r = httpx.post(f"{shipped.url}/v1/image/fashion-mnist?top_k=1", content=png.getvalue(),
                       headers={"content-type": "image/png"}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0][0]["label"]

    with ThreadPoolExecutor(8) as pool:
        upload_answers = list(pool.map(upload, pixels[:n]))
    assert upload_answers == [labels[i] for i in tensor_answers]


def test_sentiment_text_endpoint_scores_its_card_accuracy(shipped):
    data = text_data.load_sentences()
    index = text_data.split(data["label"])["test"]
    sentences, truth = [str(s) for s in data["text"][index]], data["label"][index]
    labels = load_model_config(MODELS / "sentiment").label_list(MODELS / "sentiment")

    def classify(chunk: list[str]) -> list[int]:
        r = httpx.post(f"{shipped.url}/v1/text/sentiment?top_k=1", json={"texts": chunk}, timeout=120)
        assert r.status_code == 200, r.text
        return [labels.index(p[0]["label"]) for p in r.json()["predictions"]]

    chunks = [sentences[i:i + 32] for i in range(0, len(sentences), 32)]
    with ThreadPoolExecutor(4) as pool:
        predicted = np.concatenate(list(pool.map(classify, chunks)))
    accuracy = float((predicted == truth).mean())
    assert abs(accuracy - card_accuracy("sentiment")) <= FLOAT_TOLERANCE + 1e-9, accuracy


def test_spoken_digits_audio_endpoint_scores_its_card_accuracy(shipped):
    speech_corpus.require_synthesizers("test")
    split = speech_corpus.load("test")
    labels = load_model_config(MODELS / "spoken-digits").label_list(MODELS / "spoken-digits")

    def classify(clip: np.ndarray) -> int:
        r = httpx.post(f"{shipped.url}/v1/audio/spoken-digits?top_k=1", content=wav_bytes(clip),
                       headers={"content-type": "audio/wav"}, timeout=30)
        assert r.status_code == 200, r.text
        return labels.index(r.json()["predictions"][0][0]["label"])

    with ThreadPoolExecutor(8) as pool:
        predicted = np.asarray(list(pool.map(classify, split["audio"])))
    accuracy = float((predicted == split["labels"]).mean())
    assert abs(accuracy - card_accuracy("spoken-digits")) <= FLOAT_TOLERANCE + 1e-9, accuracy
