"""What one release tells a person: a one-line headline (outcome, why, who serves now), the canary's summary, and
the texts the UIs show (the Prefect state name, the MLflow run note, the model version's description).

Pure: built from the release's status, reason, gate results and the canary's recorded analyses (``canary.jsonl``,
see :mod:`canaryflow.release.ramp_report`); no Prefect, no MLflow calls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from canaryflow.core.state import ReleaseStatus
from validation.results import GateResult

STATE_NAMES = {ReleaseStatus.RELEASED: "Released", ReleaseStatus.REJECTED: "Rejected",
               ReleaseStatus.ROLLED_BACK: "RolledBack", ReleaseStatus.FAILED: "Failed",
               ReleaseStatus.SUPERSEDED: "Superseded", ReleaseStatus.SKIPPED: "Skipped"}
"""The Prefect state name each release outcome ends in (flows/release.py)."""

FAILED_STATES = (ReleaseStatus.REJECTED, ReleaseStatus.ROLLED_BACK, ReleaseStatus.FAILED)
"""Outcomes whose flow run ends Failed (named, no traceback); the others end Completed."""

HEADLINE_REASON = 140  # characters of the reason a headline quotes; the full text is in the tables


def state_name(status: str) -> str:
    """``RolledBack`` for ``rolled_back``: the name of the Prefect state a release ends in."""
    return STATE_NAMES.get(status) or str(status).replace("_", " ").title().replace(" ", "")


def shorten(text: str, limit: int = HEADLINE_REASON) -> str:
    """``text`` on one line, cut at a word boundary near ``limit`` with an ellipsis (the tables keep it whole)."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    cut = flat[:limit].rsplit(" ", 1)[0] or flat[:limit]
    return cut.rstrip(" ;,:") + " …"


@dataclass(frozen=True)
class CanarySummary:
    """The ramp as a person reads it: every analysis's measured weight and action, the maximum weight reached, and
    the analysis that decided (its number, weight and the checks that failed or passed there)."""

    analyses: list[dict[str, Any]] = field(default_factory=list)

    @property
    def max_weight(self) -> float:
        return max((measured_weight(a) for a in self.analyses), default=0.0)

    @property
    def decisive(self) -> dict[str, Any] | None:
        """The last analysis that ended the ramp (promote / rollback), else the last one."""
        ends = [a for a in self.analyses if a.get("action") in ("promote", "rollback")]
        return ends[-1] if ends else (self.analyses[-1] if self.analyses else None)

    def path(self) -> str:
        """``10 → 25 → 50 → 100 %``: the weights the candidate was measured at, in order, repeats folded."""
        steps: list[str] = []
        for a in self.analyses:
            w = f"{measured_weight(a):g}"
            if not steps or steps[-1] != w:
                steps.append(w)
        return " → ".join(steps) + " %" if steps else "no analysis"

    def deciding_checks(self) -> list[dict[str, Any]]:
        """The decisive analysis's failed checks (a rollback), or all its checks (a promotion)."""
        d = self.decisive
        if d is None:
            return []
        checks = d.get("checks") or []
        failed = [c for c in checks if c.get("outcome") == "failed"]
        return failed or checks

    def line(self) -> str:
        """One line: analyses, path, decision and its numbers."""
        d = self.decisive
        if d is None:
            return "canary: no analysis ran"
        why = shorten("; ".join(d.get("reasons") or []), 160)
        return (f"canary: {len(self.analyses)} analyses ({self.path()}), max {self.max_weight:g} %; analysis "
                f"{d.get('iteration')} at {measured_weight(d):g} % decided {d.get('action')}: {why}")


def measured_weight(line: dict[str, Any]) -> float:
    """The candidate's share of traffic during the analysis's window (lines before this field: ``weight``)."""
    return float(line.get("measured_weight", line.get("weight", 0.0)) or 0.0)


@dataclass(frozen=True)
class Story:
    """Everything the headline and the descriptions say about one release."""

    model: str
    version: str
    status: str
    reason: str
    champion_before: str | None
    results: list[GateResult] = field(default_factory=list)
    canary: CanarySummary = field(default_factory=CanarySummary)
    variant: str = ""
    run_url: str = ""
    version_url: str = ""

    @property
    def serving(self) -> str | None:
        """Who serves after this release: the candidate when released, else the champion before."""
        return self.version if self.status == ReleaseStatus.RELEASED else self.champion_before

    def who_serves(self) -> str:
        if self.status == ReleaseStatus.RELEASED:
            return f"v{self.version} serves now" + (f" (replacing v{self.champion_before})"
                                                    if self.champion_before and self.champion_before != self.version
                                                    else "")
        if self.champion_before and self.champion_before != self.version:
            return f"v{self.champion_before} still serves"
        return "nothing serves this model" if not self.champion_before else f"v{self.version} serves"

    def headline(self) -> str:
        """e.g. ``v3 rolled back at 25 %; v2 still serves: agreement 0.81 < 0.95``: what happened and who serves
        first, since a UI cuts a long state message short (Prefect's Details tab shows about 70 characters)."""
        v, reason = f"v{self.version}", shorten(_strip_gate(self.reason))
        d = self.canary.decisive
        if self.status == ReleaseStatus.RELEASED:
            how = f"promoted by the canary ({self.canary.path()})" if d else reason
            return f"{v} released; {self.who_serves()}: {how}"
        if self.status == ReleaseStatus.ROLLED_BACK and d is not None:
            return f"{v} rolled back at {measured_weight(d):g} %; {self.who_serves()}: {self._why(d, reason)}"
        gate = self.failed_gate()
        by = f" by the {gate} gate" if gate and self.status == ReleaseStatus.REJECTED else ""
        return f"{v} {str(self.status).replace('_', ' ')}{by}; {self.who_serves()}: {reason}"

    @staticmethod
    def _why(decisive: dict[str, Any], fallback: str) -> str:
        """The deciding analysis's first reason without a repeated check name (``agreement: agreement 0.77 ...``
        -> ``agreement 0.77 ...``), and how many more checks failed with it."""
        reasons = [r for r in decisive.get("reasons") or [] if r]
        if not reasons:
            return fallback
        name, _, rest = reasons[0].partition(": ")
        first = rest if rest.startswith(name) else reasons[0]
        more = len([c for c in decisive.get("checks") or [] if c.get("outcome") == "failed"]) - 1
        return shorten(first) + (f" (and {more} more failed check{'s' if more > 1 else ''})" if more > 0 else "")

    def failed_gate(self) -> str | None:
        failed = [r for r in self.results if not r.passed]
        return failed[-1].gate if failed else None

    def gates_line(self) -> str:
        return ", ".join(f"{r.gate} {r.outcome.value}" for r in self.results) or "no gate ran"

    def facts(self) -> list[str]:
        """Markdown bullet lines shared by the run note and the version description."""
        lines = [f"- **outcome**: {self.status}: {shorten(self.reason, 600)}",
                 f"- **serves now**: {('v' + self.serving) if self.serving else 'nothing'}"
                 f" (champion before: {('v' + self.champion_before) if self.champion_before else 'none'})",
                 f"- **gates**: {self.gates_line()}"]
        if self.variant:
            lines.append(f"- **served variant**: {self.variant}")
        if self.canary.analyses:
            lines.append("- **canary**: " + self.canary.line().removeprefix("canary: "))
        return lines

    def run_note(self) -> str:
        """The MLflow release run's description (tag ``mlflow.note.content``, markdown)."""
        link = f"\n- **model version**: [{self.model} v{self.version}]({self.version_url})" if self.version_url else ""
        return f"**{self.headline()}**\n\n" + "\n".join(self.facts()) + link + "\n"

    def version_description(self) -> str:
        """The model version's description in the MLflow registry (markdown)."""
        link = f"\n- **release run**: [{self.run_url}]({self.run_url})" if self.run_url else ""
        return f"**{self.headline()}**\n\n" + "\n".join(self.facts()) + link + "\n"


def _strip_gate(reason: str) -> str:
    """``canary: agreement: ...`` -> ``agreement: ...`` (the headline names the outcome already)."""
    return re.sub(r"^canary: ", "", reason)


REPLACED_MARK = "_Update:_ "


def with_update(description: str, update: str) -> str:
    """A version description with ``update`` as its first line (a previous update line replaced): the release
    summary below stays, the top says what changed since (replaced as champion, rolled back by a person)."""
    body = description or ""
    if body.startswith(REPLACED_MARK):
        body = body.split("\n\n", 1)[1] if "\n\n" in body else ""
    return f"{REPLACED_MARK}{update}\n\n{body}".rstrip() + "\n"


def version_url(mlflow_url: str, model: str, version: str) -> str:
    """The model version's page in the MLflow UI."""
    return f"{mlflow_url.rstrip('/')}/#/models/{quote(model, safe='')}/versions/{quote(str(version), safe='')}"
