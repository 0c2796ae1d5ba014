"""The canary's checks: each compares the candidate with the champion on one live-traffic window and ends passed,
failed, inconclusive (too little evidence yet) or error (see deployments/canary.py for what each one measures).
Pure functions of the window and the policy."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from canaryflow.core.settings import CanarySettings
from validation.results import Outcome

if TYPE_CHECKING:
    from deployments.metrics import VersionWindow, Window


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



def bake_checks(cand: VersionWindow, p: CanarySettings) -> list[Check]:
    """After promotion the previous champion answers no live request: the new one is held to the error limit and
    to the latency cap on its median (robust to a busy machine's tail); agreement comes from the replay."""
    if cand.requests < p.min_requests:
        why = f"too few requests to judge the bake: {cand.requests}, need {p.min_requests}"
        return [Check("traffic", Outcome.INCONCLUSIVE, float(cand.requests), float(p.min_requests), why)]
    median = cand.p50_ms or 0.0
    ok = median <= p.max_p95_ms
    latency = Check("latency", Outcome.PASSED if ok else Outcome.FAILED, median, p.max_p95_ms,
                    f"median {median:.1f} ms {'<=' if ok else '>'} {p.max_p95_ms:g} ms on {cand.requests} requests")
    return [errors(cand, p), latency]


def errors(cand: VersionWindow, p: CanarySettings) -> Check:
    r = cand.error_ratio
    ok = r <= p.max_error_ratio
    return Check("errors", Outcome.PASSED if ok else Outcome.FAILED, r, p.max_error_ratio,
                 f"error ratio {r:.3f} ({cand.errors}/{cand.requests}) {'<=' if ok else '>'} {p.max_error_ratio:.3f}")


def p95(cand: VersionWindow, champ: VersionWindow, p: CanarySettings) -> Check:
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


def latency_u(cand: VersionWindow, champ: VersionWindow, p: CanarySettings) -> Check:
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


def drift(cand: VersionWindow, champ: VersionWindow, p: CanarySettings) -> Check:
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


def live_accuracy(cand: VersionWindow, champ: VersionWindow, error: str | None, p: CanarySettings) -> Check:
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


def shadow_agreement(w: Window, p: CanarySettings) -> Check:
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
