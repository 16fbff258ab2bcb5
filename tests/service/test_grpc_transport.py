"""The gRPC server's HTTP/2 (service/server/grpc/http2.py) against real clients and raw sockets:
messages larger than every flow-control window in both directions, header blocks the decoder
remembers, and framing a client gets wrong, which ends that connection and nothing else."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import hpack
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tests.service import models as m
from tests.service.conftest import Server, free_port, start_server

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0, 1, 3, 4, 6, 7, 9
END_HEADERS = 0x4
SAMPLES = 160_000  # 640 KB of float32 a row: a batch of 8 is over the 4 MiB stream window


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    d = tmp_path_factory.mktemp("grpc-transport")
    m.audio_model(d / "models", name="echo", sample_rate=16_000, duration_s=SAMPLES / 16_000, echo=True,
                  max_batch=8)
    port = free_port()
    srv = start_server(d / "models", d / "server.log", "--grpc-port", str(port),
                       "--max-body-bytes", str(8 * 1024 * 1024))
    yield srv, port
    srv.stop()


def test_messages_larger_than_the_windows_go_both_ways_whole(server: tuple[Server, int]):
    x = np.random.default_rng(0).standard_normal((8, SAMPLES)).astype(np.float32)
    with triton.InferenceServerClient(f"127.0.0.1:{server[1]}") as client:
        inp = triton.InferInput("waveform", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        for _ in range(2):  # the second on a connection whose windows the first has used
            result = client.infer("echo", [inp], outputs=[triton.InferRequestedOutput("echo")])
            np.testing.assert_array_equal(result.as_numpy("echo"), x)


def test_each_call_gets_its_own_metadata_when_header_blocks_repeat(server: tuple[Server, int]):
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="waveform", datatype="FP32", shape=[1, SAMPLES])
    request.raw_input_contents.append(np.zeros(SAMPLES, np.float32).tobytes())
    with grpc.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
        infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        echoed = []
        for rid in ("first-1", "second-2", "first-1", "second-2", None, None):
            metadata = (("x-request-id", rid),) if rid else ()
            _, call = infer.with_call(request, metadata=metadata)
            echoed.append(dict(call.trailing_metadata())["x-request-id"])
    assert echoed[:4] == ["first-1", "second-2", "first-1", "second-2"]
    assert len({*echoed[4:], "first-1", "second-2"}) == 4  # new ids, one per call


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def _goaway_code(sock: socket.socket) -> int | None:
    """The error code of the GOAWAY the server sends before it closes (None: closed without one)."""
    buf = b""
    sock.settimeout(10)
    while True:
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            kind, payload, buf = buf[3], buf[9:9 + length], buf[9 + length:]
            if kind == GOAWAY:
                return struct.unpack(">L", payload[4:8])[0]
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(PREFACE + _frame(SETTINGS, 0, 0))
    return sock


def _request_headers() -> bytes:
    return hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":authority", "x"),
                                   (":path", "/inference.GRPCInferenceService/ServerLive"),
                                   ("content-type", "application/grpc"), ("te", "trailers")])


@pytest.mark.parametrize("case, code", [
    ("frame over the size limit", 6),  # FRAME_SIZE_ERROR
    ("undecodable header block", 9),  # COMPRESSION_ERROR
    ("header block over the limit", 1),  # PROTOCOL_ERROR
    ("DATA on a stream never opened", 1),
    ("header block interrupted", 1),
])
def test_framing_errors_end_the_connection_with_goaway_and_the_server_serves_on(
    server: tuple[Server, int], case: str, code: int
):
    sent = {
        "frame over the size limit": struct.pack(">I", 2**24 - 1)[1:] + bytes((DATA, 0))
        + struct.pack(">I", 1),
        "undecodable header block": _frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\x0f"),
        "header block over the limit": _frame(HEADERS, 0, 1, _request_headers())
        + b"".join(_frame(CONTINUATION, 0, 1, b"\x00" * 16_384) for _ in range(5)),
        "DATA on a stream never opened": _frame(DATA, 0, 7, b"\x00\x00\x00\x00\x00"),
        "header block interrupted": _frame(HEADERS, 0, 1, _request_headers()) + _frame(DATA, 0, 1, b"x"),
    }[case]
    with _connect(server[1]) as sock:
        sock.sendall(sent)
        assert _goaway_code(sock) == code
    with triton.InferenceServerClient(f"127.0.0.1:{server[1]}") as client:
        assert client.is_server_live()


@pytest.mark.parametrize("flood", ["pings", "rapid reset"])
def test_a_flood_of_control_frames_ends_the_connection(server: tuple[Server, int], flood: str):
    """A PING flood, or streams opened and reset at once by the thousand (CVE-2023-44487), get
    ENHANCE_YOUR_CALM; a client's few PINGs and cancels a second stay far below the limit."""
    if flood == "pings":
        frames = b"".join(_frame(PING, 0, 0, i.to_bytes(8, "big")) for i in range(3000))
    else:
        cancel = b"\0\0\0\x08"  # CANCEL
        frames = b"".join(_frame(HEADERS, END_HEADERS, i, _request_headers())
                          + _frame(RST_STREAM, 0, i, cancel) for i in range(1, 6001, 2))
    with _connect(server[1]) as sock:
        sock.sendall(frames)
        assert _goaway_code(sock) == 11  # ENHANCE_YOUR_CALM
    with triton.InferenceServerClient(f"127.0.0.1:{server[1]}") as client:
        assert client.is_server_live()


def test_a_client_that_does_not_speak_http2_is_closed(server: tuple[Server, int]):
    with socket.create_connection(("127.0.0.1", server[1])) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _goaway_code(sock) == 1
    with triton.InferenceServerClient(f"127.0.0.1:{server[1]}") as client:
        assert client.is_server_live()


def test_a_call_that_is_not_grpc_is_refused_on_its_stream(server: tuple[Server, int]):
    headers = hpack.Encoder().encode([(":method", "GET"), (":scheme", "http"), (":authority", "x"),
                                      (":path", "/inference.GRPCInferenceService/ServerLive")])
    with _connect(server[1]) as sock:
        sock.sendall(_frame(HEADERS, END_HEADERS | 0x1, 1, headers))
        sock.settimeout(10)
        buf = b""
        decoder = hpack.Decoder()
        while True:  # the answer: a trailers-only HEADERS frame on stream 1 with a grpc-status
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                length = int.from_bytes(buf[:3], "big")
                kind, stream, payload = buf[3], int.from_bytes(buf[5:9], "big"), buf[9:9 + length]
                buf = buf[9 + length:]
                if kind == HEADERS and stream == 1:
                    fields = dict(decoder.decode(payload))
                    assert fields["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
                    return
            chunk = sock.recv(65536)
            assert chunk, "closed without answering the stream"
            buf += chunk


def _metric(url: str, name: str, *labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")) and all(label in line for label in labels))


def test_a_call_the_client_cancels_is_cancelled_in_the_server(tmp_path: Path):
    m.slow_model(tmp_path / "models", width=1536, max_batch=1, queue=16)
    port = free_port()
    srv = start_server(tmp_path / "models", tmp_path / "server.log", "--providers", "cpu",
                       "--grpc-port", str(port))
    request = pb.ModelInferRequest(model_name="slow")
    request.inputs.add(name="waveform", datatype="FP32", shape=[1, 1536])
    request.raw_input_contents.append(np.zeros(1536, np.float32).tobytes())
    cancelled = ('endpoint="grpc_infer"', 'model="slow"', 'outcome="client_error"')
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            calls = [infer.future(request) for _ in range(4)]
            deadline = time.monotonic() + 30
            while _metric(srv.url, "neuroserve_inflight_requests") < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _metric(srv.url, "neuroserve_requests_total", *cancelled) == 0
            # Queued behind three slow ones: its RST_STREAM reaches the server while it waits, and
            # the server counts it as the caller's (499, client_error), not as served.
            assert not calls[3].done()
            calls[3].cancel()
            counted, deadline = 0.0, time.monotonic() + 30
            while counted < 1 and time.monotonic() < deadline:
                counted = _metric(srv.url, "neuroserve_requests_total", *cancelled)
            assert counted == 1, srv.logs()[-2000:]
            for call in calls[:3]:
                assert len(call.result(timeout=30).raw_output_contents) == 2
    finally:
        srv.stop()


_STREAMS = st.sampled_from([0, 1, 2, 3, 5, 2**31 - 1])
_WORDS = st.sampled_from([0, 1, 2**14, 2**24, 2**31 - 1, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1)
# Payloads shaped like the fields frames hold (window increments, settings, error codes, padding
# lengths), as well as any bytes.
_PAYLOADS = (st.binary(max_size=40)
             | _WORDS.map(lambda w: w.to_bytes(4, "big"))
             | st.lists(st.tuples(st.integers(0, 8), _WORDS), max_size=4).map(
                 lambda pairs: b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in pairs))
             | st.tuples(st.integers(0, 255), st.binary(max_size=8)).map(lambda t: bytes((t[0],)) + t[1]))
_FRAMES = st.lists(st.tuples(st.integers(0, 10), st.sampled_from([0, 1, 4, 5, 8, 0x20, 0x2D, 255]),
                             _STREAMS, _PAYLOADS), min_size=1, max_size=6)


@settings(max_examples=400, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=_FRAMES, open_stream=st.booleans())
def test_any_frames_after_the_preface_never_break_the_server(
    server: tuple[Server, int], frames: list[tuple[int, int, int, bytes]], open_stream: bool
):
    """Whatever frames follow (any type, flags, stream and payload), the connection either answers
    a PING after them or is closed, and no error escapes the protocol (checked in the log below)."""
    with _connect(server[1]) as sock:
        first = _frame(HEADERS, END_HEADERS, 1, _request_headers()) if open_stream else b""
        sock.sendall(first + b"".join(_frame(*f) for f in frames) + _frame(PING, 0, 0, b"fuzzping"))
        sock.settimeout(10)
        buf = b""
        while chunk := sock.recv(65536):
            buf += chunk
            if _frame(PING, 1, 0, b"fuzzping") in buf:
                break


def test_after_the_fuzz_the_server_serves_and_logged_no_protocol_failure(server: tuple[Server, int]):
    with triton.InferenceServerClient(f"127.0.0.1:{server[1]}") as client:
        assert client.is_server_live()
    logs = server[0].logs()
    assert "Traceback" not in logs and "Fatal error" not in logs, logs[-3000:]


def test_connections_past_their_max_age_are_sent_away_and_calls_go_on(tmp_path: Path):
    m.audio_model(tmp_path / "models", name="echo", echo=True)
    port = free_port()
    srv = start_server(tmp_path / "models", tmp_path / "server.log", "--grpc-port", str(port),
                       "--grpc-max-connection-age-s", "0.5")
    try:
        with _connect(port) as sock:  # an idle connection: GOAWAY NO_ERROR, then closed
            t0 = time.monotonic()
            assert _goaway_code(sock) == 0
            assert 0.4 <= time.monotonic() - t0 <= 5
        x = np.ones((1, 4000), np.float32)
        inp = triton.InferInput("waveform", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        answered = 0
        with triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
            end = time.monotonic() + 2.5  # five connection lifetimes, calls back to back
            while time.monotonic() < end:
                out = client.infer("echo", [inp], outputs=[triton.InferRequestedOutput("echo")])
                np.testing.assert_array_equal(out.as_numpy("echo"), x)
                answered += 1
        assert answered > 50
    finally:
        srv.stop()


def test_connections_and_goaways_are_counted(server: tuple[Server, int]):
    """After the framing errors and floods above: each reason counted; open connections gauged."""
    srv, port = server
    goaways = {reason: _metric(srv.url, "neuroserve_grpc_goaway_total", f'reason="{reason}"')
               for reason in ("protocol_error", "frame_size_error", "compression_error", "enhance_your_calm")}
    assert all(n >= 1 for n in goaways.values()), goaways
    with triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
        assert client.is_server_live()
        assert _metric(srv.url, "neuroserve_grpc_connections") >= 1
