"""One settings class: flags and NEUROSERVE_* variables mean the same, thread counts fit the cores."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.cli import build_parser, parse_settings
from service.core.runtime import cuda_available, session_options
from service.settings import Settings


def test_every_setting_has_a_flag_and_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch):
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in help_text
        assert f"NEUROSERVE_{name.upper()}" in help_text
    monkeypatch.setenv("NEUROSERVE_PORT", "9123")
    monkeypatch.setenv("NEUROSERVE_MAX_BODY_BYTES", "1000")
    monkeypatch.setenv("NEUROSERVE_STRICT_READINESS", "false")
    s = parse_settings(["serve", "--max-body-bytes", "2000", "--providers", "cpu", "--workers", "3"])
    assert (s.port, s.max_body_bytes, s.providers, s.workers, s.strict_readiness) == (
        9123,
        2000,
        "cpu",
        3,
        False,
    )
    assert parse_settings(["serve", "--strict-readiness"]).strict_readiness is True


def test_settings_round_trip_through_the_environment(monkeypatch: pytest.MonkeyPatch):
    s = Settings(port=1234, workers=2, access_log=False, default_timeout_ms=250)
    for key, value in s.to_environ().items():
        monkeypatch.setenv(key, value)
    assert Settings() == s


def test_default_threads_share_the_cores_between_workers_and_instances():
    cores = Settings().cores
    assert Settings(workers=1).intra_op_threads_for(1) == max(1, cores - 1)
    assert Settings(workers=2).intra_op_threads_for(1) == max(1, (cores - 2) // 2)
    assert Settings(workers=cores * 2).intra_op_threads_for(2) == 1
    for workers in (1, 2, 4):
        for instances in (1, 2, 3):
            threads = Settings(workers=workers).intra_op_threads_for(instances)
            assert threads * workers * instances <= max(cores - workers, workers * instances)
    assert Settings(intra_op_threads=3).intra_op_threads_for(4) == 3


def test_session_options_turn_spinning_off_and_set_threads():
    so = session_options(Settings(intra_op_threads=1, graph_optimization="basic"), 1)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert so.intra_op_num_threads == 1 and so.inter_op_num_threads == 1


def test_invalid_settings_exit_with_status_2():
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", "-5"], capture_output=True, timeout=60
    )
    assert done.returncode == 2 and b"port" in done.stderr


@pytest.mark.skipif(cuda_available(), reason="this onnxruntime has the CUDA provider")
def test_providers_cuda_fails_fast_without_the_cuda_provider(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "serve",
            "--providers",
            "cuda",
            "--model-repository",
            str(tmp_path),
        ],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert b"CUDA" in done.stderr
