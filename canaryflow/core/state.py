"""The release-state model: every status a model version can have and every ``canaryflow.*`` tag key, in one
place. Tags are how canaryflow persists release state in the MLflow registry (the control plane); everything
else reads and writes them through these names.

Statuses are a :class:`~enum.StrEnum`: a member equals, formats and serializes as its tag value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class ReleaseStatus(StrEnum):
    """``canaryflow.status`` of a model version."""

    RELEASING = "releasing"  # gates, optimization, packaging, staging
    CANARY = "canary"  # on a share of live traffic (or watched after 100%), the ramp's state in Tag.CANARY
    RELEASED = "released"  # serving as champion (or it was, before a newer one replaced it)
    REJECTED = "rejected"  # a gate or the canary judged the model and it failed
    ROLLED_BACK = "rolled_back"  # taken off live traffic by the canary, the bake watch or a person
    FAILED = "failed"  # the release could not judge the model (a gate that errored or was inconclusive, a crash)
    SUPERSEDED = "superseded"  # another run owns this version's release now; this one touched nothing
    SKIPPED = "skipped"  # reconcile will not release it: older than the champion (a person can ask for it)

    @property
    def final(self) -> bool:
        """A release that ended (nothing more happens to the version by itself)."""
        return self not in UNFINISHED


UNFINISHED = (ReleaseStatus.RELEASING, ReleaseStatus.CANARY)
FINAL = (ReleaseStatus.RELEASED, ReleaseStatus.REJECTED, ReleaseStatus.ROLLED_BACK, ReleaseStatus.FAILED)


class Tag:
    """Every ``canaryflow.*`` tag key canaryflow reads or writes."""

    # model version: written by canaryflow
    STATUS = "canaryflow.status"
    REASON = "canaryflow.reason"
    RELEASE_RUN = "canaryflow.release_run"  # the MLflow run of the release (its .mar, reports, metrics)
    CANARY = "canaryflow.canary"  # the ramp's persisted state (CanaryStatus JSON, with its generation)
    HEARTBEAT = "canaryflow.heartbeat"  # the release flow's liveness while it ramps
    GATE_PREFIX = "canaryflow.gate."  # + gate name: "<outcome>: <reason>"
    ROLLBACK_BY = "canaryflow.rollback_by"
    RESTORED = "canaryflow.restored"
    SEAL = "canaryflow.seal"  # HMAC: the pipeline made this version champion with this .mar (canaryflow.core.seal)
    # model version: written by the data scientist
    CHAOS = "canaryflow.chaos"  # fault injection (honoured only where canary.allow_chaos is on)
    OUTPUT = "canaryflow.output"  # "logits" or "probabilities", when detection should not guess
    CLASS_LABELS = "canaryflow.class_labels"
    # registered model
    POLICY = "canaryflow.policy"  # per-model release policy (JSON)
    LAST_ROLLBACK = "canaryflow.last_rollback"
    CHAMPION_SEAL = "canaryflow.champion_seal"  # the champion the pipeline set, sealed (JSON; "" once removed)
    # runs
    MODEL = "canaryflow.model"
    VERSION = "canaryflow.version"
    KIND = "canaryflow.kind"
    BATCH_RUN_KEY = "canaryflow.batch_run_key"
    BATCH_OUTPUT = "canaryflow.batch_output"

    @staticmethod
    def gate(name: str) -> str:
        return Tag.GATE_PREFIX + name


@dataclass(frozen=True)
class Route:
    """What the router serves for one model: ``stable`` alone, or with a ``canary`` on ``weight`` percent of the
    unpinned traffic (``shadow``: stable answers everything and the canary gets copies)."""

    stable: str
    canary: str | None = None
    weight: float = 0.0
    shadow: bool = False

    @classmethod
    def of(cls, data: Mapping[str, Any] | None) -> Route | None:
        """From the router's stored form (``{"stable": .., "canary": .., "weight": .., "shadow": ..}``)."""
        if not data or data.get("stable") is None:
            return None
        canary = data.get("canary")
        return cls(str(data["stable"]), str(canary) if canary else None,
                   float(data.get("weight") or 0.0) if canary else 0.0, bool(data.get("shadow")) if canary else False)

    @property
    def versions(self) -> tuple[str, ...]:
        """The versions this route sends traffic (or shadow copies) to, stable first."""
        return (self.stable, self.canary) if self.canary else (self.stable,)

    def describe(self) -> str:
        if self.canary:
            return f"v{self.stable} + v{self.canary} at {'shadow' if self.shadow else f'{self.weight:g}%'}"
        return f"v{self.stable} alone"
