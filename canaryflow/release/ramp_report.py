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


def record(svc: Services, st: ReleaseState, d: ctl.Decision, window: Window | None, now: float) -> None:
    """One analysis -> MLflow metrics (step = analysis number) and a line of ``canary.jsonl``."""
    s = d.status
    line: dict[str, Any] = {"t": now, "iteration": s.iterations, "action": d.action.value, "weight": s.weight,
                            "phase": s.phase.value, "reasons": d.reasons, "checks": [c.to_dict() for c in d.checks]}
    metrics = {"canary.weight": s.weight, "canary.failed_checks": s.failed_checks}
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


def timeline_file(st: ReleaseState) -> Path:
    return st.workdir / "canary.jsonl"


def read_timeline(st: ReleaseState) -> list[dict[str, Any]]:
    path = timeline_file(st)
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def checks_table(st: ReleaseState) -> list[dict[str, Any]]:
    """Every check of every analysis, one row each: for the Prefect table artifact."""
    rows = []
    for line in read_timeline(st):
        for c in line["checks"]:
            rows.append({"analysis": line["iteration"], "weight": line["weight"], "check": c["name"],
                         "outcome": c["outcome"], "measured": _fmt(c["measured"]), "threshold": _fmt(c["threshold"]),
                         "reason": c["reason"]})
        rows.append({"analysis": line["iteration"], "weight": line["weight"], "check": "decision",
                     "outcome": line["action"], "measured": "", "threshold": "", "reason": "; ".join(line["reasons"])})
    return rows


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"


def write_timeline_png(st: ReleaseState, path: Path) -> Path | None:
    """Weight, p95 and error ratio per version over the ramp; None when no analysis ran."""
    lines = read_timeline(st)
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = lines[0]["t"]
    ts = [x["t"] - t0 for x in lines]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].step(ts, [x["weight"] for x in lines], where="post", color="tab:purple")
    axes[0].set_ylabel("candidate traffic %")
    for role, color in (("champion", "tab:blue"), ("candidate", "tab:orange")):
        axes[1].plot(ts, [(x.get(role) or {}).get("p95_ms") for x in lines], "o-", color=color, label=role)
        axes[2].plot(ts, [(x.get(role) or {}).get("error_ratio") for x in lines], "o-", color=color, label=role)
    axes[1].set_ylabel("p95 ms")
    axes[2].set_ylabel("error ratio")
    axes[2].set_xlabel("seconds since first analysis")
    axes[1].legend()
    last = lines[-1]
    fig.suptitle(f"canary of {st.model} v{st.version}: {last['action']} at {last['weight']:g}%")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
