"""The Grafana dashboard of serving_manifests/components/monitoring: it loads, its variables and panels are wired
to the ``${datasource}`` variable, it shows what issue 13 asks for, and every PromQL expression in it (panel
targets and the selectors of its ``label_values`` variables) parses, checked by Prometheus' own parser through
``promtool check rules`` (no server started)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from promql_check import KNOWN_SERIES, check_exprs, series_names

DASHBOARD = (Path(__file__).resolve().parents[2] / "serving_manifests" / "components" / "monitoring"
             / "grafana-dashboard.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's variables replaced by values of the same kind, so the text promtool sees is what Prometheus gets.
SUBSTITUTIONS = {"$__rate_interval": "1m", "$model": "iris", "$version": "1|2"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return dashboard()["panels"]


def concrete(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown variable left in {expr!r}"
    return expr


def all_exprs() -> dict[str, str]:
    """{a recording-rule name: expr} of every panel target and every label_values selector."""
    exprs = {f"dashboard:panel_{p['id']}_{t['refId']}": t["expr"] for p in panels() for t in p["targets"]}
    for var in dashboard()["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var.get("query", "")) if var["type"] == "query" else None
        if var["type"] == "query":
            assert match, f"variable {var['name']}: not a label_values() query"
            exprs[f"dashboard:variable_{var['name']}"] = match.group(1)
    return exprs


def test_it_loads_as_a_current_dashboard() -> None:
    board = dashboard()
    assert board["schemaVersion"] == 39
    assert board["uid"] == "canaryflow-serving" and board["title"]
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        assert panel["type"] == "timeseries" and panel["description"]


def test_the_datasource_is_a_variable_everything_uses() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "version"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == DATASOURCE
        assert variables[name]["query"].startswith("label_values(")
    assert variables["version"]["multi"] and variables["version"]["includeAll"]
    for panel in panels():
        assert panel["datasource"] == DATASOURCE
        assert panel["targets"] and all(t["datasource"] == DATASOURCE for t in panel["targets"])
    assert "${datasource}" not in json.dumps(variables["datasource"])  # no self-reference


def test_it_shows_what_the_issue_asks_for() -> None:
    by_metric = {}
    for panel in panels():
        for target in panel["targets"]:
            for name in series_names(target["expr"]):
                by_metric.setdefault(name, []).append((panel, target["expr"]))
    rps = by_metric["ts_inference_requests_total"]
    assert any(p["fieldConfig"]["defaults"]["unit"] == "reqps" for p, _ in rps)
    p95 = by_metric["canaryflow_request_latency_ms_bucket"]
    assert any(e.startswith("histogram_quantile(0.95,") and p["fieldConfig"]["defaults"]["unit"] == "ms"
               for p, e in p95)
    errors = by_metric["canaryflow_request_errors_total"]
    assert any("canaryflow_request_latency_ms_count" in e and p["fieldConfig"]["defaults"]["unit"] == "percentunit"
               for p, e in errors)
    (mix, expr), = by_metric["canaryflow_predictions_total"]
    assert mix["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "percent"
    assert "class" in expr and mix["repeat"] == "version"  # one stacked panel per version: mixes not summed
    (weight, _), = by_metric["canaryflow_canary_weight"]
    assert (weight["fieldConfig"]["defaults"]["min"], weight["fieldConfig"]["defaults"]["max"]) == (0, 100)
    for panel, expr in rps + p95 + errors:
        assert 'model_name="$model"' in expr and 'model_version=~"$version"' in expr, panel["title"]


def test_every_expression_parses(tmp_path: Path) -> None:
    exprs = {name: concrete(expr) for name, expr in all_exprs().items()}
    assert len(exprs) == sum(len(p["targets"]) for p in panels()) + 2
    done = check_exprs(exprs, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout


def test_the_parse_check_catches_a_broken_expression(tmp_path: Path) -> None:
    done = check_exprs({"dashboard:broken": "sum by (model_name (rate(ts_inference_requests_total[1m]))"}, tmp_path)
    assert done.returncode != 0
    assert "parse error" in (done.stdout + done.stderr)


@pytest.mark.parametrize("name", sorted(all_exprs()))
def test_every_expression_uses_known_series(name: str) -> None:
    used = series_names(all_exprs()[name])
    assert used and used <= KNOWN_SERIES, used - KNOWN_SERIES
