"""deploy/kubernetes: the manifests are valid Kubernetes objects and say what the service really does.

Built-in kinds are validated offline against the Kubernetes OpenAPI schemas that the PyPI package
kubernetes-validate bundles (strict: unknown fields fail). KServe's kinds are CRDs those schemas do
not hold, so they are checked field by field against KServe's API types. Everything else is checked
against the source of truth: the Dockerfile (command, environment, user), the app's routes, the
settings and CLI (flags, drain time), service/observability/metrics.py (the HPA's metric) and
docs/benchmarks.md (memory per worker).
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import uvicorn
import yaml
from fastapi import FastAPI
from prometheus_client.metrics import MetricWrapperBase
from starlette.testclient import TestClient

from service import cli
from service.observability import metrics
from service.server.app import create_app
from service.settings import Settings
from tests.deploy.dockerfile import Stage, parse
from tests.deploy.support import DEPLOY, ROOT

KUBERNETES = DEPLOY / "kubernetes"
KSERVE = KUBERNETES / "kserve"
# The newest Kubernetes release whose schemas the pinned kubernetes-validate bundles.
KUBERNETES_VERSION = "1.37.0"
BUILT_IN_KINDS = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap"}
# KServe's API types: pkg/apis/serving/v1alpha1/servingruntime_types.go (ServingRuntime) and
# pkg/apis/serving/v1beta1/{inference_service,predictor,predictor_model}.go (InferenceService);
# the protocol names, model mount and HTTP port are in pkg/constants/constants.go.
KSERVE_KINDS = {"ServingRuntime": "serving.kserve.io/v1alpha1",
                "InferenceService": "serving.kserve.io/v1beta1"}
KSERVE_PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}
KSERVE_CONTAINER = "kserve-container"
KSERVE_MODEL_MOUNT = "/mnt/models"
KSERVE_HTTP_PORT = 8080
# The gRPC runtime (grpc-v2): its routed port is the service's gRPC port, named h2c for Knative.
KSERVE_GRPC_RUNTIME = "neuroserve-grpc"
KSERVE_GRPC_PORT = 8001
MANIFEST_FILES = sorted(p for p in KUBERNETES.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in MANIFEST_FILES for doc in documents(path)]


def one(kind: str) -> dict[str, Any]:
    (found,) = [doc for _, doc in manifests() if doc["kind"] == kind]
    return found


@pytest.fixture(scope="module")
def image() -> Stage:
    return parse(ROOT / "Dockerfile")[-1]  # the default target: the CPU image


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return one("Deployment")


@pytest.fixture(scope="module")
def pod(deployment) -> dict[str, Any]:
    return deployment["spec"]["template"]


@pytest.fixture(scope="module")
def container(pod) -> dict[str, Any]:
    (found,) = pod["spec"]["containers"]
    return found


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> FastAPI:
    """The service's app, built but not started: its lifespan (model loading) never runs."""
    return create_app(Settings(model_repository=tmp_path_factory.mktemp("empty-repository")))


@pytest.fixture(scope="module")
def client(app: FastAPI) -> TestClient:
    return TestClient(app)  # not entered as a context manager: no lifespan


def check_probe_routes(app: FastAPI, client: TestClient, ready_path: str, live_path: str) -> None:
    """Both are GET operations of the app; readiness answers 503 while the models load and while the
    service drains, liveness 200 in both states (a draining pod must not be restarted)."""
    get_paths = {path for path, operations in app.openapi()["paths"].items() if "get" in operations}
    assert {ready_path, live_path} <= get_paths
    state = app.state.service
    assert not state.draining
    assert client.get(ready_path).status_code == 503, "not ready before the models are loaded"
    assert client.get(live_path).status_code == 200
    state.draining = True
    try:
        response = client.get(ready_path)
        assert response.status_code == 503 and "shutting down" in response.json()["error"]
        assert client.get(live_path).status_code == 200
    finally:
        state.draining = False


def env_of(container: dict[str, Any]) -> dict[str, str]:
    assert all("value" in e for e in container.get("env", [])), "only literal values are expected"
    return {e["name"]: e["value"] for e in container.get("env", [])}


def serve_args(argv: list[str]):
    """`neuroserve serve ...` parsed by the service's own CLI parser (an unknown flag exits)."""
    assert argv[:2] == ["neuroserve", "serve"], argv
    return cli.build_parser().parse_args(argv[1:])


def container_argv(container: dict[str, Any], image: Stage) -> list[str]:
    """What the Deployment's container runs, with the `sh -c` script's variables expanded."""
    sh, dash_c, script = container["args"]
    assert (sh, dash_c) == ("sh", "-c")
    env = {**image.env, **env_of(container)}
    expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: env[m[1]], script)
    argv = shlex.split(expanded)
    assert argv[0] == "exec", "without exec the shell, not the service, would receive SIGTERM"
    return argv[1:]


def mebibytes(quantity: str) -> float:
    units = {"Ki": 2**-10, "Mi": 1, "Gi": 2**10}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi)", quantity)
    assert match, f"unexpected memory quantity {quantity}"
    return float(match[1]) * units[match[2]]


def probe_port(probe: dict[str, Any], container: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, str):
        (port,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return port


# ---- The files themselves --------------------------------------------------------------------


@pytest.mark.parametrize("folder", [KUBERNETES, KSERVE], ids=["base", "kserve"])
def test_kustomization_lists_every_manifest_of_its_folder(folder: Path):
    (kustomization,) = documents(folder / "kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    present = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == present
    assert not list(folder.glob("*.yml")), "use .yaml, as the kustomization and this test expect"


def test_the_base_holds_exactly_the_expected_built_in_kinds():
    base = {doc["kind"] for path, doc in manifests() if path.parent == KUBERNETES}
    assert base == BUILT_IN_KINDS
    kserve = {doc["kind"] for path, doc in manifests() if path.parent == KSERVE}
    assert kserve == set(KSERVE_KINDS)


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_built_in_kinds_validate_against_the_kubernetes_schemas(path: Path):
    for doc in documents(path):
        if doc["kind"] in KSERVE_KINDS:
            continue  # a CRD: see the KServe tests below
        assert doc["kind"] in BUILT_IN_KINDS, doc["kind"]
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_schema_validation_rejects_a_misspelt_field(deployment):
    """The validation above has teeth: strict schemas refuse a field Kubernetes would not know."""
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPorts"] = 8000
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# ---- The Deployment runs what the image runs ---------------------------------------------------


def test_deployment_runs_the_cpu_image_as_docker_compose_names_it(container):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["neuroserve"]
    assert service["build"]["target"] == "cpu"
    assert container["image"] == service["image"]


def test_container_command_is_the_images_start_command(container, image: Stage):
    assert not any(keyword == "ENTRYPOINT" for keyword, _ in image.instructions), (
        "with an ENTRYPOINT, Kubernetes `args` would no longer replace the whole command")
    assert "command" not in container
    assert container["args"] == image.cmd


def test_container_env_uses_real_settings_and_agrees_with_the_image(container, image: Stage):
    env = env_of(container)
    for name, value in env.items():
        assert name.startswith("NEUROSERVE_"), name
        field = name.removeprefix("NEUROSERVE_").lower()
        assert field in Settings.model_fields, f"{name} is not a setting (service/settings.py)"
        if name in image.env:
            assert value == image.env[name], f"{name}: {value!r} here, {image.env[name]!r} in the image"
    # Every value must be one the service accepts.
    Settings(**{name.removeprefix("NEUROSERVE_").lower(): value for name, value in env.items()})


def test_start_command_uses_only_real_flags_and_listens_on_the_container_port(container, image: Stage):
    args = serve_args(container_argv(container, image))
    assert args.model_repository == image.env["NEUROSERVE_MODEL_REPOSITORY"]
    assert args.host == "0.0.0.0", "the pod's IP, not loopback, must answer"
    http, grpc = container["ports"]
    assert (http["name"], grpc["name"]) == ("http", "grpc")
    assert http["containerPort"] == int(args.port)
    # gRPC's port is not a flag of the command: the setting's default, and the image's env.
    assert grpc["containerPort"] == Settings.model_fields["grpc_port"].default
    assert grpc["containerPort"] == int(image.env["NEUROSERVE_GRPC_PORT"])
    exposed = [rest for keyword, rest in image.instructions if keyword == "EXPOSE"]
    assert exposed == [f"{http['containerPort']} {grpc['containerPort']}"]


def test_probes_use_the_apps_readiness_and_liveness_routes(container, app, client):
    startup, readiness, liveness = (container[n]["httpGet"] for n in ("startupProbe", "readinessProbe",
                                                                       "livenessProbe"))
    assert startup["path"] == readiness["path"]
    check_probe_routes(app, client, readiness["path"], liveness["path"])
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe_port(container[name], container) == container["ports"][0]["containerPort"], name


def test_startup_probe_allows_as_long_as_the_images_healthcheck(container, image: Stage):
    """Models load in the background; the image's HEALTHCHECK gives them its start period, and the
    startup probe, which holds the liveness probe back, must allow at least as long."""
    probe = container["startupProbe"]
    allowance = probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]
    start_period = image.healthcheck_options["start-period"]
    assert start_period.endswith("s"), start_period
    assert allowance >= float(start_period[:-1])


def test_prometheus_annotations_point_at_the_metrics_route(pod, container, client):
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == container["ports"][0]["containerPort"]
    response = client.get(annotations["prometheus.io/path"])
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert f"# TYPE {hpa_pods_metric()} gauge" in response.text


def test_runs_as_the_images_non_root_user(pod, container, image: Stage):
    security = {**pod["spec"].get("securityContext", {}), **container.get("securityContext", {})}
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == image.user
    assert image.user != "0"


def assert_tmp_is_writable(pod_spec: dict[str, Any], container: dict[str, Any]) -> None:
    """Starlette's form parser spools multipart uploads over 1 MB to a temporary file, and with
    --workers > 1 the CLI makes the Prometheus multiprocess directory with tempfile.mkdtemp: both
    under /tmp, as neither the image nor these manifests set TMPDIR. A read-only root therefore
    needs a writable volume there."""
    assert "TMPDIR" not in env_of(container)
    if not container.get("securityContext", {}).get("readOnlyRootFilesystem"):
        return
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    assert "/tmp" in mounts and not mounts["/tmp"].get("readOnly", False), container["name"]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], container["name"]


def test_read_only_root_has_a_writable_tmp(pod, container):
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert_tmp_is_writable(pod["spec"], container)


def test_memory_request_covers_the_measured_resident_memory(container):
    """docs/benchmarks.md: RSS per worker with all models loaded, idle and after the load points."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    match = re.search(r"Service, all models loaded, RSS per worker \(MiB\): "
                      r"idle ([\d, ]+); after the run ([\d, ]+)\.", text)
    assert match, "the memory figures moved in docs/benchmarks.md"
    measured = max(int(v) for v in re.findall(r"\d+", match[1] + " " + match[2]))
    workers = Settings.model_fields["workers"].default
    assert "NEUROSERVE_WORKERS" not in env_of(container)
    resources = container["resources"]
    assert mebibytes(resources["requests"]["memory"]) >= measured * workers
    assert mebibytes(resources["limits"]["memory"]) >= mebibytes(resources["requests"]["memory"])


# ---- Shutdown: the grace period covers the preStop sleep and the service's drain ---------------


def shutdown_limits(container: dict[str, Any], image: Stage, monkeypatch,
                    tmp_path: Path) -> tuple[float, float]:
    """(drain grace + drain timeout, uvicorn's graceful-shutdown limit) as `neuroserve serve` sets
    them for this container's environment: the CLI runs with uvicorn.run replaced by a recorder."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NEUROSERVE_")}
    environ.update({**image.env, **env_of(container)}, NEUROSERVE_MODEL_REPOSITORY=str(tmp_path))
    monkeypatch.setattr(os, "environ", environ)  # the CLI exports settings; keep that here
    monkeypatch.setattr(cli.service_logging, "configure", lambda level: None)
    recorded: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda **config: recorded.update(config))
    settings = Settings()
    assert settings.workers == 1, "with several workers the supervisor's stop timeout applies too"
    assert cli.serve(settings) == 0
    return settings.drain_grace_s + settings.drain_timeout_s, recorded["timeout_graceful_shutdown"]


def test_grace_period_exceeds_pre_stop_sleep_plus_drain(pod, container, image: Stage, monkeypatch, tmp_path):
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    sleep_s = float(command[1])
    assert sleep_s > 0
    drain_s, graceful_s = shutdown_limits(container, image, monkeypatch, tmp_path)
    assert pod["spec"]["terminationGracePeriodSeconds"] > sleep_s + drain_s + graceful_s


# ---- Service, PodDisruptionBudget, HPA --------------------------------------------------------


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_selectors_match_the_pod_labels(deployment, pod):
    labels = pod["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    assert selects(one("Service")["spec"]["selector"], labels)
    assert selects(one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    for constraint in pod["spec"].get("topologySpreadConstraints", []):
        assert selects(constraint["labelSelector"]["matchLabels"], labels)


def test_service_targets_the_named_container_port(container):
    service = one("Service")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    http, grpc = service["spec"]["ports"]
    assert (http["name"], http["targetPort"]) == ("http", container["ports"][0]["name"])
    assert (grpc["name"], grpc["targetPort"]) == ("grpc", container["ports"][1]["name"])
    assert grpc["port"] == container["ports"][1]["containerPort"]


def test_hpa_scales_the_deployment_and_the_pdb_leaves_one_serving(deployment, container):
    hpa = one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], deployment["kind"], deployment["metadata"]["name"])
    low, high = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    assert low <= deployment["spec"]["replicas"] <= high
    pdb = one("PodDisruptionBudget")["spec"]
    assert low > pdb["maxUnavailable"] if "maxUnavailable" in pdb else low > pdb["minAvailable"]
    # CPU utilisation is relative to the request, so there must be one.
    (cpu,) = [m["resource"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert cpu["name"] == "cpu" and cpu["target"]["type"] == "Utilization"
    assert "cpu" in container["resources"]["requests"]


def exported_gauges() -> dict[str, MetricWrapperBase]:
    out = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                if family.type == "gauge":
                    out[family.name] = value
    return out


def hpa_pods_metric() -> str:
    hpa = one("HorizontalPodAutoscaler")
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods["target"]["type"] == "AverageValue"
    return pods["metric"]["name"]


def test_hpa_scales_on_the_queue_depth_gauge_of_service_metrics():
    assert exported_gauges().get(hpa_pods_metric()) is metrics.QUEUE_DEPTH


def test_adapter_rule_turns_the_gauge_into_the_hpas_pods_metric():
    config = yaml.safe_load(one("ConfigMap")["data"]["config.yaml"])
    (rule,) = config["rules"]
    series = re.fullmatch(r"(\w+)\{(.*)\}", rule["seriesQuery"])
    assert series, rule["seriesQuery"]
    name = series[1]
    assert exported_gauges().get(name) is metrics.QUEUE_DEPTH
    # Per pod: the rule maps the namespace and pod labels to those Kubernetes resources.
    overrides = rule["resources"]["overrides"]
    assert overrides["namespace"]["resource"] == "namespace"
    assert overrides["pod"]["resource"] in ("pod", "pods")
    assert {'namespace!=""', 'pod!=""'} <= {m.strip() for m in series[2].split(",")}
    # The exposed name: `as` applied to the `matches` groups (Go's $1 / ${1}), as the adapter does.
    match = re.fullmatch(rule["name"]["matches"].strip("^$"), name)
    assert match, f"{rule['name']['matches']} does not match {name}"
    default = "$1" if match.re.groups == 1 else "$0"  # the adapter's default for `as`
    exposed = re.sub(r"\$\{?(\d+)\}?", lambda m: match[int(m[1])], rule["name"].get("as", default))
    assert exposed == hpa_pods_metric()
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]


# ---- KServe ----------------------------------------------------------------------------------


def kserve_docs(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def runtimes() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in kserve_docs("ServingRuntime")}


def runtime_container(runtime: dict[str, Any]) -> dict[str, Any]:
    (kserve,) = runtime["spec"]["containers"]
    return kserve


def grpc_status(app: FastAPI, service: str = "") -> int:
    """What the service's grpc.health.v1 Check answers now (the servicer itself, no socket)."""
    from grpc_health.v1 import health_pb2

    from service.server.grpc.server import HealthServicer

    servicer = HealthServicer(app.state.service)
    return asyncio.run(servicer.Check(health_pb2.HealthCheckRequest(service=service), None)).status


def test_kserve_ships_an_http_and_a_grpc_runtime_each_with_an_inference_service():
    assert set(runtimes()) == {"neuroserve", KSERVE_GRPC_RUNTIME}
    used = {isvc["spec"]["predictor"]["model"]["runtime"] for isvc in kserve_docs("InferenceService")}
    assert used == set(runtimes())


def test_kserve_objects_have_kserves_api_versions_and_required_fields():
    for kind in KSERVE_KINDS:
        for doc in kserve_docs(kind):
            assert doc["apiVersion"] == KSERVE_KINDS[doc["kind"]]
            assert doc["metadata"]["name"]
    for runtime in runtimes().values():
        # ServingRuntimeSpec: containers is required; each supported format needs a name.
        assert runtime["spec"]["containers"]
        assert all(f["name"] for f in runtime["spec"]["supportedModelFormats"])
        assert set(runtime["spec"]["protocolVersions"]) <= KSERVE_PROTOCOLS
    for isvc in kserve_docs("InferenceService"):
        # InferenceServiceSpec: predictor is required; a model spec needs its modelFormat's name.
        model = isvc["spec"]["predictor"]["model"]
        assert model["modelFormat"]["name"]


@pytest.mark.parametrize("name", ["neuroserve", KSERVE_GRPC_RUNTIME])
def test_serving_runtime_serves_onnx_over_v2_from_kserves_model_mount(container, name):
    runtime = runtimes()[name]["spec"]
    assert "v2" in runtime["protocolVersions"]
    assert "onnx" in {f["name"] for f in runtime["supportedModelFormats"]}
    kserve = runtime_container(runtimes()[name])
    assert kserve["name"] == KSERVE_CONTAINER
    assert kserve["image"] == container["image"]
    assert "command" not in kserve
    args = serve_args(kserve["args"])
    assert args.model_repository == KSERVE_MODEL_MOUNT
    assert args.host == "0.0.0.0"
    assert int(args.port) == KSERVE_HTTP_PORT
    annotations = runtime.get("annotations", {})
    assert int(annotations["prometheus.kserve.io/port"]) == KSERVE_HTTP_PORT
    if name == KSERVE_GRPC_RUNTIME:
        return  # its one port is the gRPC port: the next test
    assert "grpc-v2" not in runtime["protocolVersions"]
    assert [p["containerPort"] for p in kserve["ports"]] == [KSERVE_HTTP_PORT]


def test_grpc_runtime_routes_h2c_to_the_services_grpc_port(container):
    """KServe's grpc-v2: Knative routes to the container's one port, over HTTP/2 when it is named
    h2c. That port must be where `neuroserve serve` listens for gRPC, as its CLI parses the args,
    and where the Deployment's gRPC port is."""
    runtime = runtimes()[KSERVE_GRPC_RUNTIME]["spec"]
    assert {"v2", "grpc-v2"} <= set(runtime["protocolVersions"])
    kserve = runtime_container(runtimes()[KSERVE_GRPC_RUNTIME])
    (port,) = kserve["ports"]
    assert port == {"name": "h2c", "containerPort": KSERVE_GRPC_PORT, "protocol": "TCP"}
    args = serve_args(kserve["args"])  # the service's own CLI parser: an unknown flag exits
    assert args.grpc_port is not None, "the gRPC port is spelled out in the args"
    assert int(args.grpc_port) == KSERVE_GRPC_PORT
    assert int(args.grpc_port) != int(args.port)
    # The same port as the Deployment's gRPC port and the setting's default.
    (deployment_grpc,) = [p for p in container["ports"] if p["name"] == "grpc"]
    assert deployment_grpc["containerPort"] == KSERVE_GRPC_PORT == Settings.model_fields["grpc_port"].default


@pytest.mark.parametrize("name", ["neuroserve", KSERVE_GRPC_RUNTIME])
def test_serving_runtime_container_is_a_valid_container_like_the_deployments(container, image, app, client,
                                                                             name):
    runtime = runtimes()[name]
    kserve = runtime_container(runtime)
    # The container is a core/v1 Container: validate it inside a Pod.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kserve"},
           "spec": {"containers": [kserve]}}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    (routed,) = [p["containerPort"] for p in kserve["ports"]]
    readiness, liveness = kserve["readinessProbe"], kserve["livenessProbe"]
    if name == KSERVE_GRPC_RUNTIME:
        # Knative checks probes against the routed port: both probe the gRPC port.
        assert readiness["grpc"]["port"] == routed == KSERVE_GRPC_PORT
        assert liveness["tcpSocket"]["port"] == routed
        check_grpc_readiness(app, readiness["grpc"].get("service", ""))
        # Liveness must not fail while the models load or the service drains: a listening port
        # (from start to exit), not the health service, which is NOT_SERVING then.
        assert "grpc" not in liveness and "httpGet" not in liveness
    else:
        check_probe_routes(app, client, readiness["httpGet"]["path"], liveness["httpGet"]["path"])
        for probe in (readiness, liveness):
            assert probe_port(probe, kserve) == routed == KSERVE_HTTP_PORT
    assert str(kserve["securityContext"]["runAsUser"]) == image.user
    assert kserve["securityContext"]["runAsNonRoot"] is True
    assert_tmp_is_writable(runtime["spec"], kserve)
    assert kserve["resources"] == container["resources"]
    env = env_of(kserve)
    assert env == {k: v for k, v in env_of(container).items() if k in env}
    for env_name in env:
        assert env_name.removeprefix("NEUROSERVE_").lower() in Settings.model_fields


def check_grpc_readiness(app: FastAPI, service: str) -> None:
    """The gRPC readiness probe's health service answers as /v2/health/ready does: NOT_SERVING
    while the models load and while the service drains."""
    from grpc_health.v1 import health_pb2

    from service.server.grpc.server import SERVICE_NAME

    assert service in ("", SERVICE_NAME)
    state = app.state.service
    assert not state.draining and not state.ready()
    assert grpc_status(app, service) == health_pb2.HealthCheckResponse.NOT_SERVING
    state.draining = True
    try:
        assert grpc_status(app, service) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        state.draining = False


def test_inference_services_use_a_runtime_with_a_format_and_protocol_it_supports():
    for isvc in kserve_docs("InferenceService"):
        model = isvc["spec"]["predictor"]["model"]
        runtime = runtimes()[model["runtime"]]
        formats = [(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]]
        assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
        ports = runtime_container(runtime)["ports"]
        if model["protocolVersion"].startswith("grpc"):
            assert [p.get("name") for p in ports] == ["h2c"], "grpc-v2 needs the h2c port"
        else:
            assert all(p.get("name") != "h2c" for p in ports)
        assert model["storageUri"]
        # The example names a model the repository ships (the gRPC one with a suffix).
        shipped = isvc["metadata"]["name"].removesuffix("-grpc")
        assert (ROOT / "models" / shipped / "config.toml").is_file()
    isvcs = kserve_docs("InferenceService")
    assert {isvc["spec"]["predictor"]["model"]["protocolVersion"] for isvc in isvcs} == {"v2", "grpc-v2"}
