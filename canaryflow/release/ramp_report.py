"""The canary's record: each analysis as MLflow metrics (step = analysis number) and a line of ``canary.jsonl``,
the checks table and the timeline chart of the Prefect artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from canaryflow.release.steps import ReleaseState
from canaryflow.services import Services
from deployments import canary as ctl
from deployments.metrics import Window


def record(svc: Services, st: ReleaseState, d: ctl.Decision, window: Window | None, now: float,
           measured_weight: float | None = None) -> None:
    """One analysis -> MLflow metrics (step = analysis number) and a line of ``canary.jsonl``.

    ``measured_weight``: the candidate's share while the window was measured (the status before the decision);
    the weight the decision set is ``next_weight``. Both default to the decision's when the caller has no other."""
    s = d.status
    weight = s.weight if measured_weight is None else measured_weight
    line: dict[str, Any] = {"t": now, "iteration": s.iterations, "action": d.action.value, "weight": weight,
                            "measured_weight": weight, "next_weight": s.weight, "phase": s.phase.value,
                            "reasons": d.reasons, "checks": [c.to_dict() for c in d.checks]}
    metrics = {"canary.weight": weight, "canary.failed_checks": s.failed_checks}
    if window is not None:
        for role, version in (("candidate", s.candidate), ("champion", s.champion)):
            v = window.get(version)
            stats = {"requests": v.requests, "error_ratio": v.error_ratio, "p50_ms": v.p50_ms, "p95_ms": v.p95_ms,
                     "p99_ms": v.p99_ms, "labelled": v.labelled, "accuracy": v.accuracy}
            line[role] = stats
            metrics.update({f"canary.{role}.{k}": x for k, x in stats.items() if x is not None})
    for c in d.checks:
        if c.measured is not None:
            metrics[f"canary.check.{c.name}"] = c.measured
    svc.registry.log_step(st.run_id, metrics, step=s.iterations)
    path = timeline_file(st)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(line, default=str) + "\n")


def decision_line(d: ctl.Decision, measured_weight: float) -> str:
    """``canary analysis 3 at 25%: rollback: agreement: ...``: one analysis in one log line (1-based number, the
    weight it measured, the action, the reasons)."""
    return (f"canary analysis {d.status.iterations} at {measured_weight:g}%: {d.action.value}: "
            + "; ".join(d.reasons))


def timeline_file(st: ReleaseState) -> Path:
    return st.workdir / "canary.jsonl"


def read_timeline(st: ReleaseState) -> list[dict[str, Any]]:
    path = timeline_file(st)
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def checks_table(st: ReleaseState) -> list[dict[str, Any]]:
    """Every check of every analysis, one row each, in order: for the Prefect table artifact. ``weight`` is the
    candidate's share the analysis measured; the decision row's reason says where the ramp went next."""
    rows = []
    for line in read_timeline(st):
        weight = line.get("measured_weight", line["weight"])
        for c in line["checks"]:
            rows.append({"analysis": line["iteration"], "weight": weight, "check": c["name"],
                         "outcome": c["outcome"], "measured": _fmt(c["measured"]), "threshold": _fmt(c["threshold"]),
                         "reason": c["reason"]})
        rows.append({"analysis": line["iteration"], "weight": weight, "check": "decision",
                     "outcome": line["action"], "measured": "", "threshold": "", "reason": "; ".join(line["reasons"])})
    return rows


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"


def write_timeline_png(st: ReleaseState, path: Path) -> Path | None:
    """The ramp as a chart (canaryflow/release/timeline_chart.py); None when no analysis ran."""
    from canaryflow.release.timeline_chart import draw

    lines = read_timeline(st)
    if not lines:
        return None
    return draw(lines, f"canary of {st.model} v{st.version}", path)
