"""TLS on REST and gRPC from the same certificate, and client certificates when a CA is given."""

from __future__ import annotations

import ssl
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.conftest import TestModels, free_port, start_server


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
                 "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"))
    return d


def test_rest_and_grpc_speak_tls_and_require_client_certificates(pki: Path, test_models: TestModels,
                                                                 tmp_path: Path):
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    grpc_port = free_port()
    server = start_server(test_models.repository, tmp_path / "server.log", "--grpc-port", str(grpc_port),
                          "--ssl-certfile", str(pki / "server.pem"), "--ssl-keyfile", str(pki / "server.key"),
                          "--ssl-ca-certs", str(pki / "ca.pem"), wait="started")
    try:
        url = server.url.replace("http://", "https://")
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        with httpx.Client(base_url=url, verify=context, timeout=10) as c:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if c.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.process.poll() is None and time.monotonic() < deadline, server.logs()
                time.sleep(0.2)
            assert c.get(f"/v2/models/{test_models.image}").status_code == 200
        # without a client certificate the handshake fails
        server_only = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with pytest.raises(httpx.TransportError), httpx.Client(base_url=url, verify=server_only) as c:
            c.get("/v2/health/live")
        client = triton.InferenceServerClient(
            f"127.0.0.1:{grpc_port}", ssl=True, root_certificates=str(pki / "ca.pem"),
            private_key=str(pki / "client.key"), certificate_chain=str(pki / "client.pem"))
        pixels = np.zeros((1, 1, 28, 28), dtype=np.uint8)
        inp = triton.InferInput("pixels", list(pixels.shape), "UINT8")
        inp.set_data_from_numpy(pixels)
        assert client.infer(test_models.image, [inp]).as_numpy("probabilities").shape == (1, 10)
        client.close()
        plain = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=5)
        plain.close()
    finally:
        server.stop()


def test_tls_settings_that_cannot_work_stop_the_start(pki: Path, test_models: TestModels):
    from service.cli import main

    base = ["serve", "--model-repository", str(test_models.repository), "--port", "0"]
    assert main([*base, "--ssl-certfile", str(pki / "server.pem")]) == 2
    missing = ["--ssl-certfile", str(pki / "nope.pem"), "--ssl-keyfile", str(pki / "server.key")]
    assert main([*base, *missing]) == 2
