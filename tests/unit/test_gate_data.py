"""The data gate on real Great Expectations 1.x, with sklearn's bundled breast-cancer data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from great_expectations.core.expectation_suite import ExpectationSuite
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

from canaryflow.core.settings import GateSettings
from validation.data import build_suite, check_data, suite_from_json, suite_to_json, validate_frame
from validation.results import Outcome

# 1 table expectation + 30 features x (not null, numeric type, in range)
TOTAL = 91


@pytest.fixture(scope="module")
def split() -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    data = load_breast_cancer(as_frame=True)
    frame = data.frame.rename(columns={"target": "label"})
    reference, holdout = train_test_split(frame, test_size=0.3, random_state=0, stratify=frame["label"])
    return reference, holdout, list(data.feature_names)


@pytest.fixture(scope="module")
def suite(split: tuple[pd.DataFrame, pd.DataFrame, list[str]]) -> ExpectationSuite:
    reference, _, features = split
    return build_suite(reference, features)


def test_clean_holdout_passes_and_writes_files(split, suite, tmp_path: Path) -> None:
    _, holdout, _ = split
    result = check_data(holdout, suite, GateSettings().data_max_failed_ratio, tmp_path)
    assert result.outcome is Outcome.PASSED
    assert result.reason == f"0 of {TOTAL} expectations failed (0.0% <= 0.0%)"
    files = [str(tmp_path / "expectation_suite.json"), str(tmp_path / "data_validation.json")]
    assert result.measured["files"] == files
    saved = json.loads((tmp_path / "data_validation.json").read_text())
    assert saved["success"] is True and len(saved["results"]) == TOTAL
    assert len(suite_from_json(tmp_path / "expectation_suite.json").expectations) == TOTAL


def test_nan_in_holdout_fails(split, suite, tmp_path: Path) -> None:
    _, holdout, _ = split
    broken = holdout.copy()
    broken.iloc[:3, broken.columns.get_loc("mean radius")] = np.nan
    result = check_data(broken, suite, 0.0, tmp_path)
    assert result.outcome is Outcome.FAILED
    assert result.reason == (f"1 of {TOTAL} expectations failed (1.1% > 0.0%): "
                             "expect_column_values_to_not_be_null(mean radius) 3 of 171 unexpected (1.8%)")
    assert result.measured["failed_expectations"] == ["expect_column_values_to_not_be_null(mean radius)"]


def test_failures_within_the_allowed_ratio_pass(split, suite, tmp_path: Path) -> None:
    _, holdout, _ = split
    broken = holdout.copy()
    broken.iloc[0, broken.columns.get_loc("mean radius")] = np.nan
    result = check_data(broken, suite, 0.05, tmp_path)
    assert result.passed
    assert result.reason.startswith(f"1 of {TOTAL} expectations failed (1.1% <= 5.0%): ")


def test_missing_column_and_unit_change_are_named(split, suite, tmp_path: Path) -> None:
    _, holdout, _ = split
    broken = holdout.drop(columns=["worst area"])
    broken["mean area"] = broken["mean area"] * 1000  # a unit change moves every row out of range
    result = check_data(broken, suite, 0.0, tmp_path)
    assert result.reason == (f"5 of {TOTAL} expectations failed (5.5% > 0.0%): "
                             "expect_table_columns_to_match_set missing ['worst area']; "
                             "expect_column_values_to_be_between(mean area) 171 of 171 unexpected (100.0%); "
                             "expect_column_values_to_not_be_null(worst area) column missing (+2 more)")


def test_range_rule_widens_by_a_quarter_of_the_range() -> None:
    reference = pd.DataFrame({"x": [0.0, 10.0, 4.0], "const": [2.0, 2.0, 2.0], "zero": [0, 0, 0],
                              "kind": ["a", "b", "a"]})
    suite = suite_to_json(build_suite(reference, ["x", "const", "zero", "kind"]))
    between = {e["kwargs"]["column"]: (e["kwargs"]["min_value"], e["kwargs"]["max_value"], e["kwargs"]["mostly"])
               for e in suite["expectations"] if e["type"] == "expect_column_values_to_be_between"}
    assert between == {"x": (-2.5, 12.5, 0.95), "const": (1.5, 2.5, 0.95), "zero": (0.0, 0.0, 0.95)}
    in_set = [e["kwargs"] for e in suite["expectations"] if e["type"] == "expect_column_values_to_be_in_set"]
    assert in_set == [{"column": "kind", "value_set": ["a", "b"]}]


def test_suite_round_trip_validates_chunks(split, suite) -> None:
    reference, holdout, features = split
    restored = suite_from_json(json.dumps(suite_to_json(suite)))
    chunk = holdout.iloc[:40].copy()
    chunk["mean radius"] = chunk["mean radius"].astype("Float64")  # nullable dtypes are read as float64
    assert validate_frame(chunk, restored).failed == []
    chunk["mean texture"] = "n/a"
    outcomes = validate_frame(chunk, restored).failed
    assert [o.label for o in outcomes] == ["expect_column_values_to_be_in_type_list(mean texture)",
                                           "expect_column_values_to_be_between(mean texture)"]
    assert outcomes[0].detail == "40 of 40 unexpected (100.0%)"
    assert outcomes[1].detail.startswith("raised: ")  # GE cannot compare strings with numeric bounds


def test_build_suite_needs_the_feature_columns(split) -> None:
    reference, _, _ = split
    with pytest.raises(KeyError, match="nope"):
        build_suite(reference, ["mean radius", "nope"])
