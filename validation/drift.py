"""The drift gate: the holdout (or live traffic) must come from the distribution of the reference data.

Evidently 0.7's new API (``Report`` + ``DataDriftPreset``) runs one statistical test per feature column
(K-S for small numeric samples, normed Wasserstein above 1000 rows, chi-squared/Jensen-Shannon for
categories; ``stattest_threshold`` overrides every column's threshold). A column counts as drifted when
Evidently's own per-column test fails, so the direction of each method (p-value below, distance above its
threshold) stays Evidently's business. The gate fails when the share of drifted columns exceeds
``max_drift_share``. Evidently is imported lazily: it takes seconds and phones home unless DO_NOT_TRACK is set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from validation.results import GateResult, Outcome, judged

GATE = "drift"


def check_drift(reference: pd.DataFrame, current: pd.DataFrame, feature_columns: list[str],
                max_drift_share: float, out_dir: Path, stattest_threshold: float | None = None) -> GateResult:
    """Gate: share of drifted feature columns must be <= ``max_drift_share``; writes HTML and JSON reports."""
    thresholds = {"max_drift_share": max_drift_share, "stattest_threshold": stattest_threshold}
    for name, frame in (("reference", reference), ("current", current)):
        missing = [c for c in feature_columns if c not in frame.columns]
        if missing:
            return GateResult(GATE, Outcome.ERROR, f"{name} data lacks feature columns {missing}",
                              {"missing_columns": missing}, thresholds)
        if frame.empty:
            return GateResult(GATE, Outcome.INCONCLUSIVE, f"{name} data has no rows to compare", {}, thresholds)
    try:
        columns = _run_report(reference, current, feature_columns, max_drift_share, out_dir, stattest_threshold)
    except Exception as exc:  # Evidently failed: no verdict on the data
        return GateResult(GATE, Outcome.ERROR, f"drift report could not run: {type(exc).__name__}: {exc}"[:500],
                          {}, thresholds)
    drifted = [c for c in feature_columns if columns[c]["drifted"]]
    share = len(drifted) / len(feature_columns)
    ok = share <= max_drift_share
    reason = (f"{len(drifted)} of {len(feature_columns)} columns drifted "
              f"({share:.1%} {'<=' if ok else '>'} {max_drift_share:.1%})")
    if drifted:
        listed = "; ".join(_describe(c, columns[c]) for c in drifted[:3])
        reason += f": {listed}" + (f" (+{len(drifted) - 3} more)" if len(drifted) > 3 else "")
    measured = {"drift_share": share, "drifted_columns": drifted, "n_drifted": len(drifted),
                "n_columns": len(feature_columns), "columns": columns,
                "files": [str(out_dir / "drift_report.html"), str(out_dir / "drift_report.json")]}
    return judged(GATE, ok, reason, measured, thresholds)


def _run_report(reference: pd.DataFrame, current: pd.DataFrame, feature_columns: list[str],
                drift_share: float, out_dir: Path, threshold: float | None) -> dict[str, dict[str, Any]]:
    """Run the preset, write both reports, return {column: {score, method, threshold, drifted}}."""
    os.environ.setdefault("DO_NOT_TRACK", "1")  # before the import: Evidently reads it for its telemetry
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    # declare types from the reference dtypes: Evidently's inference may call a low-cardinality int categorical
    numeric = [c for c in feature_columns if pd.api.types.is_numeric_dtype(reference[c])
               and not pd.api.types.is_bool_dtype(reference[c])]
    definition = DataDefinition(numerical_columns=numeric,
                                categorical_columns=[c for c in feature_columns if c not in numeric])
    report = Report([DataDriftPreset(columns=feature_columns, drift_share=drift_share, threshold=threshold)],
                    include_tests=True)  # the per-column tests carry Evidently's drifted/not-drifted verdict
    snapshot = report.run(current_data=Dataset.from_pandas(current[feature_columns], data_definition=definition),
                          reference_data=Dataset.from_pandas(reference[feature_columns],
                                                             data_definition=definition))
    out_dir.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(out_dir / "drift_report.html"))
    data = json.loads(snapshot.json())
    (out_dir / "drift_report.json").write_text(json.dumps(data, indent=2))
    return _columns(data, feature_columns)


def _describe(column: str, info: dict[str, Any]) -> str:
    """``f2 K-S p_value 0.000 vs 0.050``: the method says which way the comparison goes."""
    threshold = "?" if info["threshold"] is None else f"{info['threshold']:.3f}"
    return f"{column} {info['method']} {info['score']:.3f} vs {threshold}"


def _columns(data: dict[str, Any], feature_columns: list[str]) -> dict[str, dict[str, Any]]:
    columns: dict[str, dict[str, Any]] = {}
    for metric in data.get("metrics", []):
        config = metric.get("config", {})
        if config.get("type", "").endswith(":ValueDrift") and config.get("column") in feature_columns:
            columns[config["column"]] = {"score": float(metric["value"]), "method": config.get("method"),
                                         "threshold": config.get("threshold"), "drifted": False}
    for test in data.get("tests", []):
        params = test.get("metric_config", {}).get("params", {})
        if params.get("type", "").endswith(":ValueDrift") and params.get("column") in columns:
            columns[params["column"]]["drifted"] = test.get("status") == "FAIL"
    absent = [c for c in feature_columns if c not in columns]
    if absent:
        raise RuntimeError(f"Evidently reported no drift result for columns {absent}")
    return columns
