"""The Prometheus configuration and alert rules are valid and the alerts behave as their unit tests say
(checked by Debian's `promtool`)."""

from __future__ import annotations

import yaml

from tests.deploy.support import DEPLOY, run, tool

PROMETHEUS = DEPLOY / "prometheus"


def test_promtool_check_config_accepts_prometheus_yml():
    result = run([tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules_accepts_alerts_yml():
    result = run([tool("promtool"), "check", "rules", str(PROMETHEUS / "alerts.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests_pass():
    result = run([tool("promtool"), "test", "rules", str(PROMETHEUS / "alerts_test.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_service_as_job_neuroserve_and_loads_the_alerts():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["neuroserve"].get("metrics_path", "/metrics") == "/metrics"
    assert jobs["neuroserve"]["static_configs"][0]["targets"] == ["neuroserve:8000"]
    assert config["rule_files"] == ["alerts.yml"]


def test_every_alert_has_a_unit_test_that_expects_it_to_fire():
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r}
    assert alerts == {
        "NeuroserveDown", "NeuroserveTargetMissing", "NeuroserveHighErrorRatio", "NeuroserveHighP99Latency",
        "NeuroserveQueueSaturated", "NeuroserveLoadShedding", "NeuroserveModelNotReady",
    }
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert fired == alerts
    assert quiet == alerts, "each alert also needs a case where it must stay quiet"


def test_every_alert_has_a_severity_and_a_summary():
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
            assert rule["annotations"]["description"], rule["alert"]
