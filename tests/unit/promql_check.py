"""PromQL helpers for the monitoring tests (test_alert_rules.py, test_grafana_dashboard.py): promtool, a parse
check of bare expressions, and the metric names an expression selects."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
# Every series the rules and the dashboard may use: the serving metrics, TorchServe's GPU gauge, kube-state-metrics
# and the canary exporter's. A name outside it is a typo that promtool cannot see (it parses).
KNOWN_SERIES = {
    "ts_inference_requests_total", "canaryflow_request_latency_ms_bucket", "canaryflow_request_latency_ms_sum",
    "canaryflow_request_latency_ms_count", "canaryflow_request_errors_total", "canaryflow_predictions_total",
    "GPUMemoryUtilization", "kube_pod_container_status_restarts_total", "kube_pod_container_status_running",
    "kube_pod_status_ready", "kube_pod_init_container_status_waiting_reason",
    "kube_pod_init_container_status_restarts_total", "canaryflow_canary_weight", "canaryflow_canary_phase",
    "canaryflow_canary_last_change_timestamp_seconds",
}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def check_exprs(exprs: dict[str, str], workdir: Path) -> subprocess.CompletedProcess[str]:
    """``promtool check rules`` on ``exprs`` ({recording rule name: expr}) as recording rules: promtool has no
    bare expression checker, and a rule file's expressions are parsed by Prometheus' own parser."""
    rules = {"groups": [{"name": "exprs", "rules": [{"record": name, "expr": expr} for name, expr in exprs.items()]}]}
    path = workdir / "exprs.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return promtool("check", "rules", str(path))


def series_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects: identifiers outside strings, label matchers, ranges and grouping
    clauses that are neither functions nor keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = re.findall(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", text)
    return {name for name in names if name.lower() not in _KEYWORDS}
