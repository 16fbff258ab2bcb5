"""Who may call what, and how much: API keys and scopes, checked from the request head, quotas,
forged browser requests, the secure default without keys, gRPC metadata and the audit log."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from service.auth.keys import create_key, parse_scopes, revoke_key
from tests.service.conftest import Server, TestModels, free_port, start_server, with_app


@dataclass
class Keyed:
    server: Server
    keys_file: Path
    audit_log: Path
    grpc_port: int
    reader: str  # scope infer
    ops: str  # scope admin
    limited: str  # scope infer, 20 requests/s
    rowed: str  # scope infer, 16 rows/s


def _infer_body(rows: int = 1) -> bytes:
    return orjson.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [rows, 1, 28, 28],
                                     "data": [0] * (rows * 784)}]})


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def keyed(test_models: TestModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    d = tmp_path_factory.mktemp("keyed")
    keys_file = d / "keys.toml"
    reader = create_key(keys_file, "reader", parse_scopes("infer"))
    ops = create_key(keys_file, "ops", parse_scopes("admin"))
    limited = create_key(keys_file, "limited", parse_scopes("infer"), rate=20)
    rowed = create_key(keys_file, "rowed", parse_scopes("infer"), rows=16)
    grpc_port = free_port()
    server = start_server(test_models.repository, d / "server.log", "--api-keys-file", str(keys_file),
                          "--audit-log", str(d / "audit.log"), "--grpc-port", str(grpc_port))
    yield Keyed(server, keys_file, d / "audit.log", grpc_port, reader, ops, limited, rowed)
    server.stop()


def test_no_key_gets_401_json_and_probes_stay_open(keyed: Keyed, test_models: TestModels):
    with httpx.Client(base_url=keyed.server.url) as c:
        r = c.post(f"/v2/models/{test_models.image}/infer", content=_infer_body())
        assert r.status_code == 401
        assert r.json()["code"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.headers["x-request-id"]
        r = c.get(f"/v2/models/{test_models.image}", headers=_bearer("ns_not-a-key"))
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
        r = c.get(f"/v2/models/{test_models.image}", headers={"Authorization": "Basic eDp5"})
        assert r.status_code == 401
        for path in ("/v2/health/live", "/v2/health/ready", "/metrics", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        schema = c.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
        infer = schema["paths"]["/v2/models/{model}/infer"]["post"]
        assert infer["security"] == [{"apiKey": []}] and {"401", "403", "429"} <= set(infer["responses"])
        assert "security" not in schema["paths"]["/v2/health/live"]["get"]


def test_infer_key_predicts_but_cannot_unload_and_admin_key_loads(keyed: Keyed, test_models: TestModels):
    model = test_models.image
    with httpx.Client(base_url=keyed.server.url) as c:
        r = c.post(f"/v2/models/{model}/infer", content=_infer_body(), headers=_bearer(keyed.reader))
        assert r.status_code == 200, r.text
        r = c.post(f"/v2/repository/models/{model}/unload", headers=_bearer(keyed.reader))
        assert r.status_code == 403 and r.json()["code"] == "forbidden"
        assert c.get(f"/v2/models/{model}/ready", headers=_bearer(keyed.reader)).status_code == 200
        r = c.post(f"/v2/repository/models/{model}/load", headers=_bearer(keyed.ops))
        assert r.status_code == 200, r.text
        # admin implies infer
        r = c.post(f"/v2/models/{model}/infer", content=_infer_body(), headers=_bearer(keyed.ops))
        assert r.status_code == 200


def test_a_key_added_works_and_a_revoked_key_fails_within_5_seconds(keyed: Keyed, test_models: TestModels):
    path = f"/v2/models/{test_models.image}"
    with httpx.Client(base_url=keyed.server.url) as c:
        secret = create_key(keyed.keys_file, "rotated", parse_scopes("infer"))
        start = time.monotonic()
        while c.get(path, headers=_bearer(secret)).status_code != 200:
            assert time.monotonic() - start < 5, "a new key should work within 5 s"
            time.sleep(0.1)
        revoke_key(keyed.keys_file, "rotated")
        start = time.monotonic()
        while c.get(path, headers=_bearer(secret)).status_code != 401:
            assert time.monotonic() - start < 5, "a revoked key should fail within 5 s"
            time.sleep(0.1)
        assert c.get(path, headers=_bearer(keyed.reader)).status_code == 200


def test_a_30_mb_body_without_a_key_is_refused_before_it_is_sent(keyed: Keyed, test_models: TestModels):
    host, port = keyed.server.host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        start = time.monotonic()
        s.sendall(f"POST /v2/models/{test_models.image}/infer HTTP/1.1\r\nHost: x\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {30 * 1024 * 1024}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(4096)
            assert chunk, "closed without an answer"
            answer += chunk
        elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b"connection: close" in answer.lower()
    assert elapsed < 1.0


def test_cross_origin_simple_requests_change_nothing(keyed: Keyed, test_models: TestModels):
    model = test_models.image
    with httpx.Client(base_url=keyed.server.url) as c:
        for content_type in ("text/plain", "application/x-www-form-urlencoded",
                             "multipart/form-data; boundary=x"):
            r = c.post(f"/v2/repository/models/{model}/unload", content=b"{}",
                       headers={**_bearer(keyed.ops), "Content-Type": content_type})
            assert r.status_code == 415, (content_type, r.text)
        r = c.post(f"/v2/repository/models/{model}/unload",
                   headers={**_bearer(keyed.ops), "Origin": "https://evil.example"})
        assert r.status_code == 403
        assert c.get(f"/v2/models/{model}/ready", headers=_bearer(keyed.reader)).status_code == 200
        # no CORS unless --cors-origins: a browser may not read answers from another origin
        r = c.get(f"/v2/models/{model}", headers={**_bearer(keyed.reader), "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_a_rate_limited_key_gets_429s_and_another_key_is_not_slowed(keyed: Keyed, test_models: TestModels):
    path = f"/v2/models/{test_models.image}"

    async def burst(secret: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=keyed.server.url, timeout=30) as c:
            return await asyncio.gather(*[c.get(path, headers=_bearer(secret)) for _ in range(100)])

    limited = asyncio.run(burst(keyed.limited))
    codes = collections.Counter(r.status_code for r in limited)
    assert set(codes) == {200, 429} and codes[200] <= 25, codes
    refused = next(r for r in limited if r.status_code == 429)
    assert refused.json()["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["ratelimit-limit"] == "20" and refused.headers["ratelimit-remaining"] == "0"
    assert "ratelimit-reset" in refused.headers
    other = asyncio.run(burst(keyed.reader))
    assert all(r.status_code == 200 for r in other)
    with httpx.Client(base_url=keyed.server.url) as c:
        metrics = c.get("/metrics").text
    assert 'neuroserve_api_key_rejections_total{key="limited",reason="rate_limited"}' in metrics
    assert 'neuroserve_api_key_requests_total{key="reader"}' in metrics
    assert keyed.reader not in metrics and keyed.limited not in metrics  # names, never secrets


def test_a_row_quota_counts_the_rows_of_answered_requests(keyed: Keyed, test_models: TestModels):
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    path = f"/v2/models/{test_models.image}/infer"
    with httpx.Client(base_url=keyed.server.url, headers=_bearer(keyed.rowed)) as c:
        codes = [c.post(path, content=_infer_body(rows=8)).status_code for _ in range(5)]
        # 16 rows/s: two requests of 8 rows, maybe a third on what refilled meanwhile, then none
        assert codes[:2] == [200, 200] and codes.count(200) <= 3 and codes[-1] == 429, codes
        refused = c.post(path, content=_infer_body(rows=1))
        assert refused.status_code == 429 and "row rate" in refused.json()["error"]
        time.sleep(float(refused.headers["retry-after"]) + 0.1)
        assert c.post(path, content=_infer_body(rows=8)).status_code == 200
    time.sleep(1.1)
    client = triton.InferenceServerClient(f"127.0.0.1:{keyed.grpc_port}")
    pixels = np.zeros((8, 1, 28, 28), dtype=np.uint8)
    inp = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)
    metadata = {"authorization": f"Bearer {keyed.rowed}"}
    statuses = []
    for _ in range(5):
        try:
            client.infer(test_models.image, [inp], headers=metadata)
            statuses.append("OK")
        except InferenceServerException as e:
            statuses.append(str(e.status()))
    assert statuses[:2] == ["OK", "OK"] and "RESOURCE_EXHAUSTED" in statuses[-1], statuses
    client.close()


def test_grpc_needs_the_authorization_metadata(keyed: Keyed, test_models: TestModels):
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(f"127.0.0.1:{keyed.grpc_port}")
    pixels = np.zeros((1, 1, 28, 28), dtype=np.uint8)
    inp = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)
    assert client.is_server_live()  # health is open
    with pytest.raises(InferenceServerException) as e:
        client.infer(test_models.image, [inp])
    assert "UNAUTHENTICATED" in str(e.value.status())
    def metadata(secret: str) -> dict[str, str]:
        return {"authorization": f"Bearer {secret}"}  # gRPC metadata keys are lower case

    result = client.infer(test_models.image, [inp], headers=metadata(keyed.reader))
    assert result.as_numpy("probabilities").shape == (1, 10)
    with pytest.raises(InferenceServerException) as e:
        client.unload_model(test_models.image, headers=metadata(keyed.reader))
    assert "PERMISSION_DENIED" in str(e.value.status())
    client.load_model(test_models.image, headers=metadata(keyed.ops))
    client.close()
    for headers, expected in ((None, "UNAUTHENTICATED"), (metadata(keyed.reader), None)):
        streaming = triton.InferenceServerClient(f"127.0.0.1:{keyed.grpc_port}")
        answers: queue.Queue = queue.Queue()
        streaming.start_stream(callback=lambda result, error, q=answers: q.put((result, error)),
                               headers=headers)
        with contextlib.suppress(InferenceServerException):  # refused as it opened: said by callback
            streaming.async_stream_infer(test_models.image, [inp])
        result, error = answers.get(timeout=30)
        streaming.stop_stream()
        streaming.close()
        if expected:
            assert expected in str(error)
        else:
            assert error is None and result.as_numpy("probabilities").shape == (1, 10)
    lines = [orjson.loads(line) for line in keyed.audit_log.read_text().splitlines()]
    assert any(e["event"] == "admin" and e["key"] == "ops" and e["status"] == "OK"
               and e["action"].endswith("/RepositoryModelLoad") for e in lines)
    assert any(e["event"] == "denied" and e["key"] == "reader"
               and e["action"].endswith("/RepositoryModelUnload") for e in lines)


def test_the_audit_log_names_who_did_what(keyed: Keyed, test_models: TestModels):
    model = test_models.image
    with httpx.Client(base_url=keyed.server.url) as c:
        c.post(f"/v2/repository/models/{model}/load", headers=_bearer(keyed.ops))
        c.post(f"/v2/repository/models/{model}/unload")
    lines = [orjson.loads(line) for line in keyed.audit_log.read_text().splitlines()]
    admin = [e for e in lines if e["event"] == "admin" and e["key"] == "ops"]
    assert admin and admin[-1]["action"] == f"POST /v2/repository/models/{model}/load"
    assert admin[-1]["status"] == 200
    denied = [e for e in lines if e["event"] == "denied" and e["status"] == 401]
    assert denied and denied[-1]["key"] is None and denied[-1]["client"].startswith("127.0.0.1:")
    text = keyed.audit_log.read_text()
    assert keyed.ops not in text and keyed.reader not in text


# -- without keys: the secure default ----------------------------------------------------------------


def test_without_keys_state_changes_need_loopback_or_an_explicit_flag(test_models: TestModels):
    unload = f"/v2/repository/models/{test_models.text}/unload"

    async def status(c: httpx.AsyncClient) -> tuple[int, int]:
        r = await c.post(unload)
        infer = await c.post(f"/v2/models/{test_models.image}/infer", content=_infer_body())
        return r.status_code, infer.status_code

    # Bound beyond loopback: refused, while inference stays open.
    assert with_app(test_models.repository, status, host="0.0.0.0") == (403, 200)
    assert with_app(test_models.repository, status, host="0.0.0.0", allow_unauthenticated_admin=True) \
        == (200, 200)
    assert with_app(test_models.repository, status, host="127.0.0.1") == (200, 200)


def test_without_keys_a_forged_browser_request_cannot_unload(test_models: TestModels):
    unload = f"/v2/repository/models/{test_models.text}/unload"

    async def scenario(c: httpx.AsyncClient) -> list[int]:
        forged = await c.post(unload, content=b"{}", headers={"Content-Type": "text/plain"})
        foreign = await c.post(unload, headers={"Origin": "http://attacker.example"})
        ready = await c.get(f"/v2/models/{test_models.text}/ready")
        allowed = await c.post(unload, headers={"Origin": "http://app.example"})
        return [forged.status_code, foreign.status_code, ready.status_code, allowed.status_code]

    codes = with_app(test_models.repository, scenario, cors_origins="http://app.example")
    assert codes == [415, 403, 200, 200]


def test_cors_preflight_answers_only_the_allowed_origins(test_models: TestModels):
    async def scenario(c: httpx.AsyncClient) -> tuple[str | None, int]:
        headers = {"Access-Control-Request-Method": "POST",
                   "Access-Control-Request-Headers": "authorization,content-type"}
        ok = await c.options("/v2/models/x/infer", headers={**headers, "Origin": "http://app.example"})
        bad = await c.options("/v2/models/x/infer", headers={**headers, "Origin": "http://evil.example"})
        return ok.headers.get("access-control-allow-origin"), bad.status_code

    assert with_app(test_models.repository, scenario, cors_origins="http://app.example") == \
        ("http://app.example", 400)


def test_anonymous_callers_share_the_default_rate(test_models: TestModels):
    async def scenario(c: httpx.AsyncClient) -> collections.Counter[int]:
        rs = [await c.get(f"/v2/models/{test_models.image}") for _ in range(10)]
        return collections.Counter(r.status_code for r in rs)

    codes = with_app(test_models.repository, scenario, anonymous_rate=3)
    assert codes[429] >= 6 and codes[200] <= 4
