"""schemathesis over /openapi.json, bounded to about a minute: every status a route answers is in the
schema, every documented body is what the route sends, and bad input gets a 4xx, never a 500.

The run uses tests/service/schemathesis.toml (503/504 are the documented not-ready and deadline
answers; V2 bodies whose data does not match their declared shape are 400s the schema cannot
express). A failure prints schemathesis's report with a curl line to reproduce each case."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.conftest import TestModels, start_server

CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = 100  # ~2,800 cases; about 45 s on a 2-core machine


def test_the_api_conforms_to_its_openapi_schema(test_models: TestModels, tmp_path: Path):
    pytest.importorskip("schemathesis")
    server = start_server(test_models.repository, tmp_path / "server.log")
    try:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "--no-color", "run",
             f"{server.url}/openapi.json", "--max-examples", str(EXAMPLES), "--seed", "1",
             "--request-timeout", "10"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path)  # its example database there
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failures" not in run.stdout.split("SUMMARY")[-1]
