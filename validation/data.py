"""The data gate: the holdout (later: every batch-inference chunk) must look like the reference data.

The expectation suite is derived from the reference data once (:func:`build_suite`), stored as JSON next to
the model (:func:`suite_to_json` / :func:`suite_from_json`) and replayed on any DataFrame
(:func:`validate_frame`). Great Expectations 1.x runs in an ephemeral context with its progress bars off;
it is imported lazily because it takes seconds to import and most callers of this package never need it.

Range rule, measured on sklearn's breast-cancer and wine data over 100 random 70/30 splits: exact reference
min/max fail 94-97 % of benign splits (holdout extremes of heavy-tailed features land outside), and even
min/max widened by 10 % of the range failed most of them. Values must lie in
``[min - 0.25 * range, max + 0.25 * range]`` for at least 95 % of the rows: that failed 0 of 100 benign splits
while a unit change, sign flip or sentinel value (which moves most rows) still fails. Subtle shifts are the
drift gate's job, not this one's. Missing values are never tolerated: the model cannot score them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from validation.results import GateResult, Outcome, judged

if TYPE_CHECKING:
    from great_expectations.core.expectation_suite import ExpectationSuite

GATE = "data"
RANGE_MARGIN = 0.25  # share of the reference range added on each side
RANGE_MOSTLY = 0.95  # share of rows that must fall inside the widened range
NUMERIC_TYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64"]
MAX_SET_SIZE = 100  # non-numeric columns with at most this many distinct values get a value-set check


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation's verdict on one DataFrame."""

    expectation: str
    column: str | None
    success: bool
    detail: str  # what was observed, e.g. "4 of 171 unexpected (2.3%)"

    @property
    def label(self) -> str:
        return f"{self.expectation}({self.column})" if self.column else self.expectation


@dataclass(frozen=True)
class FrameValidation:
    """All expectations of a suite on one DataFrame, and GE's raw result (JSON-safe)."""

    outcomes: list[ExpectationOutcome]
    raw: dict[str, Any]

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    @property
    def failed_ratio(self) -> float:
        return len(self.failed) / len(self.outcomes) if self.outcomes else 0.0


def build_suite(reference: pd.DataFrame, feature_columns: list[str], name: str = "reference",
                margin: float = RANGE_MARGIN, mostly: float = RANGE_MOSTLY) -> ExpectationSuite:
    """Expectations derived from the reference data: columns present, no nulls, numeric and in range."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    _context()  # GE 1.x wants a current context even for an unsaved suite
    missing = [c for c in feature_columns if c not in reference.columns]
    if missing:
        raise KeyError(f"reference data lacks feature columns {missing}")
    suite = gx.ExpectationSuite(name=name, meta={"range_margin": margin, "range_mostly": mostly})
    # extra columns (label, ids) are fine; a missing feature is not
    suite.add_expectation(gxe.ExpectTableColumnsToMatchSet(column_set=list(feature_columns), exact_match=False))
    frame = _normalized(reference)
    for col in feature_columns:
        values = frame[col]
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=col))
        if values.isna().all():  # nothing to derive a range or a value set from
            continue
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            lo, hi = float(values.min()), float(values.max())
            # a constant column still gets room proportional to its value (0 stays exactly 0)
            pad = margin * (hi - lo) if hi > lo else margin * abs(lo)
            suite.add_expectation(gxe.ExpectColumnValuesToBeInTypeList(column=col, type_list=NUMERIC_TYPES))
            suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column=col, min_value=lo - pad,
                                                                   max_value=hi + pad, mostly=mostly))
        elif values.nunique() <= MAX_SET_SIZE:
            suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(
                column=col, value_set=sorted(values.dropna().unique().tolist(), key=str)))
    return suite


def suite_to_json(suite: ExpectationSuite) -> dict[str, Any]:
    """The suite as a JSON-ready dict (store it next to the model for batch inference)."""
    return _json_safe(suite.to_json_dict())


def suite_from_json(data: dict[str, Any] | str | Path) -> ExpectationSuite:
    """A suite from :func:`suite_to_json`'s dict, a JSON string or a JSON file."""
    import great_expectations as gx

    _context()
    if isinstance(data, Path):
        data = data.read_text()
    if isinstance(data, str):
        data = json.loads(data)
    return gx.ExpectationSuite(**{k: v for k, v in data.items() if k != "id"})


def validate_frame(frame: pd.DataFrame, suite: ExpectationSuite) -> FrameValidation:
    """Run every expectation of ``suite`` on ``frame`` in a fresh ephemeral GE context."""
    context = _context()
    batch = (context.data_sources.add_pandas("frame").add_dataframe_asset("frame")
             .add_batch_definition_whole_dataframe("whole").get_batch(batch_parameters={"dataframe":
                                                                                       _normalized(frame)}))
    result = batch.validate(suite)
    outcomes = [_outcome(r, set(frame.columns)) for r in result.results]
    # GE returns results in its own order; the suite's order keeps reasons stable and table checks first
    order = {(e.expectation_type, getattr(e, "column", None)): i for i, e in enumerate(suite.expectations)}
    outcomes.sort(key=lambda o: order.get((o.expectation, o.column), len(order)))
    return FrameValidation(outcomes, _json_safe(result.to_json_dict()))


def check_data(holdout: pd.DataFrame, suite: ExpectationSuite, max_failed_ratio: float,
               out_dir: Path) -> GateResult:
    """Gate: the share of failed expectations on the holdout must not exceed ``max_failed_ratio``."""
    thresholds = {"max_failed_ratio": max_failed_ratio}
    out_dir.mkdir(parents=True, exist_ok=True)
    suite_file, result_file = out_dir / "expectation_suite.json", out_dir / "data_validation.json"
    suite_file.write_text(json.dumps(suite_to_json(suite), indent=2))
    try:
        validation = validate_frame(holdout, suite)
    except Exception as exc:  # GE itself failed: no verdict on the data
        return GateResult(GATE, Outcome.ERROR, f"data validation could not run: {type(exc).__name__}: {exc}"[:500],
                          {"files": [str(suite_file)]}, thresholds)
    result_file.write_text(json.dumps(validation.raw, indent=2))
    failed, total = validation.failed, len(validation.outcomes)
    ratio = validation.failed_ratio
    ok = ratio <= max_failed_ratio
    reason = f"{len(failed)} of {total} expectations failed ({ratio:.1%} {'<=' if ok else '>'} {max_failed_ratio:.1%})"
    if failed:
        listed = "; ".join(f"{o.label} {o.detail}" for o in failed[:3])
        reason += f": {listed}" + (f" (+{len(failed) - 3} more)" if len(failed) > 3 else "")
    measured = {"failed_ratio": ratio, "failed": len(failed), "evaluated": total, "rows": len(holdout),
                "failed_expectations": [o.label for o in failed], "files": [str(suite_file), str(result_file)]}
    return judged(GATE, ok, reason, measured, thresholds)


def _context() -> Any:
    """A fresh in-memory GE context (it becomes GE's current one) with progress bars off."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # TQDM_DISABLE is ignored
    return context


def _outcome(result: Any, columns: set[str]) -> ExpectationOutcome:
    config = result.expectation_config
    column = config.kwargs.get("column")
    if column is not None and column not in columns:  # GE raises per metric; one word says it better
        return ExpectationOutcome(config.type, column, False, "column missing")
    return ExpectationOutcome(config.type, column, bool(result.success),
                              _detail(result.result or {}, result.exception_info or {}))


def _detail(res: dict[str, Any], exc_info: dict[str, Any]) -> str:
    if "unexpected_count" in res:
        return f"{res['unexpected_count']} of {res.get('element_count', '?')} unexpected " \
               f"({res.get('unexpected_percent') or 0.0:.1f}%)"
    details = res.get("details") or {}
    if isinstance(details.get("mismatched"), dict):
        return f"missing {details['mismatched'].get('missing', [])}"
    if "observed_value" in res:
        return f"observed {res['observed_value']}"
    # GE nests exceptions per metric: {metric_id: {"exception_message": ...}} or flat
    infos = [exc_info] if "exception_message" in exc_info else [v for v in exc_info.values() if isinstance(v, dict)]
    messages = [str(i.get("exception_message")) for i in infos if i.get("exception_message")]
    return f"raised: {messages[0][:120]}" if messages else ""


def _normalized(frame: pd.DataFrame) -> pd.DataFrame:
    # GE's pandas type check misreads nullable extension dtypes (Int64 is observed as int64 and fails);
    # as float64 they keep their values and NA becomes NaN, which the not-null check still catches
    ext = [c for c in frame.columns if isinstance(frame[c].dtype, pd.api.extensions.ExtensionDtype)
           and pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]
    return frame.astype({c: "float64" for c in ext}) if ext else frame


def _json_safe(value: Any) -> Any:
    # NaN/inf (e.g. unexpected values in GE's result) are not JSON; numpy scalars are not serializable
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
