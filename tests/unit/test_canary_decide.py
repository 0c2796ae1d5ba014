"""Table-driven tests of the pure canary controller: every outcome of decide()."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest

from canaryflow.core.settings import CanarySettings
from deployments.canary import Action, CanaryStatus, Measurements, Phase, decide, start
from deployments.canary_checks import psi
from deployments.metrics import VersionWindow, Window
from deployments.pairwise import Pair, PairSample
from validation.results import Outcome

T0 = 1_000_000.0
POLICY = CanarySettings(steps=[5, 25, 50, 100], interval_s=10, min_requests=50, step_deadline_s=300,
                        deadline_s=3600, max_failed_checks=2, max_source_errors=3, bake_s=0)
BAKE = POLICY.model_copy(update={"bake_s": 60})


def version(name: str, n: int = 200, errors: int = 0, latency_ms: float = 5.0, spread: float = 1.0,
            classes: dict[str, int] | None = None, seed: int = 0, scores: float = 0.9) -> VersionWindow:
    rng = np.random.default_rng(seed)
    lat = list(np.abs(rng.normal(latency_ms, spread, n)))
    cls = classes if classes is not None else {"0": n // 2, "1": n - n // 2}
    return VersionWindow(version=name, requests=n, errors=errors, latencies_ms=lat, classes=cls,
                         scores=list(np.clip(rng.normal(scores, 0.03, n), 0, 1)))


def baking(**kw: object) -> CanaryStatus:
    """Promoted at T0 and under watch."""
    return replace(status(2), phase=Phase.BAKING, weight=100.0, step_started_at=T0, **kw)


def baked(cand: VersionWindow | None = None) -> Window:
    """After promotion the previous champion answers no live request."""
    return window(cand or version("2", n=300, seed=1), VersionWindow("1"))


def tail(name: str, n: int, slow: int) -> VersionWindow:
    """``n`` requests around 6 ms, ``slow`` of them at 80-170 ms (a cold cache, a neighbour's burst)."""
    base = version(name, n=n, latency_ms=6.0, spread=1.0, seed=len(name) + n)
    lat = list(base.latencies_ms)
    for i in range(slow):
        lat[i * (n // max(slow, 1))] = 80.0 + 30 * (i % 4)
    return replace(base, latencies_ms=lat)


def mirrored(n: int, errors: int = 0, latency_ms: float = 5.0) -> VersionWindow:
    """A shadowed candidate: no client answers, ``n`` mirrored copies."""
    copy = version("2", n=n, latency_ms=latency_ms, seed=3)
    return replace(copy, requests=0, errors=0, latencies_ms=[], shadow_requests=n, shadow_errors=errors,
                   shadow_latencies_ms=copy.latencies_ms)


def window(cand: VersionWindow | None = None, champ: VersionWindow | None = None, **kw: object) -> Window:
    cand = cand or version("2", seed=1)
    champ = champ or version("1", n=800, seed=2)
    return Window(model="m", start=T0, end=T0 + 10, versions={"1": champ, "2": cand}, **kw)


def status(step: int = 0, **kw: object) -> CanaryStatus:
    base = start("1", "2", POLICY, T0)
    weight = POLICY.steps[step] if step >= 0 else 0.0
    return replace(base, step=step, weight=float(weight), **kw)


@dataclass
class Case:
    name: str
    status: CanaryStatus
    measurements: Measurements
    action: Action
    weight: float
    reason: str  # a substring of the decision's reasons
    failed_check: str | None = None
    policy: CanarySettings | None = None


def pairs(n: int = 300, flipped: float = 0.0, segment_share: float = 0.0, seed: int = 7) -> PairSample:
    """``n`` replayed rows of 4 features; a ``flipped`` share of all rows, or every row with f3 in its top
    ``segment_share``, answered with the other class by the candidate."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(0, 1, (n, 4))
    cut = np.quantile(rows[:, 3], 1 - segment_share) if segment_share else np.inf
    out = []
    for i, row in enumerate(rows):
        a = int(row[0] > 0)
        bad = i < flipped * n or row[3] > cut
        b = 1 - a if bad else a
        pa = [0.9, 0.1] if a == 0 else [0.1, 0.9]
        pb = [0.9, 0.1] if b == 0 else [0.1, 0.9]
        out.append(Pair(list(row), a, b, pa, pb))
    return PairSample(out, ["f0", "f1", "f2", "f3"])


def labelled(name: str, n: int, right: int, seed: int = 1, requests: int = 200) -> VersionWindow:
    """A version that answered ``n`` labelled rows, ``right`` of them correctly (feedback endpoint)."""
    return replace(version(name, n=requests, seed=seed), labelled=n, correct=right)


NOW = T0 + 20
CASES = [
    Case("healthy first step advances", status(0), Measurements(window(), NOW), Action.ADVANCE, 25,
         "advancing to 25%"),
    Case("healthy 50% promotes (next step is 100%)", status(2), Measurements(window(), NOW), Action.PROMOTE, 100,
         "promoting"),
    Case("too few candidate requests holds", status(0), Measurements(window(version("2", n=10)), NOW), Action.HOLD,
         5, "too few requests"),
    Case("too few champion requests holds", status(1), Measurements(window(champ=version("1", n=3)), NOW),
         Action.HOLD, 25, "champion 3"),
    Case("inconclusive past the step deadline rolls back", status(0),
         Measurements(window(version("2", n=10)), T0 + 301), Action.ROLLBACK, 0, "step deadline"),
    Case("first failed analysis holds", status(1), Measurements(window(version("2", errors=12)), NOW), Action.HOLD,
         25, "failed analysis 1/2", "errors"),
    Case("second failed analysis rolls back", status(1, failed_checks=1),
         Measurements(window(version("2", errors=12)), NOW), Action.ROLLBACK, 0, "error ratio 0.060", "errors"),
    Case("p95 over the champion's rolls back", status(1, failed_checks=1),
         Measurements(window(version("2", latency_ms=45, spread=1)), NOW), Action.ROLLBACK, 0, "p95", "p95"),
    Case("a few slow candidate requests are not a slower tail", status(1, failed_checks=1),
         Measurements(window(tail("2", 64, slow=3), tail("1", 2000, slow=80)), NOW), Action.ADVANCE, 50,
         "advancing to 50%"),
    Case("a busy machine slows both versions past the cap: not the candidate's fault", status(1, failed_checks=1),
         Measurements(window(version("2", latency_ms=70, spread=10), version("1", n=800, latency_ms=70, spread=10,
                                                                              seed=2)), NOW),
         Action.ADVANCE, 50, "advancing to 50%"),
    Case("slower by Mann-Whitney U but under the p95 bar", status(1, failed_checks=1),
         Measurements(window(version("2", latency_ms=9, spread=0.5), version("1", n=800, latency_ms=5, spread=2)),
                      NOW),
         Action.ROLLBACK, 0, "candidate slower", "latency_u"),
    Case("predictions drift from the champion's", status(1, failed_checks=1),
         Measurements(window(version("2", classes={"0": 190, "1": 10})), NOW), Action.ROLLBACK, 0,
         "PSI of predicted classes", "prediction_drift"),
    Case("source error holds and is not a model failure", status(1),
         Measurements(None, NOW, "cannot read access.log"), Action.HOLD, 25, "metrics source error 1/3"),
    Case("source errors in a row roll back", status(1, source_errors=2),
         Measurements(None, NOW, "cannot read access.log"), Action.ROLLBACK, 0, "metrics source error 3/3"),
    Case("whole-ramp deadline rolls back", status(1), Measurements(window(), T0 + 3601), Action.ROLLBACK, 0,
         "ramp deadline"),
    Case("a finished ramp stays finished", replace(status(2), phase=Phase.PROMOTED, weight=100),
         Measurements(window(), NOW), Action.HOLD, 100, "already promoted"),
    Case("steps not ending at 100 promote after the last", status(1), Measurements(window(), NOW), Action.PROMOTE,
         100, "promoting", policy=POLICY.model_copy(update={"steps": [10, 25]})),
    Case("wasserstein of scores", status(1, failed_checks=1),
         Measurements(window(version("2", scores=0.55)), NOW), Action.ROLLBACK, 0, "Wasserstein",
         "prediction_drift", POLICY.model_copy(update={"drift_metric": "wasserstein"})),
    Case("shadow: good agreement advances to the first step", status(-1, phase=Phase.SHADOW),
         Measurements(window(mirrored(120), shadow_pairs=120, shadow_agreements=119), NOW), Action.ADVANCE, 5,
         "advancing to 5%"),
    Case("shadow: low agreement fails", status(-1, phase=Phase.SHADOW, failed_checks=1),
         Measurements(window(mirrored(120), shadow_pairs=120, shadow_agreements=60), NOW), Action.ROLLBACK, 0,
         "agreement 0.500", "shadow_agreement"),
    Case("shadow: mirrored errors fail", status(-1, phase=Phase.SHADOW, failed_checks=1),
         Measurements(window(mirrored(120, errors=9), shadow_pairs=111, shadow_agreements=111), NOW),
         Action.ROLLBACK, 0, "error ratio 0.075", "errors"),
    Case("shadow: slower mirrored answers fail p95", status(-1, phase=Phase.SHADOW, failed_checks=1),
         Measurements(window(mirrored(120, latency_ms=45), shadow_pairs=120, shadow_agreements=120), NOW),
         Action.ROLLBACK, 0, "p95", "p95"),
    Case("pairwise: agreeing answers advance", status(0), Measurements(window(), NOW, pairs=pairs(300, 0.01)),
         Action.ADVANCE, 25, "advancing to 25%"),
    Case("pairwise: disagreement over the limit fails", status(1, failed_checks=1),
         Measurements(window(), NOW, pairs=pairs(300, 0.2)), Action.ROLLBACK, 0, "agreement 0.800", "agreement"),
    Case("pairwise: a fault in 5% of rows fails its segment, keeping overall agreement", status(1, failed_checks=1),
         Measurements(window(), NOW, pairs=pairs(1000, segment_share=0.05)), Action.ROLLBACK, 0, "f3 >",
         "segment_agreement"),
    Case("pairwise: too few pairs holds", status(0), Measurements(window(), NOW, pairs=pairs(40)), Action.HOLD, 5,
         "40 replayed pairs, need 100"),
    Case("pairwise: below the limit but not significantly holds", status(0),
         Measurements(window(), NOW, pairs=pairs(120, 0.06)), Action.HOLD, 5, "not yet significantly"),
    Case("pairwise: replay error holds, not a model failure", status(0),
         Measurements(window(), NOW, pairs=PairSample([], [], "TorchServe unreachable")), Action.HOLD, 5,
         "measurement error 1/3"),
    Case("pairwise: replay errors in a row roll back", status(0, source_errors=2),
         Measurements(window(), NOW, pairs=PairSample([], [], "TorchServe unreachable")), Action.ROLLBACK, 0,
         "measurement error 3/3"),
    Case("bake: the last step promotes and starts the watch", status(2), Measurements(window(), NOW), Action.BAKE,
         100, "promoting, then watching for 60 s", policy=BAKE),
    Case("bake: a healthy new champion is watched until the bake ends", baking(), Measurements(baked(), NOW),
         Action.HOLD, 100, "watched 20 of 60 s", policy=BAKE),
    Case("bake: passed after bake_s, release done", baking(), Measurements(baked(), T0 + 61), Action.PROMOTE, 100,
         "bake of 60 s passed", policy=BAKE),
    Case("bake: errors after promotion roll back", baking(failed_checks=1),
         Measurements(baked(version("2", n=300, errors=30)), NOW), Action.ROLLBACK, 0, "error ratio 0.100", "errors",
         BAKE),
    Case("bake: a slow new champion rolls back", baking(failed_checks=1),
         Measurements(baked(version("2", n=300, latency_ms=80)), NOW), Action.ROLLBACK, 0, "median", "latency",
         BAKE),
    Case("bake: replayed pairs that disagree roll back", baking(failed_checks=1),
         Measurements(baked(), NOW, pairs=pairs(300, 0.2)), Action.ROLLBACK, 0, "agreement 0.800", "agreement",
         BAKE),
    Case("bake: too little traffic holds", baking(), Measurements(baked(version("2", n=5)), NOW), Action.HOLD, 100,
         "too few requests to judge the bake", policy=BAKE),
    Case("bake: too little traffic at its end is no evidence against", baking(),
         Measurements(baked(version("2", n=5)), T0 + 61), Action.PROMOTE, 100, "without enough evidence", policy=BAKE),
    Case("live accuracy: as accurate as the champion advances", status(0),
         Measurements(window(labelled("2", 120, 114), labelled("1", 400, 380, seed=2, requests=800)), NOW),
         Action.ADVANCE, 25, "advancing to 25%"),
    Case("live accuracy: less accurate than the champion fails", status(1, failed_checks=1),
         Measurements(window(labelled("2", 120, 90), labelled("1", 400, 380, seed=2, requests=800)), NOW),
         Action.ROLLBACK, 0, "live accuracy 0.750 (90/120 labelled rows) vs champion 0.950", "live_accuracy"),
    Case("live accuracy: a small drop on few labels is not evidence", status(1, failed_checks=1),
         Measurements(window(labelled("2", 60, 55), labelled("1", 60, 58, seed=2, requests=800)), NOW),
         Action.ADVANCE, 50, "advancing to 50%"),
    Case("live accuracy (auto): too few labels yet is no verdict; the other checks advance", status(0),
         Measurements(window(labelled("2", 12, 3), labelled("1", 400, 380, seed=2, requests=800)), NOW),
         Action.ADVANCE, 25, "advancing to 25%"),
    Case("live accuracy (required): too few labels holds", status(0),
         Measurements(window(labelled("2", 12, 3), labelled("1", 400, 380, seed=2, requests=800)), NOW), Action.HOLD, 5,
         "labelled rows: candidate 12, champion 400, need 50 each", policy=POLICY.model_copy(
             update={"feedback": "required"})),
    Case("live accuracy: required and no labels yet holds", status(0), Measurements(window(), NOW), Action.HOLD, 5,
         "labelled rows: candidate 0", policy=POLICY.model_copy(update={"feedback": "required"})),
    Case("live accuracy: off ignores labels", status(1, failed_checks=1),
         Measurements(window(labelled("2", 120, 30), labelled("1", 400, 380, seed=2, requests=800)), NOW),
         Action.ADVANCE, 50, "advancing to 50%", policy=POLICY.model_copy(update={"feedback": "off"})),
    Case("live accuracy: unreadable labels hold, not a model failure", status(0),
         Measurements(window(feedback_error="cannot read the labels x.jsonl: Permission denied"), NOW),
         Action.HOLD, 5, "measurement error 1/3: live_accuracy: cannot read the labels"),
    Case("shadow: the mirrored copies' labels judge the candidate", status(-1, phase=Phase.SHADOW, failed_checks=1),
         Measurements(window(replace(mirrored(120), shadow_labelled=120, shadow_correct=80),
                             labelled("1", 400, 380, seed=2, requests=800), shadow_pairs=120,
                             shadow_agreements=119), NOW),
         Action.ROLLBACK, 0, "live accuracy 0.667", "live_accuracy"),
    Case("shadow: too few mirrored requests holds", status(-1, phase=Phase.SHADOW),
         Measurements(window(mirrored(5), shadow_pairs=5, shadow_agreements=5), NOW), Action.HOLD, 0,
         "too few mirrored requests"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decide(case: Case) -> None:
    d = decide(case.status, case.measurements, case.policy or POLICY)
    assert d.action is case.action, d.reasons
    assert d.status.weight == pytest.approx(case.weight)
    assert any(case.reason in r for r in d.reasons), d.reasons
    if case.failed_check:
        assert case.failed_check in [c.name for c in d.checks if c.outcome is Outcome.FAILED]
    else:
        assert not [c for c in d.checks if c.outcome is Outcome.FAILED]
    if case.action is Action.ROLLBACK:
        assert d.status.phase is Phase.ROLLED_BACK and d.status.done
    if case.action is Action.PROMOTE:
        assert d.status.phase is Phase.PROMOTED


def test_source_errors_are_counted_apart_from_failed_checks() -> None:
    d = decide(status(1, failed_checks=1), Measurements(None, NOW, "gone"), POLICY)
    assert d.status.failed_checks == 1 and d.status.source_errors == 1
    d2 = decide(d.status, Measurements(window(), NOW + 10), POLICY)
    assert d2.status.source_errors == 0 and d2.action is Action.ADVANCE


def test_every_check_quotes_measured_value_and_threshold() -> None:
    d = decide(status(1), Measurements(window(), NOW), POLICY)
    assert {c.name for c in d.checks} == {"errors", "p95", "latency_u", "prediction_drift"}
    assert all(c.outcome is Outcome.PASSED and c.threshold is not None for c in d.checks)


def test_resume_from_persisted_status() -> None:
    """A re-run reloads the JSON status and goes on from the same step, clock and counters."""
    mid = replace(status(1, failed_checks=1, iterations=4), step_started_at=T0 + 100)
    restored = CanaryStatus.from_json(mid.to_json())
    assert restored == mid
    d = decide(restored, Measurements(window(), T0 + 130), POLICY)
    assert d.action is Action.ADVANCE and d.status.step == 2 and d.status.weight == 50
    assert d.status.started_at == T0 and d.status.iterations == 5 and d.status.failed_checks == 1
    assert d.status.step_started_at == T0 + 130
    late = decide(restored, Measurements(window(), T0 + POLICY.deadline_s + 1), POLICY)
    assert late.action is Action.ROLLBACK


def test_start_with_and_without_shadow() -> None:
    assert start("1", "2", POLICY, T0).weight == 5 and start("1", "2", POLICY, T0).phase is Phase.PROGRESSING
    shadow = start("1", "2", POLICY.model_copy(update={"shadow": True}), T0)
    assert shadow.phase is Phase.SHADOW and shadow.weight == 0 and shadow.step == -1


def test_psi() -> None:
    assert psi({"0": 50, "1": 50}, {"0": 500, "1": 500}) == pytest.approx(0, abs=1e-6)
    assert psi({"0": 95, "1": 5}, {"0": 50, "1": 50}) > 0.5
    assert psi({"2": 10}, {"0": 10}) > 1  # disjoint classes, smoothed, finite
