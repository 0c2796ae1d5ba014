"""Typed results of release gates: the measured value, the threshold, and a reason that quotes both."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    INCONCLUSIVE = "inconclusive"  # too little evidence to judge
    ERROR = "error"  # the measurement itself could not be taken: not the model's fault


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict, e.g. ``GateResult("shape", FAILED, "output has 1 rows for 4 input rows")``."""

    gate: str
    outcome: Outcome
    reason: str
    measured: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASSED

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["outcome"] = self.outcome.value
        return out


def passed(gate: str, reason: str, **measured: Any) -> GateResult:
    return GateResult(gate, Outcome.PASSED, reason, measured)


def failed(gate: str, reason: str, **measured: Any) -> GateResult:
    return GateResult(gate, Outcome.FAILED, reason, measured)


def judged(gate: str, ok: bool, reason: str, measured: dict[str, Any] | None = None,
           thresholds: dict[str, Any] | None = None) -> GateResult:
    """PASSED or FAILED with both the measured values and the thresholds they were held to."""
    return GateResult(gate, Outcome.PASSED if ok else Outcome.FAILED, reason, measured or {}, thresholds or {})


def markdown_table(results: list[GateResult]) -> str:
    """The gates of one release as a markdown table (for the Prefect artifact)."""
    rows = ["| gate | outcome | reason |", "| --- | --- | --- |"]
    rows += [f"| {r.gate} | {r.outcome.value} | {r.reason.replace('|', '/')} |" for r in results]
    return "\n".join(rows)
