"""The contract gate on real MLflow signatures."""

from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import DataType
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from validation.contract import check_contract
from validation.results import Outcome


def tensor_sig(features: int, dtype: type = np.float32, classes: int = 2, name: str | None = None) -> ModelSignature:
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(dtype), (-1, features), name)]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]))


def column_sig(**columns: DataType) -> ModelSignature:
    return ModelSignature(inputs=Schema([ColSpec(t, n) for n, t in columns.items()]))


def test_first_release_passes_without_champion() -> None:
    result = check_contract(tensor_sig(30), None, allow_change=False)
    assert result.outcome is Outcome.PASSED
    assert result.reason == "first release: no champion contract to compare"


def test_candidate_without_signature_fails() -> None:
    result = check_contract(None, tensor_sig(30), allow_change=True)
    assert result.outcome is Outcome.FAILED
    assert result.reason == ("candidate has no input signature: log the model with "
                             "signature=mlflow.models.infer_signature(X, y)")


def test_same_inferred_signature_passes() -> None:
    frame = pd.DataFrame({"age": [31.0, 40.0], "city": ["a", "b"]})
    sig = infer_signature(frame, np.array([0, 1]))
    result = check_contract(sig, infer_signature(frame, np.array([1, 0])), allow_change=False)
    assert result.passed
    assert result.reason == "inputs unchanged: 2 columns"
    assert result.measured["input_changes"] == []


def test_column_changes_break_the_contract() -> None:
    champion = column_sig(age=DataType.double, b=DataType.long, city=DataType.string)
    candidate = column_sig(age=DataType.string, city=DataType.string, c=DataType.double)
    result = check_contract(candidate, champion, allow_change=False)
    assert result.outcome is Outcome.FAILED
    assert result.reason == ("breaking input change: column 'age' double -> string, column 'b' removed, "
                             "column 'c' added (allow_contract_change is off)")
    assert result.thresholds == {"allow_change": False}


def test_allowed_change_passes_but_lists_it() -> None:
    result = check_contract(column_sig(age=DataType.string), column_sig(age=DataType.double), allow_change=True)
    assert result.passed
    assert result.reason == "contract change allowed: column 'age' double -> string"


def test_optional_column_becoming_required_breaks() -> None:
    champion = ModelSignature(inputs=Schema([ColSpec(DataType.double, "x"), ColSpec(DataType.long, "k", False)]))
    candidate = column_sig(x=DataType.double, k=DataType.long)
    result = check_contract(candidate, champion, allow_change=False)
    assert result.reason == "breaking input change: column 'k' optional -> required (allow_contract_change is off)"


def test_tensor_shape_change_breaks() -> None:
    result = check_contract(tensor_sig(29, name="x"), tensor_sig(30, name="x"), allow_change=False)
    assert result.outcome is Outcome.FAILED
    assert result.reason == "breaking input change: input 'x' shape [-1, 30] -> [-1, 29] (allow_contract_change is off)"


def test_unnamed_tensor_dtype_change_breaks() -> None:
    result = check_contract(tensor_sig(30, np.float64), tensor_sig(30), allow_change=False)
    assert result.reason == "breaking input change: input #0 dtype float32 -> float64 (allow_contract_change is off)"


def test_inferred_tensor_signatures_match_whatever_the_batch() -> None:
    # infer_signature makes the batch dim -1 whether the example had 1 or 5 rows
    one = infer_signature(np.zeros((1, 30), np.float32), np.zeros((1, 2), np.float32))
    five = infer_signature(np.zeros((5, 30), np.float32), np.zeros((5, 2), np.float32))
    result = check_contract(five, one, allow_change=False)
    assert result.reason == "inputs unchanged: tensor float32 [-1, 30]"


def test_output_change_is_reported_but_not_breaking() -> None:
    result = check_contract(tensor_sig(30, classes=3), tensor_sig(30), allow_change=False)
    assert result.passed
    assert result.reason == ("inputs unchanged: tensor float32 [-1, 30]; outputs changed (not breaking): "
                             "output #0 shape [-1, 2] -> [-1, 3]")
    assert result.measured["output_changes"] == ["output #0 shape [-1, 2] -> [-1, 3]"]


def test_columns_to_tensor_breaks() -> None:
    result = check_contract(tensor_sig(2), column_sig(a=DataType.double, b=DataType.double), allow_change=False)
    assert result.reason.startswith("breaking input change: input column-based -> tensor-based")
