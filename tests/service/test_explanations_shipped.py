"""The explanations of the shipped models point at what the models really use.

On 100 held-out Fashion-MNIST test images, hiding the 10 % of pixels that the heatmap of
`POST /v1/explain/fashion-mnist` ranks highest must lower the predicted class's probability more
than hiding a random 10 % (scattered pixels, or a square block) on at least 80 of them. Occluded
images are scored by the same server over V2. For spoken digits, silencing the most important
fifth of a clip must cost more than silencing a random fifth.
"""

from __future__ import annotations

import io
import math
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import tritonclient.http as triton
from PIL import Image

from service.codecs.audio import decode
from service.core.model_config import load_model_config
from tests.service.servers import Server, start_server
from training import images

MODELS = Path(__file__).resolve().parents[2] / "models"
IMAGES = 100
SHARE = 0.10


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(MODELS, tmp_path_factory.mktemp("explain-shipped") / "server.log", timeout=300)
    yield server
    server.stop()


def v2_probabilities(server: Server, model: str, pixels: np.ndarray) -> np.ndarray:
    step = load_model_config(MODELS / model).batching.max_batch_size
    client = triton.InferenceServerClient(server.host_port)
    out = []
    for i in range(0, len(pixels), step):
        chunk = np.ascontiguousarray(pixels[i:i + step, None])
        inp = triton.InferInput("pixels", list(chunk.shape), "UINT8")
        inp.set_data_from_numpy(chunk, binary_data=True)
        result = client.infer(model, [inp], outputs=[triton.InferRequestedOutput("probabilities")])
        out.append(result.as_numpy("probabilities"))
    client.close()
    return np.concatenate(out)


def test_fashion_heatmaps_top_region_costs_more_than_a_random_one(shipped):
    fashion = images.load_fashion()
    labels = load_model_config(MODELS / "fashion-mnist").label_list(MODELS / "fashion-mnist")
    rng = np.random.default_rng(0)
    picked = rng.choice(len(fashion.x_test), IMAGES, replace=False)
    k = round(SHARE * 28 * 28)
    side = round(math.sqrt(k))
    occluded, targets = [], []
    with httpx.Client(base_url=shipped.url, timeout=60) as client:
        before = client.get("/v2/models/fashion-mnist/stats").json()["model_stats"][0]
        for i in picked:
            pixels = fashion.x_test[i]
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            r = client.post("/v1/explain/fashion-mnist", content=buf.getvalue(),
                            headers={"Content-Type": "image/png"})
            assert r.status_code == 200, r.text
            e = r.json()["explanations"][0]
            heat = np.asarray(e["heatmap"])
            assert heat.shape == (28, 28)
            targets.append(labels.index(e["target"]["label"]))
            top = np.argsort(-heat.ravel(), kind="stable")[:k]
            scattered = rng.choice(heat.size, k, replace=False)
            y, x = rng.integers(0, 28 - side + 1, 2)
            block = np.zeros((28, 28), bool)
            block[y:y + side, x:x + side] = True
            for hidden in (top, scattered, np.flatnonzero(block)):
                copy = pixels.copy().ravel()
                copy[hidden] = 0
                occluded.append(copy.reshape(28, 28))
        after = client.get("/v2/models/fashion-mnist/stats").json()["model_stats"][0]
    # Each explanation was one request to the batcher: 145 rows in ⌈145 / 16⌉ = 10 calls.
    requests = after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    assert requests == IMAGES
    assert after["execution_count"] - before["execution_count"] == IMAGES * 10
    p = v2_probabilities(shipped, "fashion-mnist", np.stack(occluded)).reshape(IMAGES, 3, -1)
    p = p[np.arange(IMAGES), :, targets]  # [images, (top, scattered, block)]
    assert (p[:, 0] < p[:, 1]).sum() >= 0.8 * IMAGES, (p[:, 0] < p[:, 1]).sum()
    assert (p[:, 0] < p[:, 2]).sum() >= 0.8 * IMAGES, (p[:, 0] < p[:, 2]).sum()


def test_spoken_digit_segments_ranked_first_cost_more_than_random_ones(shipped, tmp_path):
    spec = load_model_config(MODELS / "spoken-digits").audio
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    rng = np.random.default_rng(1)
    wins = 0
    with httpx.Client(base_url=shipped.url, timeout=60) as client:
        for word in words:
            path = tmp_path / f"{word}.wav"
            subprocess.run(["espeak-ng", "-w", str(path), word], check=True)
            e = client.post("/v1/explain/spoken-digits", content=path.read_bytes(),
                            headers={"Content-Type": "audio/wav"}).json()["explanations"][0]
            importance = np.array([s["importance"] for s in e["segments"]])
            fifth = len(importance) // 5
            pcm = decode(path.read_bytes(), spec, max_duration_s=30)  # what the model hears
            segment = len(pcm) // len(importance)
            answers = []
            ranked, drawn = np.argsort(-importance)[:fifth], rng.choice(len(importance), fifth, replace=False)
            for hidden in (ranked, drawn):
                copy = pcm.copy()
                for s in hidden:
                    copy[s * segment:(s + 1) * segment] = 0
                buf = io.BytesIO()
                sf.write(buf, copy, spec.sample_rate, format="WAV", subtype="FLOAT")
                r = client.post("/v1/audio/spoken-digits", params={"top_k": 12}, content=buf.getvalue(),
                                headers={"Content-Type": "audio/wav"}).json()["predictions"][0]
                answers.append(next(x["probability"] for x in r if x["label"] == e["target"]["label"]))
            wins += answers[0] < answers[1]
    assert wins >= 8, wins
