"""The Prometheus alert rules of serving_manifests/components/monitoring: checked with ``promtool check rules``,
unit-tested with ``promtool test rules`` (the test files under its tests/), every alert covered firing and not
firing, and the tests shown to bite: a rules file with a loosened threshold fails them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from promql_check import KNOWN_SERIES, promtool, series_names

COMPONENT = Path(__file__).resolve().parents[2] / "serving_manifests" / "components" / "monitoring"
RULES = COMPONENT / "canaryflow-rules.yaml"
TESTS = sorted((COMPONENT / "tests").glob("*.yaml"))
def alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
            if "alert" in rule]


def test_promtool_checks_the_rules() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    assert TESTS, "no promtool test files"
    done = promtool("test", "rules", *map(str, TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(TESTS)


def test_the_issue_numbers_are_the_thresholds() -> None:
    exprs = {rule["alert"]: " ".join(rule["expr"].split()) for rule in alerts()}
    assert exprs["CanaryflowLatencyP95High"].startswith("histogram_quantile(0.95,")
    assert exprs["CanaryflowLatencyP95High"].endswith(") > 500")
    assert exprs["CanaryflowErrorRatioHigh"].endswith("> 0.05")
    assert exprs["CanaryflowGpuMemoryHigh"] == "GPUMemoryUtilization > 90"
    assert "> 1800" in exprs["CanaryflowCanaryStuck"]
    assert {rule["alert"]: rule.get("for") for rule in alerts()}["CanaryflowLatencyP95High"] == "5m"


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_every_alert_is_labelled_annotated_and_uses_known_series(rule: dict) -> None:
    assert rule["labels"]["severity"] in {"warning", "critical"}
    assert {"summary", "description", "runbook"} <= set(rule["annotations"])
    used = series_names(rule["expr"])
    assert used and used <= KNOWN_SERIES, used - KNOWN_SERIES


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    fired, quiet = set(), set()
    for path in TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - fired == set(), "never seen firing"
    assert names - quiet == set(), "never seen not firing"


@pytest.mark.parametrize(("old", "new"), [
    (") > 500", ") > 5000"),  # p95
    ("> 0.05", "> 0.5"),  # error ratio
    ("GPUMemoryUtilization > 90", "GPUMemoryUtilization > 99"),
    ("[15m]) > 0", "[15m]) > 5"),  # pod restarts
    ("for: 10m", "for: 30m"),  # model not loaded
    ("> 1800", "> 3600"),  # canary stuck
])
def test_a_loosened_threshold_fails_the_unit_tests(tmp_path: Path, old: str, new: str) -> None:
    text = RULES.read_text()
    assert text.count(old) == 1, old
    (tmp_path / RULES.name).write_text(text.replace(old, new))
    shutil.copytree(COMPONENT / "tests", tmp_path / "tests")
    done = promtool("test", "rules", *(f"tests/{p.name}" for p in TESTS), cwd=tmp_path)
    assert done.returncode != 0, f"the tests still pass with {new!r}"
    assert "FAILED" in done.stdout + done.stderr

