"""Row checks of a batch chunk: the model's signature and the release's data expectations, per row, vectorized.

The release's data gate stored a Great Expectations suite built from the training reference
(:func:`validation.data.build_suite`). Running GE itself on every chunk costs about a second per 64k rows and only
says how many rows broke an expectation, not which; so the suite's expectations are compiled here into numpy
predicates with GE's semantics (nulls include NaN, ranges ignore nulls and are inclusive unless strict), and a unit
test holds the counts to GE's own on the same frame. A row is bad when the model cannot score it (feature missing,
not numeric, null, NaN, infinite, out of the input dtype's range) or, with ``row_expectations`` on, when a value
lies outside the suite's range or value set. Each bad row gets a reason naming every broken check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_REASONS = 3  # per row; the rest are counted
_NOT_NULL = "expect_column_values_to_not_be_null"
_BETWEEN = "expect_column_values_to_be_between"
_IN_SET = "expect_column_values_to_be_in_set"
_COLUMN_CHECKS = {"expect_table_columns_to_match_set", "expect_column_values_to_be_in_type_list"}


@dataclass(frozen=True)
class Expectation:
    """One compiled expectation of the suite."""

    kind: str
    column: str
    kwargs: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.kind}({self.column})"


@dataclass
class Checked:
    """A chunk after the checks: the good rows as model input, and a reason for each bad row."""

    x: np.ndarray  # (good rows, features) in the model's input dtype
    good: np.ndarray  # bool per input row
    reasons: list[str]  # one per bad row, in row order
    unexpected: dict[str, int] = field(default_factory=dict)  # per expectation label, rows that broke it

    @property
    def n_bad(self) -> int:
        return len(self.reasons)


class RowChecks:
    """Checks compiled once from the feature columns, the input dtype and the release's suite (a JSON dict)."""

    def __init__(self, feature_columns: list[str], dtype: str = "float32", suite: dict[str, Any] | None = None,
                 row_expectations: bool = True) -> None:
        self.features, self.dtype, self.row_expectations = list(feature_columns), np.dtype(dtype), row_expectations
        self.expectations: list[Expectation] = []
        self.unsupported: list[str] = []
        for e in (suite or {}).get("expectations", []):
            kind, kwargs = e.get("type", ""), dict(e.get("kwargs") or {})
            if kind in (_NOT_NULL, _BETWEEN, _IN_SET) and kwargs.get("column"):
                self.expectations.append(Expectation(kind, kwargs.pop("column"), kwargs))
            elif kind not in _COLUMN_CHECKS:  # those two are covered by the signature checks
                self.unsupported.append(kind)
        self._arrow_type = pa.from_numpy_dtype(self.dtype)
        self._limits = _limits(self.features, self.dtype, self.expectations)

    def apply(self, table: pa.Table) -> Checked:
        """The chunk's rows as model input, and a reason for each bad row."""
        return self._clean(table) or self._detailed(table)

    def _clean(self, table: pa.Table) -> Checked | None:
        """The common case in one pass over the model input: every feature column already in the model's dtype
        without nulls, and every value inside its bounds (finite, and within the suite's ranges). None when that
        is not so: :meth:`_detailed` then finds which rows are bad and why.

        Equal to the detailed checks by construction: the column values are exactly the model input (same dtype),
        and :func:`_bounds` turns each range into the closed interval of representable values that pass it.
        """
        if self._limits is None or any(name not in table.column_names for name in self.features):
            return None
        columns = [table.column(name) for name in self.features]
        if any(c.type != self._arrow_type or c.null_count for c in columns):
            return None
        x = np.empty((table.num_rows, len(self.features)), dtype=self.dtype)
        for j, col in enumerate(columns):  # one copy: arrow's buffers, viewed, into the row-major model input
            start = 0
            for piece in col.chunks:
                x[start : start + len(piece), j] = piece.to_numpy(zero_copy_only=True)
                start += len(piece)
        lo, hi = self._limits
        if not ((x >= lo) & (x <= hi)).all():
            return None
        return Checked(x, np.ones(len(x), bool), [], {e.label: 0 for e in self.expectations})

    def _detailed(self, table: pa.Table) -> Checked:
        n = table.num_rows
        x = np.empty((n, len(self.features)), dtype=self.dtype)
        problems: list[tuple[np.ndarray, Any]] = []  # (row mask, message or per-row message function)
        floats: dict[str, np.ndarray] = {}
        broken: set[str] = set()  # missing or not numeric: every row already has its reason
        for j, name in enumerate(self.features):
            if name not in table.column_names:
                problems.append((np.ones(n, bool), f"column {name!r} is missing (the model's signature needs it)"))
                broken.add(name)
                continue
            col = table.column(name)
            if not _numeric(col.type):
                problems.append((np.ones(n, bool), f"column {name!r} has type {col.type}, the model needs numbers"))
                broken.add(name)
                continue
            values = floats[name] = _floats(col)
            with np.errstate(over="ignore", invalid="ignore"):
                x[:, j] = values
            null = _null_mask(col)
            nan = np.isnan(values) & ~null
            inf = np.isinf(values)
            overflow = ~np.isfinite(x[:, j]) & np.isfinite(values)
            for mask, what in ((null, "is null"), (nan, "is NaN"), (inf, "is infinite"),
                               (overflow, f"is out of {self.dtype} range")):
                if mask.any():
                    problems.append((mask, _value_message(name, values, what)))
        unexpected = {}
        for e in self.expectations:
            mask = self._unexpected(e, table, floats)
            unexpected[e.label] = int(mask.sum())
            reported = e.kind == _NOT_NULL or e.column in broken  # already a reason for these rows
            if e.column in floats:  # infinite values already have theirs
                mask = mask & np.isfinite(floats[e.column])
            if self.row_expectations and not reported and mask.any():
                problems.append((mask, _expectation_message(e, table)))
        bad = np.zeros(n, bool)
        for mask, _ in problems:
            bad |= mask
        return Checked(x[~bad] if bad.any() else x, ~bad, _reasons(bad, problems), unexpected)

    def _unexpected(self, e: Expectation, table: pa.Table, floats: dict[str, np.ndarray]) -> np.ndarray:
        n = table.num_rows
        if e.column not in table.column_names:
            return np.ones(n, bool)
        col = table.column(e.column)
        v = floats.get(e.column)
        if v is None and _numeric(col.type):
            v = _floats(col)
        if e.kind == _NOT_NULL:
            return _null_mask(col) | (np.isnan(v) if v is not None else False)
        if e.kind == _BETWEEN:
            if v is None:  # not numeric: GE counts every non-null value as unexpected
                return ~_null_mask(col)
            lo, hi = e.kwargs.get("min_value"), e.kwargs.get("max_value")
            out = np.zeros(n, bool)
            with np.errstate(invalid="ignore"):
                if lo is not None:
                    out |= (v <= lo) if e.kwargs.get("strict_min") else (v < lo)
                if hi is not None:
                    out |= (v >= hi) if e.kwargs.get("strict_max") else (v > hi)
            return out & ~np.isnan(v)
        inside = pc.is_in(col, value_set=pa.array(e.kwargs.get("value_set") or [], type=col.type))
        return ~inside.to_numpy(zero_copy_only=False) & ~_null_mask(col)


def _limits(features: list[str], dtype: np.dtype, expectations: list[Expectation]) -> \
        tuple[np.ndarray, np.ndarray] | None:
    """Per feature, the lowest and highest value of ``dtype`` that passes every range check (finite, in the
    suite's ranges); None when some expectation is not a range or not-null check on a feature (value sets are
    checked by the detailed path only)."""
    top = float(np.finfo(dtype).max)
    lo, hi = np.full(len(features), -top, dtype), np.full(len(features), top, dtype)
    for e in expectations:
        if e.column not in features or e.kind not in (_NOT_NULL, _BETWEEN):
            return None
        j = features.index(e.column)
        if e.kind == _BETWEEN:
            low, high = e.kwargs.get("min_value"), e.kwargs.get("max_value")
            if low is not None:
                lo[j] = max(lo[j], _bound(float(low), dtype, up=True, strict=bool(e.kwargs.get("strict_min"))))
            if high is not None:
                hi[j] = min(hi[j], _bound(float(high), dtype, up=False, strict=bool(e.kwargs.get("strict_max"))))
    return lo, hi


def _bound(limit: float, dtype: np.dtype, *, up: bool, strict: bool) -> float:
    """The first value of ``dtype`` from ``limit`` towards the inside (``up``: the smallest one >= limit, or >
    limit when ``strict``; else the largest one <= limit, or < limit): checking a ``dtype`` value against it is
    the same as checking its exact float64 value against ``limit``, as the detailed path does."""
    with np.errstate(over="ignore"):
        v = dtype.type(limit)
    outside = (float(v) < limit or (strict and float(v) == limit)) if up else \
        (float(v) > limit or (strict and float(v) == limit))
    return float(np.nextafter(v, dtype.type(np.inf if up else -np.inf))) if outside else float(v)


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _floats(col: pa.ChunkedArray) -> np.ndarray:
    return col.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False)


def _null_mask(col: pa.ChunkedArray) -> np.ndarray:
    if col.null_count == 0:
        return np.zeros(len(col), bool)
    return col.is_null().to_numpy(zero_copy_only=False)


def _value_message(name: str, values: np.ndarray, what: str):  # noqa: ANN202 - row index -> message
    return lambda i: f"{name} {what}" if what in ("is null", "is NaN") else f"{name}={float(values[i])!r} {what}"


def _expectation_message(e: Expectation, table: pa.Table):  # noqa: ANN202 - row index -> message
    col = table.column(e.column) if e.column in table.column_names else None
    if e.kind == _BETWEEN:
        lo, hi = e.kwargs.get("min_value"), e.kwargs.get("max_value")
        where = f"outside [{_num(lo)}, {_num(hi)}] (data expectation from the release's reference data)"
    else:
        where = "not in the reference's value set (data expectation)"
    return lambda i: f"{e.column}={col[i].as_py()!r} {where}" if col is not None else f"{e.column} is missing"


def _num(v: Any) -> str:
    return "unbounded" if v is None else f"{v:.6g}"


def _reasons(bad: np.ndarray, problems: list[tuple[np.ndarray, Any]]) -> list[str]:
    rows = np.flatnonzero(bad)
    if rows.size == 0:
        return []
    found: list[list[str]] = [[] for _ in range(rows.size)]
    for mask, message in problems:
        hit = np.flatnonzero(mask[rows])
        for k in hit:
            if len(found[k]) < MAX_REASONS:
                found[k].append(message(int(rows[k])) if callable(message) else message)
    counts = np.zeros(rows.size, int)
    for mask, _ in problems:
        counts += mask[rows]
    return ["; ".join(r[:MAX_REASONS]) + (f" (+{c - MAX_REASONS} more)" if c > MAX_REASONS else "")
            for r, c in zip(found, counts, strict=True)]
