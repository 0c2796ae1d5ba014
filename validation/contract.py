"""The contract gate: a candidate must accept exactly the inputs the champion accepts.

Callers of the serving endpoint were written against the champion's MLflow signature. A candidate whose
inputs differ (a column renamed, a type changed, a tensor narrowed) would break them, so it is rejected
unless the release explicitly allows a contract change. Output changes are listed for the record but do
not break the contract: the serving handler maps outputs, callers send inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from validation.results import GateResult, Outcome, judged

if TYPE_CHECKING:  # mlflow is heavy to import; the gate only reads attributes of the signature objects
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema

GATE = "contract"


def check_contract(candidate: ModelSignature | None, champion: ModelSignature | None,
                   allow_change: bool) -> GateResult:
    """Compare the candidate's input schema with the champion's; list every change found."""
    thresholds = {"allow_change": allow_change}
    if candidate is None or candidate.inputs is None:
        return GateResult(GATE, Outcome.FAILED, "candidate has no input signature: log the model with "
                          "signature=mlflow.models.infer_signature(X, y)", {}, thresholds)
    if champion is None or champion.inputs is None:
        return judged(GATE, True, "first release: no champion contract to compare",
                      {"inputs": describe(candidate.inputs)}, thresholds)
    inputs = schema_changes("input", champion.inputs, candidate.inputs)
    outputs = schema_changes("output", champion.outputs, candidate.outputs)
    measured: dict[str, Any] = {"input_changes": inputs, "output_changes": outputs,
                                "inputs": describe(candidate.inputs)}
    outputs_note = f"; outputs changed (not breaking): {', '.join(outputs)}" if outputs else ""
    if not inputs:
        return judged(GATE, True, f"inputs unchanged: {describe(candidate.inputs)}{outputs_note}",
                      measured, thresholds)
    if allow_change:
        return judged(GATE, True, f"contract change allowed: {', '.join(inputs)}{outputs_note}", measured,
                      thresholds)
    return judged(GATE, False, f"breaking input change: {', '.join(inputs)} (allow_contract_change is off)"
                               f"{outputs_note}", measured, thresholds)


def describe(schema: Schema | None) -> str:
    """A short description of a schema, e.g. ``tensor float32 [-1, 30]`` or ``30 columns``."""
    if schema is None:
        return "none"
    specs = schema.inputs
    if schema.is_tensor_spec():
        return ", ".join(f"tensor {_tensor(spec)}" for spec in specs)
    return f"{len(specs)} column{'s' if len(specs) != 1 else ''}"


def schema_changes(side: str, old: Schema | None, new: Schema | None) -> list[str]:
    """Every difference between two schemas, champion (``old``) first, e.g. ``column 'b' removed``."""
    if old is None and new is None:
        return []
    if old is None or new is None:
        return [f"{side} schema {describe(old)} -> {describe(new)}"]
    if old.is_tensor_spec() != new.is_tensor_spec():
        kinds = {True: "tensor-based", False: "column-based"}
        return [f"{side} {kinds[old.is_tensor_spec()]} -> {kinds[new.is_tensor_spec()]}"]
    if old.is_tensor_spec():
        return _tensor_changes(side, old, new)
    return _column_changes(old, new) if side == "input" else [f"output {c}" for c in _column_changes(old, new)]


def _column_changes(old: Schema, new: Schema) -> list[str]:
    named = old.has_input_names() and new.has_input_names()
    before = _specs_by_key(old, named)
    after = _specs_by_key(new, named)
    changes = []
    for key, spec in before.items():
        if key not in after:
            changes.append(f"column {key} removed")
            continue
        other = after[key]
        if _type(spec) != _type(other):
            changes.append(f"column {key} {_type(spec)} -> {_type(other)}")
        # a column that callers could leave out and now must send breaks them; the reverse does not
        if not spec.required and other.required:
            changes.append(f"column {key} optional -> required")
    changes += [f"column {key} added" for key in after if key not in before]
    return changes


def _tensor_changes(side: str, old: Schema, new: Schema) -> list[str]:
    named = old.has_input_names() and new.has_input_names()
    before = _specs_by_key(old, named)
    after = _specs_by_key(new, named)
    changes = []
    for key, spec in before.items():
        if key not in after:
            changes.append(f"{side} {key} removed")
            continue
        other = after[key]
        if spec.type != other.type:
            changes.append(f"{side} {key} dtype {spec.type} -> {other.type}")
        if list(spec.shape) != list(other.shape):  # -1 (any batch size) equals only -1
            changes.append(f"{side} {key} shape {list(spec.shape)} -> {list(other.shape)}")
    changes += [f"{side} {key} added" for key in after if key not in before]
    return changes


def _specs_by_key(schema: Schema, named: bool) -> dict[str, Any]:
    # unnamed specs can only be matched by position
    return {(f"'{spec.name}'" if named else f"#{i}"): spec for i, spec in enumerate(schema.inputs)}


def _type(spec: Any) -> str:
    # DataType is an enum (DataType.double -> "double"); Array/Object/Map types print themselves
    return getattr(spec.type, "name", None) or str(spec.type)


def _tensor(spec: Any) -> str:
    return f"{spec.type} {list(spec.shape)}"
