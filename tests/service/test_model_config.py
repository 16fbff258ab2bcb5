"""`[batching.cuda]`: knobs that replace `[batching]`'s only where a version runs on CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from service.core.model_config import load_model_config
from service.core.runtime import CUDA, Runtime, cuda_available
from tests.service import models as m
from tests.service.conftest import with_app

CUDA_KNOBS = {"max_batch_size": 2, "max_queue_size": 3, "max_padding_ratio": 0.25}


def _repo(tmp_path: Path) -> Path:
    m.image_model(tmp_path, max_batch=4, queue=64, cuda=CUDA_KNOBS)
    return tmp_path


def _rows(n: int) -> bytes:
    pixels = np.zeros((n, 1, 28, 28), dtype=np.uint8)
    return orjson.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                                     "data": pixels.reshape(-1).tolist()}]})


def test_the_cuda_table_replaces_only_the_knobs_it_names_and_only_on_cuda(tmp_path: Path):
    config = load_model_config(_repo(tmp_path) / "tiny-image")
    assert config.on_provider(False) is config
    on_cuda = config.on_provider(True).batching
    assert (on_cuda.max_batch_size, on_cuda.max_queue_size, on_cuda.max_padding_ratio) == (2, 3, 0.25)
    assert (on_cuda.max_queue_delay_ms, on_cuda.instances) == (config.batching.max_queue_delay_ms, 1)
    assert config.batching.max_batch_size == 4  # the model's own config is left as it was


def test_instances_cannot_depend_on_the_provider(tmp_path: Path):
    m.image_model(tmp_path, cuda={"instances": 2})
    with pytest.raises(ValueError, match="instances"):
        load_model_config(tmp_path / "tiny-image")


def _serve(repo: Path, providers: str) -> tuple[dict, list[int]]:
    async def scenario(c):
        config = (await c.get("/v2/models/tiny-image/config")).json()
        codes = [(await c.post("/v2/models/tiny-image/infer", content=_rows(n))).status_code for n in (2, 3)]
        return config, codes

    return with_app(repo, scenario, providers=providers)


def test_on_the_cpu_the_cpu_knobs_are_in_force(tmp_path: Path):
    config, codes = _serve(_repo(tmp_path), "cpu")
    assert config["max_batch_size"] == 4
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 64
    assert codes == [200, 200]  # 3 rows fit the CPU's batch of 4


def test_a_version_on_cuda_serves_with_the_cuda_knobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # CI has no GPU: CPU sessions that report the CUDA provider stand in for one here, to check that
    # the knobs reach the batcher, the codecs and the Triton config. The real run is the next test.
    build = Runtime.__init__

    def on_cuda(self: Runtime, *args, **kwargs) -> None:
        build(self, *args, **kwargs)
        self.provider = CUDA

    monkeypatch.setattr(Runtime, "__init__", on_cuda)
    config, codes = _serve(_repo(tmp_path), "cpu")
    assert config["max_batch_size"] == 2 and config["instance_group"][0]["kind"] == "KIND_GPU"
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 3
    assert codes == [200, 400]


@pytest.mark.skipif(not cuda_available(), reason="this onnxruntime has no CUDA provider")
def test_on_cuda_the_cuda_knobs_are_in_force(tmp_path: Path):
    config, codes = _serve(_repo(tmp_path), "cuda")
    assert config["max_batch_size"] == 2
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 3
    assert codes == [200, 400]  # 3 rows exceed the GPU's batch of 2
