"""Row checks of batch chunks: every kind of bad row gets a reason, and the compiled expectations count exactly
what Great Expectations counts on the same data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from canaryflow.batch.checks import RowChecks
from validation.data import build_suite, suite_from_json, suite_to_json, validate_frame

FEATURES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def suite() -> dict:
    rng = np.random.default_rng(0)
    reference = pd.DataFrame(rng.normal(size=(500, 3)), columns=FEATURES)
    reference["label"] = rng.integers(0, 2, 500)
    return suite_to_json(build_suite(reference, FEATURES))


def _bounds(suite: dict, column: str) -> tuple[float, float]:
    (e,) = [e for e in suite["expectations"]
            if e["type"] == "expect_column_values_to_be_between" and e["kwargs"]["column"] == column]
    return e["kwargs"]["min_value"], e["kwargs"]["max_value"]


def test_good_rows_pass_unchanged_as_float32(suite: dict) -> None:
    table = pa.table({"a": [0.1, 0.2], "b": pa.array([1, -1], pa.int64()), "c": [0.0, 0.5], "extra": ["x", "y"]})
    checked = RowChecks(FEATURES, "float32", suite).apply(table)
    assert checked.n_bad == 0 and checked.good.all()
    assert checked.x.dtype == np.float32
    np.testing.assert_array_equal(checked.x, np.array([[0.1, 1, 0], [0.2, -1, 0.5]], np.float32))


def test_each_kind_of_bad_row_is_rejected_with_its_reason(suite: dict) -> None:
    lo, hi = _bounds(suite, "b")
    table = pa.table({
        "a": pa.array([0.0, None, np.nan, np.inf, 1e39, 0.0, 0.0], pa.float64()),
        "b": [0.0, 0.0, 0.0, 0.0, 0.0, hi + 100, 0.0],
        "c": [0.0] * 7,
    })
    checked = RowChecks(FEATURES, "float32", suite).apply(table)
    assert checked.good.tolist() == [True, False, False, False, False, False, True]
    reasons = checked.reasons
    assert reasons[0] == "a is null"
    assert reasons[1] == "a is NaN"
    assert reasons[2] == "a=inf is infinite"
    assert reasons[3].startswith("a=1e+39 is out of float32 range")
    assert reasons[4] == f"b={hi + 100!r} outside [{lo:.6g}, {hi:.6g}] (data expectation from the release's " \
                         "reference data)"
    assert len(checked.x) == 2


def test_several_problems_in_one_row_are_all_named() -> None:
    table = pa.table({"a": pa.array([None], pa.float64()), "b": [np.nan], "c": [np.inf]})
    (reason,) = RowChecks(FEATURES).apply(table).reasons
    assert reason == "a is null; b is NaN; c=inf is infinite"


def test_missing_or_non_numeric_column_rejects_every_row(suite: dict) -> None:
    table = pa.table({"a": [1.0, 2.0], "b": ["1", "2"]})
    checked = RowChecks(FEATURES, "float32", suite).apply(table)
    assert checked.n_bad == 2 and not checked.good.any()
    assert checked.reasons[0] == ("column 'b' has type string, the model needs numbers; "
                                  "column 'c' is missing (the model's signature needs it)")
    assert checked.x.shape == (0, 3)


def test_row_expectations_off_keeps_out_of_range_rows_but_counts_them(suite: dict) -> None:
    _, hi = _bounds(suite, "a")
    table = pa.table({"a": [hi + 1, 0.0], "b": [0.0, 0.0], "c": [0.0, 0.0]})
    checked = RowChecks(FEATURES, "float32", suite, row_expectations=False).apply(table)
    assert checked.n_bad == 0 and len(checked.x) == 2
    assert checked.unexpected["expect_column_values_to_be_between(a)"] == 1


def test_compiled_expectations_count_what_great_expectations_counts(suite: dict) -> None:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(rng.normal(scale=2.5, size=(400, 3)), columns=FEATURES)  # wider: many out of range
    frame.loc[[3, 50, 77], "a"] = np.nan
    frame.loc[[5], "c"] = None
    checked = RowChecks(FEATURES, "float32", suite).apply(pa.Table.from_pandas(frame, preserve_index=False))
    ge = validate_frame(frame, suite_from_json(suite)).raw
    theirs = {f"{r['expectation_config']['type']}({r['expectation_config']['kwargs']['column']})":
              r["result"]["unexpected_count"] for r in ge["results"] if "unexpected_count" in r["result"]}
    assert theirs and checked.unexpected == theirs
    assert checked.unexpected["expect_column_values_to_not_be_null(a)"] == 3
    assert checked.unexpected["expect_column_values_to_be_between(b)"] > 10


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_one_pass_check_of_clean_chunks_agrees_with_the_detailed_checks(dtype: str, strict: bool) -> None:
    """Values on, just inside and just outside every bound (in the column's own dtype), NaN and infinities: the
    one-pass check either passes the whole chunk exactly when the detailed checks find no bad row, or defers."""
    lo, hi = -1.2345678901, 2.3456789012  # not representable in float32: the bounds must be rounded inwards
    suite = {"expectations": [
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": c}} for c in FEATURES] + [
        {"type": "expect_column_values_to_be_between",
         "kwargs": {"column": c, "min_value": lo, "max_value": hi, "strict_min": strict, "strict_max": strict}}
        for c in FEATURES]}
    t = np.dtype(dtype).type
    edges = [t(lo), t(hi), np.nextafter(t(lo), t(-np.inf)), np.nextafter(t(lo), t(np.inf)),
             np.nextafter(t(hi), t(-np.inf)), np.nextafter(t(hi), t(np.inf)), t(0), t(np.nan), t(np.inf),
             t(-np.inf)]
    checks = RowChecks(FEATURES, dtype, suite)
    for value in edges:
        column = np.array([0.5, value, -0.5], dtype)
        table = pa.table({c: pa.array(column if c == "b" else np.zeros(3, dtype)) for c in FEATURES})
        detailed, fast = checks._detailed(table), checks._clean(table)
        if fast is None:
            assert detailed.n_bad > 0, f"{value!r} deferred although every row is good"
        else:
            assert detailed.n_bad == 0, f"{value!r} passed although the detailed checks reject it"
            np.testing.assert_array_equal(fast.x, detailed.x)
            assert fast.unexpected == detailed.unexpected and fast.good.all()
        assert checks.apply(table).reasons == detailed.reasons


def test_chunks_the_one_pass_check_cannot_judge_get_the_detailed_checks(suite: dict) -> None:
    checks = RowChecks(FEATURES, "float32", suite)
    clean = {c: pa.array(np.zeros(4, np.float32)) for c in FEATURES}
    assert checks._clean(pa.table(clean)) is not None
    assert checks._clean(pa.Table.from_batches([pa.table(clean).to_batches()[0]] * 2)) is not None  # two pieces
    for a, good in ((pa.array(np.zeros(4)), [True] * 4),  # float64 column for a float32 model: rounding to check
                    (pa.array([0.0, None, 0.0, 0.0], pa.float32()), [True, False, True, True]),  # a null
                    (pa.array(np.zeros(4, np.int64)), [True] * 4)):
        assert checks._clean(pa.table({**clean, "a": a})) is None
        assert checks.apply(pa.table({**clean, "a": a})).good.tolist() == good
    in_set = {"expectations": [{"type": "expect_column_values_to_be_in_set",
                                "kwargs": {"column": "a", "value_set": [0.0]}}]}
    assert RowChecks(FEATURES, "float32", in_set)._clean(pa.table(clean)) is None
