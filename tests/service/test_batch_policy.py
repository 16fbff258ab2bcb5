"""When a batch closes and which requests it takes, seen through the real service."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import orjson

from tests.service import models as m
from tests.service.conftest import TOL, with_app


def _timing(header: str) -> dict[str, str]:
    out = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";")
        out[name] = rest.split("=", 1)[1].strip('"')
    return out


def test_a_lone_request_does_not_wait_for_max_queue_delay(tmp_path: Path):
    m.image_model(tmp_path, max_batch=32, delay_ms=300)
    body = orjson.dumps(
        {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [3] * 784}]}
    )

    async def scenario(c):
        timings = []
        for _ in range(5):  # one client, one request at a time
            r = await c.post("/v2/models/tiny-image/infer", content=body)
            assert r.status_code == 200
            timings.append(_timing(r.headers["server-timing"]))
        return timings

    for t in with_app(tmp_path, scenario):
        assert float(t["queue"]) < 100, t  # milliseconds; the delay allowed is 300
        assert t["batch"] == "1"


def test_concurrent_requests_wait_for_each_other_up_to_the_delay(tmp_path: Path):
    m.image_model(tmp_path, max_batch=8, delay_ms=50)
    body = orjson.dumps(
        {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [3] * 784}]}
    )

    async def scenario(c):
        # Establish a recent concurrency of 8, then send 8 at once: they should share few batches.
        for _ in range(2):
            await asyncio.gather(*(c.post("/v2/models/tiny-image/infer", content=body) for _ in range(8)))
        rs = await asyncio.gather(*(c.post("/v2/models/tiny-image/infer", content=body) for _ in range(8)))
        return [int(_timing(r.headers["server-timing"])["batch"]) for r in rs]

    sizes = with_app(tmp_path, scenario)
    assert max(sizes) >= 4, sizes


def test_similar_lengths_are_batched_together_to_limit_padding(tmp_path: Path):
    m.text_model(tmp_path, max_batch=8, delay_ms=20)
    rng = np.random.default_rng(2)

    def body(length: int) -> bytes:
        ids = rng.integers(2, 20, (1, length)).tolist()
        return orjson.dumps(
            {
                "inputs": [
                    {"name": "input_ids", "datatype": "INT64", "shape": [1, length], "data": ids},
                    {
                        "name": "attention_mask",
                        "datatype": "INT64",
                        "shape": [1, length],
                        "data": [[1] * length],
                    },
                ]
            }
        )

    lengths = [2, 30, 3, 29, 2, 31, 3, 30] * 3

    async def scenario(c):
        before = (await c.get("/metrics")).text
        rs = await asyncio.gather(*(c.post("/v2/models/tiny-text/infer", content=body(n)) for n in lengths))
        assert all(r.status_code == 200 for r in rs)
        return before, (await c.get("/metrics")).text

    def padding(metrics: str, series: str) -> float:
        # The registry is this process's: earlier in-process tests may have served a tiny-text too.
        return sum(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith(f"neuroserve_padding_ratio_{series}{{") and 'model="tiny-text"' in line)

    before, after = with_app(tmp_path, scenario)
    total = padding(after, "sum") - padding(before, "sum")
    count = padding(after, "count") - padding(before, "count")
    assert count > 0
    # Mixing 2-token and 30-token rows would pad ~45% of every batch; grouping keeps it far lower.
    assert total / count < 0.25, (total, count)


def test_a_model_with_two_instances_answers_every_request_correctly(tmp_path: Path):
    import onnxruntime as ort

    m.image_model(tmp_path, max_batch=4, delay_ms=1, instances=2)
    sess = ort.InferenceSession(
        str(tmp_path / "tiny-image" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(9)
    xs = [rng.integers(0, 256, (1, 1, 28, 28), dtype=np.uint8) for _ in range(40)]

    async def scenario(c):
        bodies = [
            orjson.dumps(
                {
                    "inputs": [
                        {
                            "name": "pixels",
                            "datatype": "UINT8",
                            "shape": [1, 1, 28, 28],
                            "data": x.reshape(-1).tolist(),
                        }
                    ]
                }
            )
            for x in xs
        ]
        rs = await asyncio.gather(*(c.post("/v2/models/tiny-image/infer", content=b) for b in bodies))
        config = (await c.get("/v2/models/tiny-image/config")).json()
        return rs, config

    rs, config = with_app(tmp_path, scenario)
    assert config["instance_group"][0]["count"] == 2
    for x, r in zip(xs, rs, strict=True):
        out = {o["name"]: o for o in r.json()["outputs"]}["probabilities"]
        want = sess.run(["probabilities"], {"pixels": x})[0]
        np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), want, **TOL)
