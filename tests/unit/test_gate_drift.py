"""The drift gate on real Evidently 0.7 (new API), with seeded numpy data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from validation.drift import check_drift
from validation.results import Outcome

COLUMNS = ["f0", "f1", "f2", "f3", "f4"]


def frame(seed: int, rows: int = 400) -> pd.DataFrame:
    # seeds 1 and 10 share a distribution and no column's K-S p-value falls below 0.05 by chance (min 0.094)
    return pd.DataFrame(np.random.default_rng(seed).normal(size=(rows, len(COLUMNS))), columns=COLUMNS)


def test_same_distribution_passes_and_writes_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    result = check_drift(frame(1), frame(10), COLUMNS, 0.5, tmp_path)
    assert os.environ["DO_NOT_TRACK"] == "1"
    assert result.outcome is Outcome.PASSED
    assert result.reason == "0 of 5 columns drifted (0.0% <= 50.0%)"
    assert result.measured["drift_share"] == 0.0 and result.measured["n_columns"] == 5
    html, report = tmp_path / "drift_report.html", tmp_path / "drift_report.json"
    assert result.measured["files"] == [str(html), str(report)]
    assert html.stat().st_size > 100_000  # self-contained HTML
    assert json.loads(report.read_text())["metrics"][0]["value"] == {"count": 0.0, "share": 0.0}


def test_shifted_column_fails(tmp_path: Path) -> None:
    current = frame(10)
    current["f2"] += 1.0
    result = check_drift(frame(1), current, COLUMNS, 0.1, tmp_path)
    assert result.outcome is Outcome.FAILED
    assert result.reason == "1 of 5 columns drifted (20.0% > 10.0%): f2 K-S p_value 0.000 vs 0.050"
    assert result.measured["drifted_columns"] == ["f2"]
    assert result.measured["columns"]["f2"]["drifted"] and not result.measured["columns"]["f1"]["drifted"]


def test_drift_within_the_allowed_share_passes(tmp_path: Path) -> None:
    current = frame(10)
    current["f0"] *= 3.0
    result = check_drift(frame(1), current, COLUMNS, 0.5, tmp_path, stattest_threshold=0.01)
    assert result.passed
    assert result.reason == "1 of 5 columns drifted (20.0% <= 50.0%): f0 K-S p_value 0.000 vs 0.010"


def test_missing_column_is_an_error_not_a_verdict(tmp_path: Path) -> None:
    result = check_drift(frame(1), frame(10).drop(columns=["f4"]), COLUMNS, 0.5, tmp_path)
    assert result.outcome is Outcome.ERROR
    assert result.reason == "current data lacks feature columns ['f4']"


def test_no_rows_is_inconclusive(tmp_path: Path) -> None:
    result = check_drift(frame(1), frame(10).iloc[:0], COLUMNS, 0.5, tmp_path)
    assert result.outcome is Outcome.INCONCLUSIVE
    assert result.reason == "current data has no rows to compare"
