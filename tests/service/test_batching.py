"""Dynamic batching: merged answers equal unbatched ones, overload is refused cleanly, one bad
request or batch fails alone, deadlines shed work before compute."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import tritonclient.http as triton

from tests.service import models as m
from tests.service.conftest import TOL, Server, TestModels, with_app


def _session(repo: Path, name: str) -> ort.InferenceSession:
    versions = sorted(int(p.name) for p in (repo / name).iterdir() if p.name.isdigit())
    return ort.InferenceSession(
        str(repo / name / str(versions[-1]) / "model.onnx"), providers=["CPUExecutionProvider"]
    )


def _config(repo: Path, name: str) -> dict:
    return tomllib.loads((repo / name / "config.toml").read_text())


def _v2(inputs: dict[str, np.ndarray]) -> bytes:
    names = {np.dtype(np.uint8): "UINT8", np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}
    return orjson.dumps(
        {
            "inputs": [
                {"name": k, "datatype": names[v.dtype], "shape": list(v.shape), "data": v.reshape(-1)}
                for k, v in inputs.items()
            ]
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def _mixed_requests(
    test_models: TestModels, n: int, seed: int = 0
) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Image requests of 1-4 rows, text of 1-3 rows and 1-30 tokens, audio of 1-2 rows."""
    rng = np.random.default_rng(seed)
    repo = test_models.repository
    text_cfg = _config(repo, test_models.text)
    vocab = 20  # every test vocabulary has at least 20 tokens
    max_tokens = min(30, text_cfg.get("text", {}).get("max_tokens", 128))
    audio_len = _config(repo, test_models.audio)["inputs"][0]["shape"][1]
    image_shape = _config(repo, test_models.image)["inputs"][0]["shape"][1:]
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            rows = int(rng.integers(1, 5))
            out.append(
                (test_models.image, {"pixels": rng.integers(0, 256, (rows, *image_shape), dtype=np.uint8)})
            )
        elif kind == 1:
            rows, length = int(rng.integers(1, 4)), int(rng.integers(1, max_tokens + 1))
            ids = rng.integers(2, vocab, (rows, length)).astype(np.int64)
            out.append((test_models.text, {"input_ids": ids, "attention_mask": np.ones_like(ids)}))
        else:
            rows = int(rng.integers(1, 3))
            out.append(
                (test_models.audio, {"waveform": rng.normal(0, 0.2, (rows, audio_len)).astype(np.float32)})
            )
    return out


def test_concurrent_mixed_requests_get_their_unbatched_answers_and_are_batched(
    server: Server, test_models: TestModels
):
    requests = _mixed_requests(test_models, 300)
    sessions = {name: _session(test_models.repository, name) for name in {n for n, _ in requests}}
    expected = [sessions[name].run(["probabilities"], feeds)[0] for name, feeds in requests]

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as c:
            sem = asyncio.Semaphore(64)

            async def one(name: str, feeds: dict[str, np.ndarray]) -> httpx.Response:
                async with sem:
                    return await c.post(f"/v2/models/{name}/infer", content=_v2(feeds))

            return await asyncio.gather(*(one(name, feeds) for name, feeds in requests))

    stats_before = triton.InferenceServerClient(server.host_port).get_inference_statistics()
    responses = asyncio.run(fire())
    for (name, _feeds), want, r in zip(requests, expected, responses, strict=True):
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}["probabilities"]
        got = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
        np.testing.assert_allclose(got, want, **TOL, err_msg=name)

    stats = triton.InferenceServerClient(server.host_port).get_inference_statistics()

    def merged(doc) -> int:
        return sum(
            b["compute_infer"]["count"]
            for s in doc["model_stats"]
            for b in s["batch_stats"]
            if b["batch_size"] > 1
        )

    def executions(doc) -> int:
        return sum(s["execution_count"] for s in doc["model_stats"])

    rows = sum(next(iter(f.values())).shape[0] for _, f in requests)
    assert merged(stats) > merged(stats_before)
    # Fewer ORT calls than requests: requests really were merged.
    assert executions(stats) - executions(stats_before) < len(requests) < rows


def test_text_answers_do_not_depend_on_padding_within_a_batch(test_models: TestModels):
    text = test_models.text
    sess = _session(test_models.repository, text)
    rng = np.random.default_rng(3)
    rows = [rng.integers(2, 20, (1, n)).astype(np.int64) for n in (1, 2, 3, 5, 8, 13, 21, 30, 4, 2)]

    async def scenario(c):
        bodies = [_v2({"input_ids": r, "attention_mask": np.ones_like(r)}) for r in rows]
        rs = await asyncio.gather(*(c.post(f"/v2/models/{text}/infer", content=b) for b in bodies))
        stats = (await c.get(f"/v2/models/{text}/stats")).json()
        return rs, stats

    rs, stats = with_app(test_models.repository, scenario)
    for ids, r in zip(rows, rs, strict=True):
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}["probabilities"]
        want = sess.run(["probabilities"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), want, **TOL)
    sizes = [b["batch_size"] for s in stats["model_stats"] for b in s["batch_stats"]]
    assert max(sizes) > 1, sizes


def test_queue_full_returns_429_with_retry_after(special_repository: Path):
    wave = np.random.default_rng(0).normal(0, 1, (1, 512)).astype(np.float32)

    async def scenario(c):
        body = _v2({"waveform": wave})
        return await asyncio.gather(*(c.post("/v2/models/slow/infer", content=body) for _ in range(40)))

    responses = with_app(special_repository, scenario)
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) > 0 and codes.count(200) >= 4, codes
    for r in responses:
        if r.status_code == 429:
            assert r.json()["code"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert r.json()["outputs"][0]["shape"] == [1, 2]


def test_error_in_one_request_fails_only_that_request(special_repository: Path):
    sess = _session(special_repository, "fragile")
    rng = np.random.default_rng(1)
    good = [rng.integers(0, 10, (int(rng.integers(1, 3)), 4)).astype(np.float32) for _ in range(30)]
    bad = [np.array([[1, 2, 3, 99]], dtype=np.float32), np.array([[50, 0, 0, 0]], dtype=np.float32)]
    batch = [*good[:15], bad[0], *good[15:], bad[1]]

    async def scenario(c):
        rs = await asyncio.gather(
            *(c.post("/v2/models/fragile/infer", content=_v2({"waveform": x})) for x in batch)
        )
        after = await c.post("/v2/models/fragile/infer", content=_v2({"waveform": good[0]}))
        stats = (await c.get("/v2/models/fragile/stats")).json()
        return rs, after, stats

    # CUDA kernels do not bounds-check a Gather, so only the CPU provider fails the bad rows.
    rs, after, stats = with_app(special_repository, scenario, providers="cpu")
    for x, r in zip(batch, rs, strict=True):
        if any(x is b for b in bad):
            assert r.status_code == 500 and r.json()["code"] == "inference_failed", r.text
        else:
            assert r.status_code == 200, r.text
            out = {o["name"]: o for o in r.json()["outputs"]}["probabilities"]
            want = sess.run(["probabilities"], {"waveform": x})[0]
            np.testing.assert_allclose(
                np.array(out["data"]).reshape(out["shape"]), want, **TOL
            )
    assert after.status_code == 200
    assert stats["model_stats"][0]["inference_stats"]["fail"]["count"] == 2


def test_requests_past_their_deadline_are_shed_with_504(tmp_path: Path):
    m.slow_model(tmp_path, max_batch=4, queue=32)

    async def scenario(c):
        # Two full batches ahead (one computing, one queued), then requests with a 3 ms budget:
        # they cannot start before a whole batch has been computed.
        full = _v2({"waveform": np.ones((4, 512), dtype=np.float32)})
        busy = [asyncio.create_task(c.post("/v2/models/slow/infer", content=full)) for _ in range(2)]
        await asyncio.sleep(0.005)
        body = _v2({"waveform": np.zeros((1, 512), dtype=np.float32)})
        by_header = [
            c.post("/v2/models/slow/infer", content=body, headers={"x-request-timeout-ms": "3"})
            for _ in range(2)
        ]
        v2_timeout = orjson.dumps({**orjson.loads(body), "parameters": {"timeout": 3000}})  # microseconds
        by_parameter = [c.post("/v2/models/slow/infer", content=v2_timeout) for _ in range(2)]
        shed = await asyncio.gather(*by_header, *by_parameter)
        after = await c.post("/v2/models/slow/infer", content=body)
        metrics = (await c.get("/metrics")).text
        stats = (await c.get("/v2/models/slow/stats")).json()["model_stats"][0]
        return await asyncio.gather(*busy), shed, after, metrics, stats

    # The graph is slow enough to hold a queue only on a CPU; on a GPU its matmuls take microseconds.
    busy, shed, after, metrics, stats = with_app(tmp_path, scenario, providers="cpu")
    assert all(r.status_code == 200 for r in busy) and after.status_code == 200
    for r in shed:
        assert r.status_code == 504, r.text
        assert r.json()["code"] == "deadline"
    assert 'neuroserve_rejections_total{model="slow",reason="deadline"} 4.0' in metrics
    # shed before compute: only the two busy batches and the request after them ran
    assert stats["inference_count"] == 9
