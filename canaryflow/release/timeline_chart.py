"""The canary timeline chart: the candidate's measured share of traffic, then one panel per check that can decide
the ramp (errors, latency, prediction drift, agreement, ...), each with its threshold drawn, every analysis marked
with its outcome and the analysis that decided highlighted across all panels.

Input: the lines of ``canary.jsonl`` (canaryflow/release/ramp_report.py). x is the analysis number (1-based, as in
the task names, the logs and the MLflow steps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from canaryflow.release.story import CanarySummary, measured_weight

NOT_DECIDING = frozenset({"traffic", "source"})  # hold the step (too few requests, unreadable source), never fail it
ORDER = ("errors", "p95", "latency", "latency_u", "prediction_drift", "shadow_agreement", "agreement",
         "segment_agreement", "probability_delta", "live_accuracy")
OUTCOME_STYLE = {"passed": ("tab:green", "o"), "failed": ("tab:red", "X"), "inconclusive": ("tab:gray", "s"),
                 "error": ("tab:orange", "D")}
ACTION_COLOR = {"advance": "tab:green", "bake": "tab:green", "promote": "tab:blue", "hold": "tab:gray",
                "rollback": "tab:red"}
LABELS = {"errors": "error ratio", "p95": "p95 ms", "latency": "median ms (bake)", "latency_u": "latency U p-value",
          "prediction_drift": "prediction drift", "shadow_agreement": "shadow agreement",
          "agreement": "agreement", "segment_agreement": "worst segment agreement",
          "probability_delta": "probability delta", "live_accuracy": "live accuracy"}
MAX_PANELS = 8


def deciding_checks(lines: list[dict[str, Any]]) -> list[str]:
    """The check names that can decide and were measured at least once, in a fixed reading order."""
    seen: list[str] = []
    for line in lines:
        for c in line.get("checks") or []:
            if c["name"] not in NOT_DECIDING and c["name"] not in seen and c.get("measured") is not None \
                    and c.get("outcome") in ("passed", "failed"):  # judged at least once
                seen.append(c["name"])
    ranked = sorted(seen, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), seen.index(n)))
    return ranked[:MAX_PANELS]


def series(lines: list[dict[str, Any]], name: str) -> list[tuple[int, float | None, float | None, str]]:
    """(analysis, measured, threshold, outcome) of one check wherever it ran."""
    out = []
    for line in lines:
        for c in line.get("checks") or []:
            if c["name"] == name:
                out.append((int(line["iteration"]), c.get("measured"), c.get("threshold"), c["outcome"]))
    return out


def draw(lines: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Write the chart of ``lines`` to ``path`` (PNG); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = deciding_checks(lines)
    fig, axes = plt.subplots(1 + len(names), 1, figsize=(9, 2.0 + 1.7 * (1 + len(names))), sharex=True,
                             squeeze=False)
    axes = axes[:, 0]
    xs = [int(x["iteration"]) for x in lines]
    decisive = CanarySummary(lines).decisive
    _weights(axes[0], lines)
    for ax, name in zip(axes[1:], names, strict=True):
        _check(ax, name, series(lines, name))
    for ax in axes:
        if decisive is not None:
            ax.axvspan(int(decisive["iteration"]) - 0.4, int(decisive["iteration"]) + 0.4, color=ACTION_COLOR.get(
                decisive.get("action"), "tab:gray"), alpha=0.12, zorder=0)
        ax.grid(alpha=0.3)
    axes[-1].set_xticks(xs, [f"{x['iteration']}\n{measured_weight(x):g}%" for x in lines])
    axes[-1].set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    axes[0].set_title("markers: green passed / advanced, red X failed / rolled back, grey inconclusive / held; "
                      "dashed: threshold; shaded: the deciding analysis", fontsize=7, loc="left")
    axes[-1].set_xlabel("analysis (candidate share measured)")
    last = decisive or lines[-1]
    fig.suptitle(f"{title}: {last.get('action')} at analysis {last.get('iteration')} "
                 f"({measured_weight(last):g}% measured)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _weights(ax: Any, lines: list[dict[str, Any]]) -> None:
    xs = [int(x["iteration"]) for x in lines]
    ax.plot(xs, [measured_weight(x) for x in lines], "-", color="tab:purple", zorder=1)
    for x in lines:
        ax.scatter([int(x["iteration"])], [measured_weight(x)], color=ACTION_COLOR.get(x.get("action"), "tab:gray"),
                   s=45, zorder=2)
        ax.annotate(x.get("action", ""), (int(x["iteration"]), measured_weight(x)), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=7)
    ax.set_ylabel("candidate %")
    ax.set_ylim(-5, 115)


def _check(ax: Any, name: str, points: list[tuple[int, float | None, float | None, str]]) -> None:
    # only a judged check's numbers are on the check's scale: an inconclusive one measures its sample size
    judged = [(x, m, t, o) for x, m, t, o in points if m is not None and o in ("passed", "failed")]
    if judged:
        ax.plot([x for x, *_ in judged], [m for _, m, _, _ in judged], "-", color="tab:blue", alpha=0.6, zorder=1)
    for i, (x, _, t, _) in enumerate(judged):  # per analysis: some bars move with the champion (p95)
        if t is not None:
            ax.hlines(t, x - 0.45, x + 0.45, linestyles="--", colors="black", linewidth=1,
                      label="threshold" if i == 0 else None)
    for x, m, _, outcome in judged:
        color, marker = OUTCOME_STYLE[outcome]
        ax.scatter([x], [m], color=color, marker=marker, s=50, zorder=3)
    for x, _, _, outcome in points:
        if outcome not in ("passed", "failed"):  # held for evidence: a grey mark on the axis, no number
            color, marker = OUTCOME_STYLE.get(outcome, ("tab:gray", "s"))
            ax.scatter([x], [0.04], color=color, marker=marker, s=30, zorder=3, transform=ax.get_xaxis_transform())
    ax.set_ylabel(LABELS.get(name, name), fontsize=8)
    fails = sum(1 for *_, o in points if o == "failed")
    ax.set_title(f"{name}: {fails} failed of {len(points)}", fontsize=8, loc="left")
