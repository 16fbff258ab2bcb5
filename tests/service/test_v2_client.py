"""A real `tritonclient.http.InferenceServerClient` against a real server process, unchanged."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.service.conftest import SERVED_PROVIDER, TOL, Server, TestModels


@pytest.fixture(scope="module")
def client(server: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.host_port)


def _reference(test_models: TestModels, name: str, version: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
    path = test_models.repository / name / str(version) / "model.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["probabilities"], feeds)[0]


def _latest(test_models: TestModels, name: str) -> int:
    return max(int(p.name) for p in (test_models.repository / name).iterdir() if p.name.isdigit())


def test_health_server_metadata_and_extensions(client: triton.InferenceServerClient):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "neuroserve"
    assert {"binary_tensor_data", "classification", "statistics", "model_repository"} <= set(
        meta["extensions"]
    )


def test_model_metadata_and_triton_config(client: triton.InferenceServerClient, test_models: TestModels):
    meta = client.get_model_metadata(test_models.image)
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"][0]["datatype"] == "UINT8" and meta["inputs"][0]["shape"][0] == -1
    assert meta["parameters"]["provider"] == SERVED_PROVIDER
    assert str(_latest(test_models, test_models.image)) in meta["versions"]
    config = client.get_model_config(test_models.image)
    assert config["max_batch_size"] >= 1
    assert config["input"][0]["data_type"] == "TYPE_UINT8"
    assert config["input"][0]["dims"] == meta["inputs"][0]["shape"][1:]
    assert config["output"][0]["data_type"] == "TYPE_FP32"
    assert "max_queue_delay_microseconds" in config["dynamic_batching"]
    kind = "KIND_GPU" if SERVED_PROVIDER == "CUDAExecutionProvider" else "KIND_CPU"
    assert config["instance_group"][0]["kind"] == kind
    text_config = client.get_model_config(test_models.text)
    assert text_config["input"][0]["dims"] == [-1]
    assert client.is_model_ready(test_models.image)
    assert not client.is_model_ready("no-such-model")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_image_json_and_binary_match_onnxruntime(
    client: triton.InferenceServerClient, test_models: TestModels, binary: bool
):
    x = np.random.default_rng(4).integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    inp = triton.InferInput("pixels", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [
        triton.InferRequestedOutput("probabilities", binary_data=binary),
        triton.InferRequestedOutput("logits", binary_data=binary),
    ]
    result = client.infer(test_models.image, [inp], outputs=outputs, request_id="my-id-7")
    assert result.get_response()["id"] == "my-id-7"
    want = _reference(test_models, test_models.image, _latest(test_models, test_models.image), {"pixels": x})
    np.testing.assert_allclose(result.as_numpy("probabilities"), want, **TOL)
    assert result.as_numpy("logits").shape == (3, 10)


def test_infer_explicit_version(client: triton.InferenceServerClient, test_models: TestModels):
    name = test_models.image
    versions = sorted(int(p.name) for p in (test_models.repository / name).iterdir() if p.name.isdigit())
    x = np.full((1, 1, 28, 28), 128, dtype=np.uint8)
    for v in versions[-2:]:
        inp = triton.InferInput("pixels", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x, binary_data=True)
        result = client.infer(name, [inp], model_version=str(v))
        assert result.get_response()["model_version"] == str(v)
        np.testing.assert_allclose(
            result.as_numpy("probabilities"),
            _reference(test_models, name, v, {"pixels": x}),
            **TOL,
        )


def test_classification_extension_returns_score_index_label(
    client: triton.InferenceServerClient, test_models: TestModels
):
    x = np.random.default_rng(5).integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)
    want = _reference(test_models, test_models.image, _latest(test_models, test_models.image), {"pixels": x})
    for binary in (False, True):
        inp = triton.InferInput("pixels", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
        result = client.infer(test_models.image, [inp], outputs=[out]).as_numpy("probabilities")
        assert result.shape == (2, 3)
        for row in range(2):
            entries = [(s.decode() if isinstance(s, bytes) else s).split(":", 2) for s in result[row]]
            indices = [int(e[1]) for e in entries]
            assert indices == list(np.argsort(-want[row], kind="stable")[:3])
            # the score is printed with 6 decimals
            score = pytest.approx(want[row].max(), rel=TOL["rtol"], abs=max(1e-5, TOL["atol"]))
            assert float(entries[0][0]) == score
            assert all(e[2] for e in entries)  # labels present


def test_text_model_with_token_ids_and_with_bytes(
    client: triton.InferenceServerClient, test_models: TestModels
):
    ids = np.array([[2, 4, 6, 8]], dtype=np.int64)
    a = triton.InferInput("input_ids", list(ids.shape), "INT64")
    a.set_data_from_numpy(ids, binary_data=True)
    b = triton.InferInput("attention_mask", list(ids.shape), "INT64")
    b.set_data_from_numpy(np.ones_like(ids), binary_data=False)
    probs = client.infer(test_models.text, [a, b]).as_numpy("probabilities")
    assert probs.shape[0] == 1 and np.isclose(probs.sum(), 1, atol=1e-5)
    for binary in (False, True):
        s = triton.InferInput("text", [2], "BYTES")
        s.set_data_from_numpy(
            np.array([b"what a great film", b"boring and dull"], dtype=object), binary_data=binary
        )
        probs = client.infer(test_models.text, [s]).as_numpy("probabilities")
        assert probs.shape == (2, 2) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_errors_surface_as_exceptions_with_the_message(
    client: triton.InferenceServerClient, test_models: TestModels
):
    x = np.zeros((1, 1, 28, 28), dtype=np.float32)
    inp = triton.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="datatype"):
        client.infer(test_models.image, [inp])
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("no-such-model")


def test_statistics_count_inferences(client: triton.InferenceServerClient, test_models: TestModels):
    before = client.get_inference_statistics(test_models.audio)["model_stats"][0]
    x = np.zeros((2, client.get_model_metadata(test_models.audio)["inputs"][0]["shape"][1]), dtype=np.float32)
    for _ in range(3):
        inp = triton.InferInput("waveform", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        client.infer(test_models.audio, [inp])
    after = client.get_inference_statistics(test_models.audio)["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 6
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 3
    assert after["inference_stats"]["compute_infer"]["ns"] > before["inference_stats"]["compute_infer"]["ns"]
    assert any(b["batch_size"] == 2 for b in after["batch_stats"])
    everything = client.get_inference_statistics()
    assert {s["name"] for s in everything["model_stats"]} >= {test_models.image, test_models.audio}


def test_repository_index_unload_and_load(client: triton.InferenceServerClient, test_models: TestModels):
    index = client.get_model_repository_index()
    names = {e["name"] for e in index}
    assert {test_models.image, test_models.text, test_models.audio} <= names
    assert all(e["state"] == "READY" for e in index)
    name = test_models.audio
    x = np.zeros((1, client.get_model_config(name)["input"][0]["dims"][0]), dtype=np.float32)
    inp = triton.InferInput("waveform", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    client.unload_model(name)
    assert not client.is_model_ready(name)
    assert client.is_server_ready()  # a model unloaded on purpose does not make the server unready
    assert {e["state"] for e in client.get_model_repository_index() if e["name"] == name} == {"UNLOADED"}
    with pytest.raises(InferenceServerException, match="not ready"):
        client.infer(name, [inp])
    client.load_model(name)
    assert client.is_model_ready(name)
    assert client.is_server_ready()
    with pytest.raises(InferenceServerException):
        client.load_model("no-such-model")
