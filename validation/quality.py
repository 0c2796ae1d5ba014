"""The quality gate: on the holdout the candidate must reach an absolute floor and must not fall behind the
champion by more than the allowed absolute and relative drop.

Why sklearn and not ``mlflow.models.evaluate`` (checked on mlflow 3.17.2): evaluate always logs into a
tracking run (it starts one when none is active, so a pure gate would have to swap the process-wide tracking
URI), renders plots and took 2.8 s per model on a 569-row table; given a plain function it never calls
``predict_proba``, so roc_auc and log_loss are missing; and its binary f1 is the positive-class f1, not macro.
``MetricThreshold`` cannot express a tolerated drop either: ``min_absolute_change`` must be > 0 and
``min_relative_change`` in [0, 1], both meaning a required *improvement* over the baseline. So the metrics
come from the same sklearn functions MLflow's classifier evaluator calls, and the judgement keeps
MetricThreshold's semantics: the floor is ``>=`` for greater-is-better metrics and ``<=`` (a ceiling) for
log_loss, and the relative change is taken against ``abs(champion)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from canaryflow.core.serving_contract import output_kind, to_probabilities
from validation.results import GateResult, Outcome, judged

GATE = "quality"
Predict = Callable[[np.ndarray], np.ndarray]
GREATER_IS_BETTER = {"accuracy": True, "f1": True, "roc_auc": True, "log_loss": False}


def check_quality(candidate_predict: Predict, champion_predict: Predict | None, holdout: pd.DataFrame,
                  feature_columns: list[str], label_column: str, metric: str, floor: float,
                  max_abs_drop: float, max_rel_drop: float, out_dir: Path) -> GateResult:
    """Gate: ``metric`` of the candidate on the holdout against ``floor`` and against the champion."""
    thresholds = {"metric": metric, "floor": floor, "max_abs_drop": max_abs_drop, "max_rel_drop": max_rel_drop}
    if metric not in GREATER_IS_BETTER:
        return GateResult(GATE, Outcome.ERROR, f"unknown metric {metric!r}; use one of {sorted(GREATER_IS_BETTER)}",
                          {}, thresholds)
    problem = _holdout_problem(holdout, feature_columns, label_column)
    if problem:
        return GateResult(GATE, Outcome.ERROR, problem, {}, thresholds)
    x = holdout[feature_columns].to_numpy(dtype=np.float32)
    y = holdout[label_column].to_numpy().astype(np.int64)  # integer class indices, checked above
    try:
        cand = all_metrics(y, _scores(candidate_predict, x))
    except Exception as exc:  # the candidate's own failure on the holdout is the verdict
        return judged(GATE, False, f"candidate failed on the holdout: {type(exc).__name__}: {exc}"[:500],
                      {}, thresholds)
    try:
        champ = all_metrics(y, _scores(champion_predict, x)) if champion_predict is not None else None
    except Exception as exc:  # not the candidate's fault: no comparison possible
        return GateResult(GATE, Outcome.ERROR, f"champion failed on the holdout: {type(exc).__name__}: {exc}"[:500],
                          {"candidate_metrics": cand}, thresholds)
    if metric not in cand:
        return GateResult(GATE, Outcome.ERROR, f"{metric} needs a binary task; the holdout has "
                          f"{len(np.unique(y))} classes", {"candidate_metrics": cand}, thresholds)
    path = out_dir / "quality.json"
    result = _judge(metric, cand, champ, floor, max_abs_drop, max_rel_drop, thresholds,
                    {"rows": len(y), "files": [str(path)]})
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=2))
    return result


def all_metrics(y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """accuracy, macro f1, log_loss and (binary only) roc_auc of class scores against integer labels."""
    proba = to_probabilities(scores, output_kind(scores))  # the rule the handler answers with
    proba = proba / proba.sum(axis=1, keepdims=True)  # float32 rounding trips sklearn's sum check
    pred = proba.argmax(axis=1)
    classes = np.arange(proba.shape[1])
    out = {"accuracy": float(skm.accuracy_score(y, pred)),
           "f1": float(skm.f1_score(y, pred, average="macro", zero_division=0)),
           "log_loss": float(skm.log_loss(y, proba, labels=classes))}
    if proba.shape[1] == 2 and len(np.unique(y)) == 2:
        out["roc_auc"] = float(skm.roc_auc_score(y, proba[:, 1]))
    return out


def _judge(metric: str, cand: dict[str, float], champ: dict[str, float] | None, floor: float,
           max_abs_drop: float, max_rel_drop: float, thresholds: dict[str, Any], extra: dict[str, Any]) -> GateResult:
    higher = GREATER_IS_BETTER[metric]
    value = cand[metric]
    measured: dict[str, Any] = {"metric": metric, "candidate": value, "champion": None, "abs_change": None,
                                "rel_change": None, "candidate_metrics": cand, "champion_metrics": champ, **extra}
    floor_ok = value >= floor if higher else value <= floor
    v, f = _pair(value, floor)
    floor_text = (f"{metric} {v} {'>=' if floor_ok else '<'} floor {f}" if higher
                  else f"{metric} {v} {'<=' if floor_ok else '>'} ceiling {f}")
    if champ is None:
        return judged(GATE, floor_ok, floor_text if not floor_ok else f"{floor_text} (first release: no champion)",
                      measured, thresholds)
    base = champ[metric]
    change = value - base
    rel = change / abs(base) if base else (0.0 if change == 0 else float(np.sign(change)) * float("inf"))
    measured.update(champion=base, abs_change=change, rel_change=rel)
    # a "drop" is a change for the worse: down for accuracy/f1/roc_auc, up for log_loss
    drop, rel_drop = (-change, -rel) if higher else (change, rel)
    word = "drop" if higher else "rise"
    failures = []
    if drop > max_abs_drop:
        failures.append("{} {} > {}".format(word, *_pair(drop, max_abs_drop)))
    if rel_drop > max_rel_drop:
        failures.append("relative {} {} > {}".format(word, *_pair(rel_drop, max_rel_drop, percent=True)))
    b = _pair(base, value)[0]
    if failures:
        prefix = f"{floor_text}; vs" if not floor_ok else f"{metric} {_pair(value, base)[0]} vs"
        return judged(GATE, False, f"{prefix} champion {b}: {', '.join(failures)}", measured, thresholds)
    if not floor_ok:
        return judged(GATE, False, f"{floor_text} (champion {b})", measured, thresholds)
    return judged(GATE, True, f"{floor_text}; vs champion {b}: change {change:+.3f} ({rel:+.1%}), allowed "
                              f"{word} {max_abs_drop:.3f} / {max_rel_drop:.1%}", measured, thresholds)


def _pair(a: float, b: float, percent: bool = False) -> tuple[str, str]:
    """Both numbers with 3 decimals, or more where 3 would print a strict comparison as equal."""
    scale, suffix = (100.0, "%") if percent else (1.0, "")
    digits = 1 if percent else 3
    while digits < 6 and round(a * scale, digits) == round(b * scale, digits) and a != b:
        digits += 1
    return f"{a * scale:.{digits}f}{suffix}", f"{b * scale:.{digits}f}{suffix}"


def _holdout_problem(holdout: pd.DataFrame, feature_columns: list[str], label_column: str) -> str | None:
    missing = [c for c in [*feature_columns, label_column] if c not in holdout.columns]
    if missing:
        return f"holdout lacks columns {missing}"
    if holdout.empty:
        return "holdout has no rows"
    bad = int(holdout[[*feature_columns, label_column]].isna().any(axis=1).sum())
    if bad:  # the data gate owns missing values; scoring them would blame the model
        return f"holdout has {bad} rows with missing values"
    labels = holdout[label_column]
    # argmax gives a class index, so labels must be the indices 0..classes-1
    if not pd.api.types.is_integer_dtype(labels) and not (
            pd.api.types.is_float_dtype(labels) and (labels == labels.round()).all()):
        return f"label column {label_column!r} has dtype {labels.dtype}; expected integer class indices"
    if (labels < 0).any():
        return f"label column {label_column!r} has negative values; expected class indices 0..n-1"
    return None


def _scores(predict: Predict, x: np.ndarray) -> np.ndarray:
    out = np.asarray(predict(x), dtype=np.float64)
    if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):  # one score per row: P(class 1)
        p = out.reshape(-1)
        out = np.stack([1.0 - p, p], axis=1)
    if out.ndim != 2 or out.shape[0] != len(x):
        raise ValueError(f"scores of shape {list(out.shape)} for {len(x)} rows; expected [{len(x)}, classes]")
    if not np.isfinite(out).all():
        raise ValueError(f"{int((~np.isfinite(out)).sum())} non-finite scores")
    return out


CROSS_GATE = "quality_cross"


def check_cross_holdouts(candidate_predict: Predict, champion_predict: Predict, sets: dict[str, pd.DataFrame],
                         feature_columns: list[str], label_column: str, metric: str, max_contradiction: float,
                         max_abs_drop: float, max_rel_drop: float, floor: float) -> GateResult:
    """The candidate's own holdout is not trusted alone: both models are scored on every evaluation set (the
    candidate's holdout first, then the champion's and an operator-owned set when there are).

    FAILED when the sets contradict each other: the champion is far worse (by more than ``max_contradiction``)
    on the candidate's holdout than on its own (the signature of labels flipped or shifted upstream of the
    candidate), or the candidate is far worse on another set than on its own; and FAILED when the candidate falls
    behind the champion on any other set by more than the quality gate's drops. ERROR when a set cannot be scored.
    """
    thresholds = {"metric": metric, "max_contradiction": max_contradiction, "max_abs_drop": max_abs_drop,
                  "max_rel_drop": max_rel_drop, "floor": floor}
    if metric not in GREATER_IS_BETTER:
        return GateResult(CROSS_GATE, Outcome.ERROR, f"unknown metric {metric!r}", {}, thresholds)
    scores: dict[str, dict[str, float]] = {}
    for name, df in sets.items():
        problem = _holdout_problem(df, feature_columns, label_column)
        if problem:
            return GateResult(CROSS_GATE, Outcome.ERROR, f"{name}: {problem}", {"scores": scores}, thresholds)
        x = df[feature_columns].to_numpy(dtype=np.float32)
        y = df[label_column].to_numpy().astype(np.int64)
        try:
            scores[name] = {"candidate": all_metrics(y, _scores(candidate_predict, x)).get(metric, float("nan")),
                            "champion": all_metrics(y, _scores(champion_predict, x)).get(metric, float("nan")),
                            "rows": float(len(y))}
        except Exception as exc:  # noqa: BLE001 - a set the models cannot score is no verdict on the candidate
            return GateResult(CROSS_GATE, Outcome.ERROR, f"{name}: scoring failed: {type(exc).__name__}: {exc}"[:500],
                              {"scores": scores}, thresholds)
    names = list(scores)
    own, others = names[0], names[1:]
    measured: dict[str, Any] = {"scores": scores}
    if not others:
        return GateResult(CROSS_GATE, Outcome.PASSED, "no other evaluation set (champion's holdout or "
                          "operator's) to cross-check the candidate's holdout against", measured, thresholds)
    worse = (lambda a, b: b - a) if GREATER_IS_BETTER[metric] else (lambda a, b: a - b)  # how much a is worse than b
    problems = []
    for other in others:
        c, o = scores[own], scores[other]
        if worse(c["champion"], o["champion"]) > max_contradiction:
            problems.append(f"the champion scores {metric} {c['champion']:.3f} on {own} but {o['champion']:.3f} "
                            f"on {other}: the sets contradict each other (labels flipped or shifted upstream?)")
        if worse(o["candidate"], c["candidate"]) > max_contradiction:
            problems.append(f"the candidate scores {metric} {o['candidate']:.3f} on {other} but "
                            f"{c['candidate']:.3f} on {own}")
        drop = worse(o["candidate"], o["champion"])
        rel = drop / abs(o["champion"]) if o["champion"] else 0.0
        if drop > max_abs_drop or rel > max_rel_drop:
            problems.append(f"on {other} the candidate's {metric} {o['candidate']:.3f} falls behind the champion's "
                            f"{o['champion']:.3f} by {drop:.3f} ({rel:.1%}; allowed {max_abs_drop:g} / "
                            f"{max_rel_drop:.1%})")
    if problems:
        return judged(CROSS_GATE, False, "; ".join(problems), measured, thresholds)
    table = ", ".join(f"{n}: candidate {s['candidate']:.3f} / champion {s['champion']:.3f}" for n, s in scores.items())
    return judged(CROSS_GATE, True, f"{metric} consistent across sets ({table}); contradiction limit "
                                    f"{max_contradiction:g}", measured, thresholds)
