"""The Grafana provisioning files and the neuroserve dashboard are well-formed.

The dashboard JSON is loaded into the Dashboard model of the PyPI package grafana-foundation-sdk
(Grafana's own schema, generated from its CUE kinds; panel options and Prometheus queries decode into
their typed models) and serialised back: a key that the schema does not know is dropped on the way,
so every key of the file must survive the round trip with its value. The SDK does not check value
types, so a wrongly typed value would pass here. Whether the queries name real metrics is checked
against a live Prometheus in test_monitoring_live.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

from tests.deploy.support import DEPLOY, load_dashboard, panels

GRAFANA = DEPLOY / "grafana"


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title + refId, PromQL) of every query of every panel."""
    return [(f"{p['title']} {t['refId']}", t["expr"])
            for p in panels(dashboard) for t in p.get("targets", [])]


def lost_keys(original: Any, copy: Any, path: str = "$") -> list[str]:
    """Paths of keys or values of `original` that `copy` lacks or changed."""
    if isinstance(original, dict):
        if not isinstance(copy, dict):
            return [path]
        return [lost for k, v in original.items()
                for lost in ([f"{path}.{k}"] if k not in copy else lost_keys(v, copy[k], f"{path}.{k}"))]
    if isinstance(original, list):
        if not isinstance(copy, list) or len(copy) != len(original):
            return [path]
        return [lost for i, (a, b) in enumerate(zip(original, copy, strict=True))
                for lost in lost_keys(a, b, f"{path}[{i}]")]
    return [] if original == copy else [path]


def test_dashboard_survives_a_round_trip_through_grafanas_schema_model():
    register_default_plugins()
    original = load_dashboard()
    model = Dashboard.from_json(original)
    copy = json.loads(json.dumps(model, cls=JSONEncoder))
    assert lost_keys(original, copy) == []


def test_round_trip_check_notices_a_key_grafana_does_not_know():
    register_default_plugins()
    original = load_dashboard()
    original["panels"][1]["options"]["colourMode"] = "value"
    original["panels"][1]["targets"][0]["expresion"] = "up"
    copy = json.loads(json.dumps(Dashboard.from_json(original), cls=JSONEncoder))
    assert lost_keys(original, copy) == ["$.panels[1].targets[0].expresion", "$.panels[1].options.colourMode"]


def test_dashboard_has_datasource_and_model_variables():
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query"
    assert model["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert model["query"] == "label_values(neuroserve_model_info, model)"
    assert model["multi"] and model["includeAll"] and model["allValue"] == ".*"


def test_every_panel_queries_the_selected_datasource():
    for panel in panels(load_dashboard()):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == panel["datasource"], panel["title"]


def test_panel_ids_are_unique_and_panels_fit_the_grid():
    all_panels = panels(load_dashboard())
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    for p in all_panels:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]


def test_rate_windows_use_rate_interval_and_neuroserve_series_follow_the_model_variable():
    for where, expr in queries(load_dashboard()):
        windows = re.findall(r"\[([^\]]+)\]", expr)
        assert all(w == "$__rate_interval" for w in windows), f"{where}: {windows}"
        for selector in re.findall(r"neuroserve_\w+(\{[^}]*\})?", expr):
            assert 'model=~"$model"' in selector, f"{where}: {expr}"


@pytest.mark.parametrize("needle", [
    "neuroserve_requests_total", "neuroserve_request_duration_seconds_bucket",
    "neuroserve_queue_duration_seconds", "neuroserve_compute_duration_seconds",
    "neuroserve_batch_size_bucket",
    "neuroserve_padding_ratio", "neuroserve_queue_depth", "neuroserve_inflight_requests",
    "neuroserve_rejections_total", "neuroserve_predictions_total", "neuroserve_prediction_confidence_bucket",
    "neuroserve_input_image_mean_intensity", "neuroserve_input_text_tokens",
    "neuroserve_input_audio_duration_seconds", "neuroserve_input_audio_rms", "neuroserve_model_state",
    "neuroserve_model_info", "neuroserve_model_load_duration_seconds", "process_cpu_seconds_total",
    "process_resident_memory_bytes",
])
def test_dashboard_charts_every_metric_the_service_exposes(needle):
    assert any(needle in expr for _, expr in queries(load_dashboard()))


def test_datasource_provisioning_points_at_the_compose_prometheus():
    files = list((GRAFANA / "provisioning" / "datasources").glob("*.yml"))
    assert files
    sources = [s for f in files for s in yaml.safe_load(f.read_text())["datasources"]]
    prometheus = [s for s in sources if s["type"] == "prometheus"]
    assert [(s["type"], s["uid"], s["url"], s["isDefault"]) for s in prometheus] == [
        ("prometheus", "prometheus", "http://prometheus:9090", True)]


def test_latency_exemplars_link_to_the_trace_in_the_compose_tempo():
    files = list((GRAFANA / "provisioning" / "datasources").glob("*.yml"))
    sources = {s["uid"]: s for f in files for s in yaml.safe_load(f.read_text())["datasources"]}
    assert (sources["tempo"]["type"], sources["tempo"]["url"]) == ("tempo", "http://tempo:3200")
    links = sources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert links == [{"name": "trace_id", "datasourceUid": "tempo"}]  # the label the service sets
    latency = [p for p in panels(load_dashboard()) if any(
        "neuroserve_request_duration_seconds_bucket" in t.get("expr", "") for t in p.get("targets", []))]
    assert any(all(t.get("exemplar") for t in p["targets"]) for p in latency)


def test_dashboard_provider_reads_the_directory_compose_mounts():
    files = list((GRAFANA / "provisioning" / "dashboards").glob("*.yml"))
    assert files
    providers = [p for f in files for p in yaml.safe_load(f.read_text())["providers"]]
    assert [(p["type"], p["options"]["path"]) for p in providers] == [
        ("file", "/var/lib/grafana/dashboards/neuroserve")]
