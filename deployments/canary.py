"""The canary controller: a pure step function from (status, measurements, policy) to a decision.

Like Argo Rollouts' analysis and Flagger's phases, but the analysis looks at what the model predicts, not only at
errors and latency. At each analysis the candidate is compared with the champion on the same live-traffic window
(since the step began):

- ``errors``: the candidate's share of 5xx answers and timeouts;
- ``p95``: the candidate's tail against a bar from the champion's p95 (ratio + slack, capped): the share of
  requests over the bar, candidate vs champion, by Fisher's exact test (a busy machine slows both);
- ``latency_u``: a one-sided Mann-Whitney U test, candidate slower than champion at confidence 1 - alpha, and a
  median shift worth caring about (a bare threshold cannot tell noise from a regression; Kayenta does the same);
- ``prediction_drift``: PSI of the predicted classes (or Wasserstein distance of the top scores) between versions;
- ``shadow_agreement``: in shadow mode, the share of identical requests answered alike;
- ``agreement``, ``segment_agreement``, ``probability_delta``: recent live rows replayed to both versions out of
  band and their answers compared pairwise, overall and per input segment (deployments/pairwise.py);
- ``live_accuracy``: where labels came back for the window's answers (the bridge's feedback endpoint), the
  candidate's accuracy against the champion's, by Fisher's exact test and a drop worth caring about.

Each check ends passed, failed, inconclusive (too few requests) or error. Inconclusive holds the step, up to a
deadline; a source error (the access log could not be read) is counted apart from model failures. The status is
plain data, persisted by the caller (a JSON tag on the candidate version), so a re-run resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import TYPE_CHECKING

from canaryflow.core.settings import CanarySettings
from deployments import canary_checks as cc
from deployments import pairwise
from deployments.canary_checks import Check
from deployments.pairwise import PairSample
from validation.results import Outcome

if TYPE_CHECKING:
    from deployments.metrics import Window


class Phase(StrEnum):
    SHADOW = "shadow"  # mirrored traffic only; the champion answers everything
    PROGRESSING = "progressing"  # a share of live traffic on the candidate
    BAKING = "baking"  # promoted: all traffic on the candidate, the previous champion kept and still compared
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


class Action(StrEnum):
    HOLD = "hold"
    ADVANCE = "advance"
    BAKE = "bake"  # promote now (aliases, route, default) and keep watching for ``bake_s``
    PROMOTE = "promote"
    ROLLBACK = "rollback"


TERMINAL = (Phase.PROMOTED, Phase.ROLLED_BACK)


@dataclass(frozen=True)
class CanaryStatus:
    """Where a ramp stands; everything needed to resume it (JSON in the candidate's ``canaryflow.canary`` tag)."""

    champion: str
    candidate: str
    phase: Phase
    step: int  # index into policy.steps; -1 while in shadow
    weight: float  # percent of live traffic on the candidate (0 in shadow)
    started_at: float
    step_started_at: float
    iterations: int = 0
    failed_checks: int = 0
    source_errors: int = 0  # in a row; a readable window resets it
    reasons: list[str] = field(default_factory=list)
    generation: int = 0  # of the persisted status this one was read from; each save increments it (CAS)
    heartbeat_at: float = 0.0  # the release flow's last analysis (epoch s); reconcile's liveness signal
    previous: str | None = None  # the ``previous`` alias before the bake's promotion moved it (restored on undo)

    @property
    def shadow(self) -> bool:
        return self.phase is Phase.SHADOW

    @property
    def done(self) -> bool:
        return self.phase in TERMINAL

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CanaryStatus:
        data = json.loads(text)
        data["phase"] = Phase(data["phase"])
        known = {f.name for f in fields(cls)}  # older JSON lacks newer fields (defaults); newer keys are ignored
        return cls(**{k: v for k, v in data.items() if k in known})


def start(champion: str, candidate: str, policy: CanarySettings, now: float) -> CanaryStatus:
    """The first status of a ramp: shadow when the policy asks for it, else the first step."""
    if policy.shadow:
        return CanaryStatus(champion, candidate, Phase.SHADOW, -1, 0.0, now, now)
    return CanaryStatus(champion, candidate, Phase.PROGRESSING, 0, float(policy.steps[0]), now, now)


@dataclass(frozen=True)
class Measurements:
    """What the metrics source returned for the window, or why it could not."""

    window: Window | None
    now: float
    source_error: str | None = None
    pairs: PairSample | None = None  # replayed rows answered by both versions (None: replay off)


@dataclass(frozen=True)
class Decision:
    action: Action
    status: CanaryStatus  # the status after the decision (apply it, then persist it)
    checks: list[Check]
    reasons: list[str]


def decide(status: CanaryStatus, m: Measurements, policy: CanarySettings) -> Decision:
    """Hold, advance, promote or roll back, with the reasons; pure (no clock, no I/O)."""
    if status.done:
        return Decision(Action.HOLD, status, [], [f"ramp already {status.phase.value}"])
    s = replace(status, iterations=status.iterations + 1)
    if m.now - s.started_at > policy.deadline_s:
        return _rollback(s, [], [f"ramp deadline: {m.now - s.started_at:.0f} s > {policy.deadline_s:.0f} s"])
    if m.window is None or m.source_error:
        s = replace(s, source_errors=s.source_errors + 1)
        why = f"metrics source error {s.source_errors}/{policy.max_source_errors}: {m.source_error}"
        check = Check("source", Outcome.ERROR, None, None, why)
        if s.source_errors >= policy.max_source_errors:
            return _rollback(s, [check], [why])
        return Decision(Action.HOLD, replace(s, reasons=[why]), [check], [why])
    checks = analyse(m.window, s, policy)
    if m.pairs is not None:
        checks += [Check(*c) for c in pairwise.checks(m.pairs, policy)]
    failed = [c for c in checks if c.outcome is Outcome.FAILED]
    waiting = [c for c in checks if c.outcome is Outcome.INCONCLUSIVE]
    broken = [c for c in checks if c.outcome is Outcome.ERROR]
    if broken and not failed:
        # a measurement that could not be taken is not evidence either way: hold, counted apart
        s = replace(s, source_errors=s.source_errors + 1)
        why = (f"measurement error {s.source_errors}/{policy.max_source_errors}: "
               + "; ".join(f"{c.name}: {c.reason}" for c in broken))
        if s.source_errors >= policy.max_source_errors:
            return _rollback(s, checks, [why])
        return Decision(Action.HOLD, replace(s, reasons=[why]), checks, [why])
    s = replace(s, source_errors=0)
    if failed:
        s = replace(s, failed_checks=s.failed_checks + 1)
        reasons = [f"{c.name}: {c.reason}" for c in failed]
        if s.failed_checks >= policy.max_failed_checks:
            return _rollback(s, checks, reasons)
        note = f"failed analysis {s.failed_checks}/{policy.max_failed_checks}; holding at {s.weight:g}%"
        return Decision(Action.HOLD, replace(s, reasons=[*reasons, note]), checks, [*reasons, note])
    if waiting:
        reasons = [f"{c.name}: {c.reason}" for c in waiting]
        if s.phase is Phase.BAKING and m.now - s.step_started_at >= policy.bake_s:
            why = [*reasons, f"bake of {policy.bake_s:g} s ended without enough evidence either way; release done"]
            return Decision(Action.PROMOTE, replace(s, phase=Phase.PROMOTED, reasons=why), checks, why)
        if m.now - s.step_started_at > policy.step_deadline_s:
            why = f"step deadline: still inconclusive after {m.now - s.step_started_at:.0f} s"
            return _rollback(s, checks, [*reasons, why])
        return Decision(Action.HOLD, replace(s, reasons=reasons), checks, reasons)
    return _next_step(s, checks, policy, m.now)


def _next_step(s: CanaryStatus, checks: list[Check], policy: CanarySettings, now: float) -> Decision:
    nxt = s.step + 1
    passed = f"every check passed at {'shadow' if s.shadow else f'{s.weight:g}%'} ({cc.summary(checks)})"
    if s.phase is Phase.BAKING:
        if now - s.step_started_at < policy.bake_s:
            why = f"baking: every check passed ({cc.summary(checks)}); watched {now - s.step_started_at:.0f} of " \
                  f"{policy.bake_s:g} s"
            return Decision(Action.HOLD, replace(s, reasons=[why]), checks, [why])
        reasons = [f"bake of {policy.bake_s:g} s passed ({cc.summary(checks)}); release done"]
        return Decision(Action.PROMOTE, replace(s, phase=Phase.PROMOTED, reasons=reasons), checks, reasons)
    if (nxt >= len(policy.steps) or policy.steps[nxt] >= 100) and policy.bake_s > 0:
        reasons = [f"{passed}; promoting, then watching for {policy.bake_s:g} s"]
        s = replace(s, phase=Phase.BAKING, weight=100.0, step_started_at=now, reasons=reasons)
        return Decision(Action.BAKE, s, checks, reasons)
    if nxt >= len(policy.steps) or policy.steps[nxt] >= 100:
        reasons = [f"{passed}; promoting"]
        return Decision(Action.PROMOTE, replace(s, phase=Phase.PROMOTED, weight=100.0, reasons=reasons), checks,
                        reasons)
    weight = float(policy.steps[nxt])
    reasons = [f"{passed}; advancing to {weight:g}%"]
    s = replace(s, phase=Phase.PROGRESSING, step=nxt, weight=weight, step_started_at=now, reasons=reasons)
    return Decision(Action.ADVANCE, s, checks, reasons)


def veto(decision: Decision, reason: str) -> Decision:
    """A promotion (or the bake that starts one) that must not happen, whatever the checks said: the ramp ends
    rolled back with ``reason`` after the checks' own."""
    return _rollback(decision.status, decision.checks, [*decision.reasons, reason])


def _rollback(s: CanaryStatus, checks: list[Check], reasons: list[str]) -> Decision:
    return Decision(Action.ROLLBACK, replace(s, phase=Phase.ROLLED_BACK, weight=0.0, reasons=reasons), checks,
                    reasons)


# -- the checks ---------------------------------------------------------------------------------------------------
def analyse(w: Window, s: CanaryStatus, p: CanarySettings) -> list[Check]:
    """Every check of one analysis on one window."""
    cand, champ = w.get(s.candidate), w.get(s.champion)
    if s.phase is Phase.BAKING:
        return cc.bake_checks(cand, p)
    if s.shadow:
        # the candidate's mirrored answers stand in for its own: same requests as the champion's
        cand = replace(cand, requests=cand.shadow_requests, errors=cand.shadow_errors,
                       latencies_ms=cand.shadow_latencies_ms, labelled=cand.shadow_labelled,
                       correct=cand.shadow_correct)
    need = p.min_requests
    if cand.requests < need or champ.requests < need:
        what = "mirrored requests" if s.shadow else "requests"
        why = (f"too few {what} to judge: candidate {cand.requests}, champion {champ.requests}, "
               f"need {need} each")
        return [Check("traffic", Outcome.INCONCLUSIVE, float(cand.requests), float(need), why)]
    checks = [cc.errors(cand, p), cc.p95(cand, champ, p), cc.latency_u(cand, champ, p), cc.drift(cand, champ, p)]
    if s.shadow or w.shadow_pairs:
        checks.append(cc.shadow_agreement(w, p))
    # auto: labels arrive late or never (a client's choice), so too few of them is no reason to hold the step
    enough = min(cand.labelled, champ.labelled) >= p.min_feedback_labels
    if p.feedback == "required" or (p.feedback == "auto" and (enough or w.feedback_error)):
        checks.append(cc.live_accuracy(cand, champ, w.feedback_error, p))
    return checks
