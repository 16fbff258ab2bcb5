"""On a machine with a GPU and onnxruntime-gpu: every shipped model is served on the CUDA provider
and answers what the CPU provider answers.

Skipped where this onnxruntime has no CUDA provider (the CPU wheel, and so CI).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from bench import raw_ort
from bench.workloads import find_models, load_workload, model_file, v2_json
from service.core.runtime import cuda_available
from tests.service.conftest import Server, start_server

MODELS = Path(__file__).resolve().parents[2] / "models"
NAMES = [d.name for d in find_models(MODELS)]

pytestmark = pytest.mark.skipif(not cuda_available(), reason="this onnxruntime has no CUDA provider")


@pytest.fixture(scope="module")
def cuda_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(MODELS, tmp_path_factory.mktemp("cuda") / "server.log", "--providers", "cuda",
                          timeout=300)
    yield server
    server.stop()


def test_every_shipped_model_is_bound_to_the_cuda_provider(cuda_server: Server):
    text = httpx.get(f"{cuda_server.url}/metrics").text
    for name in NAMES:
        line = next(li for li in text.splitlines()
                    if li.startswith("neuroserve_model_info{") and f'model="{name}"' in li)
        assert 'provider="CUDAExecutionProvider"' in line and line.endswith(" 1.0"), line


@pytest.mark.parametrize("name", NAMES)
def test_cuda_answers_match_the_cpu_provider(cuda_server: Server, name: str):
    w = load_workload(MODELS / name)
    sample = w.batch(8)
    path = model_file(MODELS / name)
    quantized = any(n.op_type == "QuantizeLinear" for n in onnx.load(path).graph.node)
    cpu = raw_ort.session(path, 1, "cpu")
    expected = dict(zip([o.name for o in cpu.get_outputs()], cpu.run(None, sample), strict=True))
    req = v2_json(w, sample)
    r = httpx.post(cuda_server.url + req.path, content=req.body, headers=req.headers, timeout=60)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
    assert set(outputs) == set(expected)
    for output, want in expected.items():
        got = outputs[output]
        # TF32 matrix units and the CUDA kernels' own accumulation order move the last digits. The
        # int8 image graphs' quantize/dequantize pairs run in float on CUDA and round differently
        # from the CPU's integer kernels: logits landed up to 3 output quantization steps (0.03 each)
        # away from the CPU's on an NVIDIA H100.
        np.testing.assert_allclose(got, want, atol=0.1 if quantized else 2e-2, rtol=2e-2)
        if want.ndim == 2 and want.shape[1] > 1:
            assert (got.argmax(1) == want.argmax(1)).all()
