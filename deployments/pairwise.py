"""Pairwise canary analysis: the candidate's and the champion's answers to the SAME live rows, compared.

A split compares two versions on different requests, so a distribution check (PSI of classes) is blind to any
fault that keeps the class balance, and to a fault confined to a few percent of traffic. Here every analysis
gets pairs: recently served live rows replayed out of band to both versions (canaryflow/release/replay.py), answers
compared as classes and as probabilities. Three checks, each with a statistical bound:

- ``agreement``: the share of pairs answered with the same class; FAILED when the Wilson upper bound of the
  agreement is below the limit (the candidate disagrees more than allowed, with confidence), INCONCLUSIVE while
  there are too few pairs or the interval still straddles the limit from below;
- ``segment_agreement``: the same per segment (quantile bins of every input feature, measured on the replayed
  rows, and the champion's predicted class), Bonferroni-corrected over the segments, so a fault confined to
  2% of traffic is seen and named (``agreement 0.00 on worst_area > 1,850 (34 pairs) < 0.8``);
- ``probability_delta``: the mean over pairs of max |p_candidate - p_champion|.

Pure: no I/O, no clock; the pairs come in a :class:`PairSample`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from canaryflow.core.settings import CanarySettings
from validation.results import Outcome

# Quantile edges of a feature's segments: tails of 2% and 10% are segments of their own.
SEGMENT_QUANTILES = (0.02, 0.10, 0.25, 0.50, 0.75, 0.90, 0.98)
MAX_SEGMENT_FEATURES = 64


@dataclass(frozen=True)
class Pair:
    """One replayed row and both answers: predicted class index and class probabilities."""

    row: list[float]
    champion: int
    candidate: int
    champion_p: list[float]
    candidate_p: list[float]

    @property
    def agrees(self) -> bool:
        return self.champion == self.candidate

    @property
    def max_delta_p(self) -> float:
        a, b = np.asarray(self.champion_p), np.asarray(self.candidate_p)
        return float(np.abs(a - b).max()) if a.shape == b.shape and a.size else 1.0


@dataclass(frozen=True)
class PairSample:
    """The pairs of a ramp so far; ``error`` says why this analysis could not replay (not a model failure)."""

    pairs: list[Pair] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)
    error: str | None = None
    candidate_errors: int = 0  # replayed rows the candidate answered with an error (the errors check judges those)


@dataclass(frozen=True)
class Segment:
    name: str
    pairs: int
    agreements: int

    @property
    def agreement(self) -> float:
        return self.agreements / self.pairs if self.pairs else 1.0


def wilson(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion (well-behaved at 0 and 1, unlike the normal approximation)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def z_value(alpha: float) -> float:
    """One-sided normal quantile for a confidence of 1 - alpha."""
    from scipy.stats import norm

    return float(norm.ppf(1 - alpha))


def segments(pairs: list[Pair], names: list[str]) -> list[Segment]:
    """Quantile bins of each feature (edges from the replayed rows) and the champion's predicted class."""
    if not pairs:
        return []
    rows = np.asarray([p.row for p in pairs], dtype=np.float64)
    agree = np.asarray([p.agrees for p in pairs])
    out = []
    for j in range(min(rows.shape[1], MAX_SEGMENT_FEATURES)):
        name = names[j] if j < len(names) else f"f{j}"
        edges = np.unique(np.quantile(rows[:, j], SEGMENT_QUANTILES))
        bins = np.searchsorted(edges, rows[:, j], side="left")
        for b in np.unique(bins):
            mask = bins == b
            out.append(Segment(_bin_name(name, edges, int(b)), int(mask.sum()), int(agree[mask].sum())))
    classes = np.asarray([p.champion for p in pairs])
    for c in np.unique(classes):
        mask = classes == c
        out.append(Segment(f"champion class {int(c)}", int(mask.sum()), int(agree[mask].sum())))
    return out


def _bin_name(name: str, edges: np.ndarray, b: int) -> str:
    if b == 0:
        return f"{name} <= {edges[0]:,.4g}"
    if b >= len(edges):
        return f"{name} > {edges[-1]:,.4g}"
    return f"{edges[b - 1]:,.4g} < {name} <= {edges[b]:,.4g}"


def checks(sample: PairSample, p: CanarySettings) -> list[tuple[str, Outcome, float | None, float | None, str]]:
    """The pairwise checks of one analysis as (name, outcome, measured, threshold, reason) tuples."""
    if sample.error is not None and not sample.pairs:
        why = f"replay failed, no pairs to compare: {sample.error}"
        return [("agreement", Outcome.ERROR, None, p.min_pair_agreement, why)]
    return [_agreement(sample, p), _segment_agreement(sample, p), _probability_delta(sample, p)]


def _agreement(sample: PairSample, p: CanarySettings) -> tuple[str, Outcome, float | None, float | None, str]:
    n, k, limit = len(sample.pairs), sum(x.agrees for x in sample.pairs), p.min_pair_agreement
    if n < p.min_pairs:
        return ("agreement", Outcome.INCONCLUSIVE, float(n), float(p.min_pairs),
                f"{n} replayed pairs, need {p.min_pairs}")
    a = k / n
    low, high = wilson(k, n, z_value(p.pair_alpha))
    interval = f"{a:.3f} [{low:.3f}, {high:.3f}] on {n} pairs"
    if high < limit:
        return ("agreement", Outcome.FAILED, a, limit, f"agreement {interval} < {limit:g}")
    if a < limit:
        return ("agreement", Outcome.INCONCLUSIVE, a, limit,
                f"agreement {interval}: below {limit:g} but not yet significantly")
    return ("agreement", Outcome.PASSED, a, limit, f"agreement {interval} >= {limit:g}")


def _segment_agreement(sample: PairSample,
                       p: CanarySettings) -> tuple[str, Outcome, float | None, float | None, str]:
    limit = p.min_segment_agreement
    judged = [s for s in segments(sample.pairs, sample.feature_names) if s.pairs >= p.min_segment_pairs]
    if not judged:
        outcome = Outcome.INCONCLUSIVE if len(sample.pairs) < p.min_pairs else Outcome.PASSED
        return ("segment_agreement", outcome, None, limit,
                f"no segment has {p.min_segment_pairs} pairs yet ({len(sample.pairs)} pairs)")
    z = z_value(p.pair_alpha / len(judged))  # Bonferroni: many segments are tested at once
    bounded = [(wilson(s.agreements, s.pairs, z)[1], s) for s in judged]
    high, worst = min(bounded, key=lambda t: (t[0], t[1].agreement))
    what = f"agreement {worst.agreement:.2f} on {worst.name} ({worst.pairs} pairs)"
    if high < limit:
        return ("segment_agreement", Outcome.FAILED, worst.agreement, limit,
                f"{what} < {limit:g} (upper bound {high:.2f}, {len(judged)} segments)")
    return ("segment_agreement", Outcome.PASSED, worst.agreement, limit,
            f"worst of {len(judged)} segments: {what}, upper bound {high:.2f} >= {limit:g}")


def _probability_delta(sample: PairSample,
                       p: CanarySettings) -> tuple[str, Outcome, float | None, float | None, str]:
    limit = p.max_mean_prob_delta
    if len(sample.pairs) < p.min_pairs:
        return ("probability_delta", Outcome.INCONCLUSIVE, None, limit,
                f"{len(sample.pairs)} replayed pairs, need {p.min_pairs}")
    deltas = np.asarray([x.max_delta_p for x in sample.pairs])
    mean, p95 = float(deltas.mean()), float(np.percentile(deltas, 95))
    ok = mean <= limit
    return ("probability_delta", Outcome.PASSED if ok else Outcome.FAILED, mean, limit,
            f"mean max|dp| {mean:.3f} {'<=' if ok else '>'} {limit:g} (p95 {p95:.3f}, {len(deltas)} pairs)")
