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
import math
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from canaryflow.core.settings import CanarySettings
from deployments import pairwise
from deployments.pairwise import PairSample
from validation.results import Outcome

if TYPE_CHECKING:
    from deployments.metrics import VersionWindow, Window


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
class Check:
    """One metric check of one analysis."""

    name: str
    outcome: Outcome
    measured: float | None
    threshold: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "outcome": self.outcome.value}


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
    passed = f"every check passed at {'shadow' if s.shadow else f'{s.weight:g}%'} ({summary(checks)})"
    if s.phase is Phase.BAKING:
        if now - s.step_started_at < policy.bake_s:
            why = f"baking: every check passed ({summary(checks)}); watched {now - s.step_started_at:.0f} of " \
                  f"{policy.bake_s:g} s"
            return Decision(Action.HOLD, replace(s, reasons=[why]), checks, [why])
        reasons = [f"bake of {policy.bake_s:g} s passed ({summary(checks)}); release done"]
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


def _rollback(s: CanaryStatus, checks: list[Check], reasons: list[str]) -> Decision:
    return Decision(Action.ROLLBACK, replace(s, phase=Phase.ROLLED_BACK, weight=0.0, reasons=reasons), checks,
                    reasons)


# -- the checks ---------------------------------------------------------------------------------------------------
def analyse(w: Window, s: CanaryStatus, p: CanarySettings) -> list[Check]:
    """Every check of one analysis on one window."""
    cand, champ = w.get(s.candidate), w.get(s.champion)
    if s.phase is Phase.BAKING:
        return _bake_checks(cand, p)
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
    checks = [_errors(cand, p), _p95(cand, champ, p), _latency_u(cand, champ, p), _drift(cand, champ, p)]
    if s.shadow or w.shadow_pairs:
        checks.append(_shadow_agreement(w, p))
    # auto: labels arrive late or never (a client's choice), so too few of them is no reason to hold the step
    enough = min(cand.labelled, champ.labelled) >= p.min_feedback_labels
    if p.feedback == "required" or (p.feedback == "auto" and (enough or w.feedback_error)):
        checks.append(_live_accuracy(cand, champ, w.feedback_error, p))
    return checks


def _bake_checks(cand: VersionWindow, p: CanarySettings) -> list[Check]:
    """After promotion the previous champion answers no live request: the new one is held to the error limit and
    to the latency cap on its median (robust to a busy machine's tail); agreement comes from the replay."""
    if cand.requests < p.min_requests:
        why = f"too few requests to judge the bake: {cand.requests}, need {p.min_requests}"
        return [Check("traffic", Outcome.INCONCLUSIVE, float(cand.requests), float(p.min_requests), why)]
    median = cand.p50_ms or 0.0
    ok = median <= p.max_p95_ms
    latency = Check("latency", Outcome.PASSED if ok else Outcome.FAILED, median, p.max_p95_ms,
                    f"median {median:.1f} ms {'<=' if ok else '>'} {p.max_p95_ms:g} ms on {cand.requests} requests")
    return [_errors(cand, p), latency]


def _errors(cand: VersionWindow, p: CanarySettings) -> Check:
    r = cand.error_ratio
    ok = r <= p.max_error_ratio
    return Check("errors", Outcome.PASSED if ok else Outcome.FAILED, r, p.max_error_ratio,
                 f"error ratio {r:.3f} ({cand.errors}/{cand.requests}) {'<=' if ok else '>'} {p.max_error_ratio:.3f}")


def _p95(cand: VersionWindow, champ: VersionWindow, p: CanarySettings) -> Check:
    """The candidate's tail against a bar from the champion's (``min(cap, champion p95 x ratio + slack)``).

    Not the bare p95 of a few dozen requests (its top two values): the share of candidate requests over the bar
    against the champion's share over the same bar, in the same window. A slow candidate is over it far more
    often (Fisher's exact test at ``latency_alpha`` and at least 5 points more); a busy machine slows both, and
    a lone slow request (a cold cache, a replay batch) is not a regression."""
    from scipy.stats import fisher_exact

    c, b = cand.p95_ms, champ.p95_ms
    if c is None or b is None:
        return Check("p95", Outcome.INCONCLUSIVE, c, p.max_p95_ms, "no latency samples")
    bar = min(p.max_p95_ms, b * p.max_p95_ratio + p.p95_slack_ms)
    kc = int(np.sum(np.asarray(cand.latencies_ms) > bar))
    kb = int(np.sum(np.asarray(champ.latencies_ms) > bar))
    nc, nb = len(cand.latencies_ms), len(champ.latencies_ms)
    ec, eb = kc / nc, kb / nb
    pvalue = float(fisher_exact([[kc, nc - kc], [kb, nb - kb]], alternative="greater")[1])
    slower = pvalue < p.latency_alpha and ec > eb + 0.05
    return Check("p95", Outcome.FAILED if slower else Outcome.PASSED, c, bar,
                 f"p95 {c:.1f} ms {'>' if c > bar else '<='} {bar:.1f} ms (champion {b:.1f} ms x "
                 f"{p.max_p95_ratio:g} + {p.p95_slack_ms:g} ms, cap {p.max_p95_ms:g} ms): {ec:.0%} of candidate "
                 f"requests over it vs {eb:.0%} of the champion's (Fisher p={pvalue:.2g})"
                 + ("; candidate slower" if slower else ""))


def _latency_u(cand: VersionWindow, champ: VersionWindow, p: CanarySettings) -> Check:
    from scipy.stats import mannwhitneyu

    a, b = np.asarray(cand.latencies_ms), np.asarray(champ.latencies_ms)
    if len(a) < 2 or len(b) < 2:
        return Check("latency_u", Outcome.INCONCLUSIVE, None, p.latency_alpha, "too few latency samples")
    pvalue = float(mannwhitneyu(a, b, alternative="greater").pvalue)
    shift = float(np.median(a) - np.median(b))
    slower = pvalue < p.latency_alpha and shift > p.latency_min_shift_ms
    return Check("latency_u", Outcome.FAILED if slower else Outcome.PASSED, pvalue, p.latency_alpha,
                 f"Mann-Whitney U p={pvalue:.2g} ({'<' if pvalue < p.latency_alpha else '>='} {p.latency_alpha:g}), "
                 f"median shift {shift:+.1f} ms (limit {p.latency_min_shift_ms:g} ms)"
                 + ("; candidate slower" if slower else ""))


def _drift(cand: VersionWindow, champ: VersionWindow, p: CanarySettings) -> Check:
    if p.drift_metric == "wasserstein":
        if not cand.scores or not champ.scores:
            return Check("prediction_drift", Outcome.INCONCLUSIVE, None, p.max_prediction_drift, "no scores logged")
        from scipy.stats import wasserstein_distance

        value, what = float(wasserstein_distance(cand.scores, champ.scores)), "Wasserstein of top scores"
    else:
        if not cand.classes or not champ.classes:
            return Check("prediction_drift", Outcome.INCONCLUSIVE, None, p.max_prediction_drift,
                         "no predicted classes logged")
        value, what = psi(cand.classes, champ.classes), "PSI of predicted classes"
    ok = value <= p.max_prediction_drift
    return Check("prediction_drift", Outcome.PASSED if ok else Outcome.FAILED, value, p.max_prediction_drift,
                 f"{what} {value:.3f} {'<=' if ok else '>'} {p.max_prediction_drift:g} "
                 f"(candidate {_shares(cand.classes)} vs champion {_shares(champ.classes)})")


def _live_accuracy(cand: VersionWindow, champ: VersionWindow, error: str | None, p: CanarySettings) -> Check:
    """Labelled rows answered right, candidate vs champion in the same window: failed when the candidate is less
    accurate at confidence 1 - ``accuracy_alpha`` (Fisher's exact test) by more than ``max_accuracy_drop``."""
    from scipy.stats import fisher_exact

    if error:
        return Check("live_accuracy", Outcome.ERROR, None, None, error)
    need = p.min_feedback_labels
    if cand.labelled < need or champ.labelled < need:
        return Check("live_accuracy", Outcome.INCONCLUSIVE, float(cand.labelled), float(need),
                     f"labelled rows: candidate {cand.labelled}, champion {champ.labelled}, need {need} each")
    ac, ab = cand.correct / cand.labelled, champ.correct / champ.labelled
    table = [[cand.correct, cand.labelled - cand.correct], [champ.correct, champ.labelled - champ.correct]]
    pvalue = float(fisher_exact(table, alternative="less")[1])
    worse = pvalue < p.accuracy_alpha and ab - ac > p.max_accuracy_drop
    return Check("live_accuracy", Outcome.FAILED if worse else Outcome.PASSED, ac, ab - p.max_accuracy_drop,
                 f"live accuracy {ac:.3f} ({cand.correct}/{cand.labelled} labelled rows) vs champion {ab:.3f} "
                 f"({champ.correct}/{champ.labelled}): drop {ab - ac:+.3f} "
                 f"{'>' if ab - ac > p.max_accuracy_drop else '<='} {p.max_accuracy_drop:g} (Fisher p={pvalue:.2g})"
                 + ("; candidate less accurate" if worse else ""))


def _shadow_agreement(w: Window, p: CanarySettings) -> Check:
    if w.shadow_pairs < p.min_requests:
        return Check("shadow_agreement", Outcome.INCONCLUSIVE, float(w.shadow_pairs), float(p.min_requests),
                     f"{w.shadow_pairs} paired requests, need {p.min_requests}")
    a = w.shadow_agreements / w.shadow_pairs
    ok = a >= p.min_shadow_agreement
    return Check("shadow_agreement", Outcome.PASSED if ok else Outcome.FAILED, a, p.min_shadow_agreement,
                 f"agreement {a:.3f} on {w.shadow_pairs} paired requests {'>=' if ok else '<'} "
                 f"{p.min_shadow_agreement:g}")


def summary(checks: list[Check]) -> str:
    """``errors 0 <= 0.01, p95 4.1 <= 12.3, ...``: each check's measured value against its threshold."""
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.3g}"
    def one(c: Check) -> str:
        if c.name == "latency_u":  # a p-value alone does not decide (the median shift must matter too)
            return f"latency_u p={num(c.measured)}"
        op = ">=" if "agreement" in c.name or "accuracy" in c.name else "<="
        return f"{c.name} {num(c.measured)} {op} {num(c.threshold)}"
    return ", ".join(one(c) for c in checks)


def psi(actual: dict[str, int], expected: dict[str, int], eps: float = 0.5) -> float:
    """Population stability index of two class histograms (additive smoothing ``eps`` for empty classes)."""
    keys = sorted(set(actual) | set(expected))
    na, ne = sum(actual.values()) + eps * len(keys), sum(expected.values()) + eps * len(keys)
    total = 0.0
    for k in keys:
        pa, pe = (actual.get(k, 0) + eps) / na, (expected.get(k, 0) + eps) / ne
        total += (pa - pe) * math.log(pa / pe)
    return total


def _shares(classes: dict[str, int]) -> str:
    n = sum(classes.values()) or 1
    return "{" + ", ".join(f"{k}: {v / n:.2f}" for k, v in sorted(classes.items())) + "}"
