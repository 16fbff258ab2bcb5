"""Bad input gets the right 4xx JSON, never a 500, and the service keeps answering afterwards."""

from __future__ import annotations

import gzip
import tomllib

import numpy as np
import orjson

from tests.service import media
from tests.service.conftest import TestModels, with_app


def _pixels(rows: int = 1) -> dict:
    return {"name": "pixels", "datatype": "UINT8", "shape": [rows, 1, 28, 28], "data": [7] * (784 * rows)}


def _assert_error(r, status: int, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "code"}, body
    assert body["error"]
    if code is not None:
        assert body["code"] == code, body
    assert r.headers["x-request-id"]


def test_bad_v2_tensors_return_400_json_and_the_server_keeps_answering(test_models: TestModels):
    image = test_models.image
    config = tomllib.loads((test_models.repository / image / "config.toml").read_text())
    too_many_rows = config.get("batching", {}).get("max_batch_size", 32) + 1

    async def scenario(c):
        url = f"/v2/models/{image}/infer"
        bad_bodies = [
            b"{not json",
            b"[]",
            b'{"inputs": []}',
            orjson.dumps({"inputs": [{**_pixels(), "datatype": "FP32"}]}),  # wrong datatype
            orjson.dumps({"inputs": [{**_pixels(), "shape": [1, 1, 28, 27]}]}),  # wrong static dim
            orjson.dumps({"inputs": [{**_pixels(), "shape": [1, 784]}]}),  # wrong rank
            orjson.dumps({"inputs": [{**_pixels(), "data": [1, 2, 3]}]}),  # too little data
            orjson.dumps({"inputs": [{**_pixels(), "data": ["a"] * 784}]}),  # not numbers
            orjson.dumps({"inputs": [{**_pixels(), "data": [300] * 784}]}),  # out of UINT8 range
            orjson.dumps({"inputs": [{**_pixels(), "name": "nope"}]}),  # unknown input
            orjson.dumps({"inputs": [_pixels(), _pixels()]}),  # input twice
            orjson.dumps({"inputs": [_pixels(too_many_rows)]}),  # more rows than max_batch_size
            orjson.dumps({"inputs": [_pixels()], "outputs": [{"name": "nope"}]}),
            orjson.dumps(
                {"inputs": [_pixels()], "outputs": [{"name": "logits", "parameters": {"classification": -1}}]}
            ),
            orjson.dumps({"inputs": [{**_pixels(), "shape": "1,1,28,28"}]}),
            orjson.dumps({"inputs": [{**_pixels(), "datatype": ["UINT8"]}]}),  # not a string
            orjson.dumps({"inputs": [{**_pixels(), "shape": [0, 2**63 - 1], "data": []}]}),  # beyond numpy
            orjson.dumps({"inputs": [{**_pixels(), "shape": [1] * 40, "data": [7]}]}),  # too many dimensions
            orjson.dumps({"inputs": [_pixels()], "outputs": [{"name": "logits"}, {"name": "logits"}]}),
            orjson.dumps({"inputs": [_pixels()], "id": {"a": 1}}),
            orjson.dumps({"inputs": [{k: v for k, v in _pixels().items() if k != "data"}]}),
            orjson.dumps({"inputs": [_pixels()], "parameters": {"timeout": "soon"}}),
        ]
        for body in bad_bodies:
            _assert_error(await c.post(url, content=body), 400, None)
        # binary extension: header length beyond the body, and sizes that do not add up
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "UINT8",
                        "shape": [1, 1, 28, 28],
                        "parameters": {"binary_data_size": 784},
                    }
                ]
            }
        )
        r = await c.post(
            url, content=header + b"\0" * 100, headers={"Inference-Header-Content-Length": str(len(header))}
        )
        _assert_error(r, 400, "invalid_input")
        r = await c.post(
            url,
            content=header + b"\0" * 784,
            headers={"Inference-Header-Content-Length": str(len(header) + 10_000)},
        )
        _assert_error(r, 400, "invalid_input")
        r = await c.post(url, content=header + b"\0" * 784, headers={"Inference-Header-Content-Length": "x"})
        _assert_error(r, 400, "invalid_input")
        ok = await c.post(url, content=orjson.dumps({"inputs": [_pixels()]}))
        assert ok.status_code == 200, ok.text
        return ok.json()

    out = with_app(test_models.repository, scenario)
    assert out["outputs"][0]["shape"] == [1, 10]


def test_text_token_ids_are_checked_before_compute(test_models: TestModels):
    text = test_models.text

    async def scenario(c):
        url = f"/v2/models/{text}/infer"

        def body(ids, mask):
            return orjson.dumps(
                {
                    "inputs": [
                        {"name": "input_ids", "datatype": "INT64", "shape": list(np.shape(ids)), "data": ids},
                        {
                            "name": "attention_mask",
                            "datatype": "INT64",
                            "shape": list(np.shape(mask)),
                            "data": mask,
                        },
                    ]
                }
            )

        _assert_error(await c.post(url, content=body([[5, 10**9]], [[1, 1]])), 400, "invalid_input")
        _assert_error(await c.post(url, content=body([[5, -3]], [[1, 1]])), 400, "invalid_input")
        _assert_error(await c.post(url, content=body([[5, 6, 7]], [[1, 1]])), 400, "invalid_input")
        _assert_error(await c.post(url, content=body([[5] * 100], [[1] * 100])), 400, "invalid_input")
        not_strings = orjson.dumps(
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": [5, 6]}]}
        )
        _assert_error(await c.post(url, content=not_strings), 400, "invalid_input")
        empty_text = orjson.dumps(
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [" "]}]}
        )
        _assert_error(await c.post(url, content=empty_text), 400, "invalid_input")
        assert (await c.post(url, content=body([[5, 6]], [[1, 1]]))).status_code == 200

    with_app(test_models.repository, scenario)


def test_unknown_model_route_and_method_return_json_404_405(test_models: TestModels):
    async def scenario(c):
        _assert_error(await c.post("/v2/models/nope/infer", content=b"{}"), 404, "model_not_found")
        _assert_error(await c.get("/v2/models/nope"), 404, "model_not_found")
        _assert_error(await c.get("/v2/models/nope/ready"), 404, "model_not_found")
        _assert_error(
            await c.post(
                f"/v2/models/{test_models.image}/versions/9/infer",
                content=orjson.dumps({"inputs": [_pixels()]}),
            ),
            404,
            "model_not_found",
        )
        _assert_error(await c.post("/v1/image/nope", content=media.png()), 404, "model_not_found")
        _assert_error(await c.get("/no/such/route"), 404, "not_found")
        _assert_error(await c.get(f"/v2/models/{test_models.image}/infer"), 405, "method_not_allowed")
        for top_k in ("0", "1001", "abc", "1.5", ""):
            _assert_error(await c.post(f"/v1/text/{test_models.text}?top_k={top_k}", json={"text": "a"}), 400)
        ok = await c.post(f"/v1/text/{test_models.text}?top_k=1000&version=1", json={"text": "a"})
        assert ok.status_code == 200, ok.text

    with_app(test_models.repository, scenario)


def test_bad_uploads_return_the_right_4xx(test_models: TestModels):
    image, text, audio = test_models.image, test_models.text, test_models.audio

    async def scenario(c):
        _assert_error(
            await c.post(
                f"/v1/image/{image}",
                content=b"definitely not an image",
                headers={"content-type": "image/png"},
            ),
            415,
            "unsupported_media",
        )
        _assert_error(await c.post(f"/v1/image/{image}", content=b""), 400, "invalid_input")
        truncated = media.png(200, 200)[:300]
        r = await c.post(f"/v1/image/{image}", content=truncated, headers={"content-type": "image/png"})
        assert r.status_code in (400, 415), r.text
        _assert_error(
            await c.post(
                f"/v1/image/{image}", content=media.png_bomb(), headers={"content-type": "image/png"}
            ),
            413,
            "too_large",
        )
        _assert_error(
            await c.post(f"/v1/image/{image}", content=b"{}", headers={"content-type": "application/json"}),
            415,
            "unsupported_media",
        )
        _assert_error(await c.post(f"/v1/image/{image}", data={"field": "a form, not a file"}), 415)
        _assert_error(await c.post(f"/v1/image/{text}", content=media.png()), 400, "invalid_input")
        _assert_error(await c.post(f"/v1/text/{text}", json={"text": "   "}), 400, "invalid_input")
        _assert_error(await c.post(f"/v1/text/{text}", json={"text": ""}), 400, "invalid_input")
        _assert_error(await c.post(f"/v1/text/{text}", json={"texts": []}), 400, "invalid_input")
        _assert_error(await c.post(f"/v1/text/{text}", json={"txt": "typo"}), 400, "invalid_input")
        _assert_error(await c.post(f"/v1/text/{text}", json={"text": "x" * 50_000}), 413, "too_large")
        _assert_error(
            await c.post(f"/v1/text/{text}", content=b"\xff\xfe", headers={"content-type": "text/plain"}),
            400,
            "invalid_input",
        )
        _assert_error(
            await c.post(
                f"/v1/audio/{audio}",
                content=media.wav(seconds=40, rate=8000, channels=1),
                headers={"content-type": "audio/wav"},
            ),
            413,
            "too_large",
        )
        _assert_error(
            await c.post(
                f"/v1/audio/{audio}",
                content=b"RIFF....WAVEfmt garbage",
                headers={"content-type": "audio/wav"},
            ),
            415,
            "unsupported_media",
        )
        _assert_error(
            await c.post(f"/v1/audio/{audio}", content=media.png(), headers={"content-type": "image/png"}),
            415,
            "unsupported_media",
        )
        ok = await c.post(f"/v1/image/{image}", content=media.png())
        assert ok.status_code == 200, ok.text

    with_app(
        test_models.repository,
        scenario,
        max_image_pixels=10_000_000,
        max_text_chars=1000,
        max_audio_duration_s=30,
    )


def test_body_over_the_limit_returns_413_before_reading_it(test_models: TestModels):
    async def scenario(c):
        big = b"\0" * 5000
        r = await c.post(f"/v1/image/{test_models.image}", content=big, headers={"content-type": "image/png"})
        _assert_error(r, 413, "too_large")

        async def chunks():  # no Content-Length: counted while streaming
            for _ in range(10):
                yield b"\0" * 1000

        r = await c.post(f"/v2/models/{test_models.image}/infer", content=chunks())
        _assert_error(r, 413, "too_large")
        gz = gzip.compress(orjson.dumps({"inputs": [_pixels()]}) + b" " * 10_000)
        r = await c.post(
            f"/v2/models/{test_models.image}/infer", content=gz, headers={"content-encoding": "gzip"}
        )
        _assert_error(r, 413, "too_large")
        assert (await c.get("/v2/health/live")).status_code == 200

    with_app(test_models.repository, scenario, max_body_bytes=4096)


def test_request_id_is_echoed_or_generated_and_server_timing_is_set(test_models: TestModels):
    async def scenario(c):
        r = await c.post(
            f"/v2/models/{test_models.image}/infer",
            content=orjson.dumps({"inputs": [_pixels()]}),
            headers={"x-request-id": "client-abc-1"},
        )
        assert r.headers["x-request-id"] == "client-abc-1"
        timing = r.headers["server-timing"]
        assert "queue;dur=" in timing and "compute;dur=" in timing and 'batch;desc="1"' in timing
        r2 = await c.get("/v2/models/nope")
        assert len(r2.headers["x-request-id"]) >= 16
        assert "total;dur=" in r2.headers["server-timing"]

    with_app(test_models.repository, scenario)


def test_gzip_request_body_is_accepted(test_models: TestModels):
    async def scenario(c):
        body = gzip.compress(orjson.dumps({"inputs": [_pixels()]}))
        r = await c.post(
            f"/v2/models/{test_models.image}/infer", content=body, headers={"content-encoding": "gzip"}
        )
        assert r.status_code == 200, r.text

    with_app(test_models.repository, scenario)


def test_garbage_on_every_endpoint_never_gets_a_500(test_models: TestModels):
    rng = np.random.default_rng(123)
    valid = orjson.dumps({"inputs": [_pixels()]})
    bodies = [
        b"",
        b"null",
        b"{}",
        b'{"inputs": null}',
        b'{"inputs": [null]}',
        b'{"inputs": [{"name": 1, "datatype": [], "shape": {}}]}',
        b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [-1], "data": []}]}',
        b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1e9], "data": [1]}]}',
        b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1,1,28,28], "data": [[[[1]]]]}]}',
        b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1,1,28,28], "data": {"a": 1}}]}',
        b'{"text": 5}',
        b'{"texts": [1, 2]}',
        b'{"texts": "abc"}',
        b"[" * 5000,
        valid[: len(valid) // 2],
        valid.replace(b'"UINT8"', b'"BYTES"'),
        *(rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in rng.integers(1, 3000, 12)),
    ]
    headers = [
        {},
        {"content-type": "application/json"},
        {"content-type": "multipart/form-data; boundary=xyz"},
        {"content-type": "image/png"},
        {"content-type": "audio/wav"},
        {"inference-header-content-length": "5"},
        {"content-encoding": "gzip"},
        {"x-request-timeout-ms": "abc"},
    ]
    paths = [
        f"/v2/models/{test_models.image}/infer",
        f"/v2/models/{test_models.text}/infer",
        f"/v2/models/{test_models.audio}/versions/1/infer",
        f"/v1/image/{test_models.image}",
        f"/v1/text/{test_models.text}?top_k=2",
        f"/v1/audio/{test_models.audio}",
        "/v2/repository/index",
    ]

    async def scenario(c):
        codes = set()
        for path in paths:
            for i, body in enumerate(bodies):
                r = await c.post(path, content=body, headers=headers[i % len(headers)])
                assert r.status_code < 500, (path, body[:80], headers[i % len(headers)], r.text)
                assert r.headers["content-type"].startswith("application/json") or r.status_code == 200
                codes.add(r.status_code)
        assert (await c.post(f"/v2/models/{test_models.image}/infer", content=valid)).status_code == 200
        return codes

    codes = with_app(test_models.repository, scenario)
    assert {400, 415} <= codes
