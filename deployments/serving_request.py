"""Request decoding and validation for the handler: a TorchServe request -> validated rows, or a 400 that says
exactly what is wrong (the row, the column, the value). Archived into every .mar next to the handler."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
from ts.utils.util import PredictionException

if TYPE_CHECKING:
    from canaryflow.core.serving_contract import ServingMeta

_REPR_MAX = 40


def _bad(message: str) -> PredictionException:
    return PredictionException(message, 400)


def _short(value: Any, limit: int = _REPR_MAX) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number" if isinstance(value, int | float) else type(value).__name__)


def _column(j: int, names: list[str] | None) -> str:
    return f"{j} ({names[j]!r})" if names else str(j)


def decode_body(request: dict[str, Any]) -> list[Any]:
    """The rows of one request, from whichever form TorchServe delivered its body in.

    TorchServe json-decodes the body only for Content-Type exactly ``application/json`` (bytes forwarded when
    that fails), utf-8-decodes ``text/*`` to str, and passes anything else as bytearray.
    """
    key = next((k for k in ("body", "data") if k in request), None)
    if key is None:
        raise _bad("empty request: no body")
    body = request[key]
    if isinstance(body, bytes | bytearray | str):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, deep nesting
            raise _bad(f"malformed JSON body: {str(e)[:120]}") from None
    if not isinstance(body, dict):
        raise _bad(f"body must be a JSON object with 'inputs' or 'instances', got {_json_type(body)}")
    keys = [k for k in ("inputs", "instances") if k in body]
    if len(keys) != 1:
        found = "both" if keys else f"neither (keys: {_short(sorted(body))})"
        raise _bad(f"body must have one of 'inputs' or 'instances', found {found}")
    rows = body[keys[0]]
    if not isinstance(rows, list):
        raise _bad(f"'{keys[0]}' must be a list of rows, got {_json_type(rows)}")
    if not rows:
        raise _bad(f"'{keys[0]}' is empty: send at least one row")
    return rows


def rows_to_array(rows: list[Any], meta: ServingMeta) -> np.ndarray:
    """Validate rows (lists, or objects keyed by feature name) and return an (n, n_features) array."""
    if len(rows) > meta.max_batch_rows:
        raise _bad(f"{len(rows)} rows in one request, more than the limit of {meta.max_batch_rows}")
    names, n = meta.feature_names, meta.n_features
    matrix = []
    for i, row in enumerate(rows):
        if isinstance(row, dict) and names:
            missing = [name for name in names if name not in row]
            unknown = [key for key in row if key not in meta._name_set]
            if missing or unknown:
                found = (f"{what} features {_short(keys, 200)}" for what, keys in
                         (("missing", missing), ("unknown", unknown)) if keys)
                raise _bad(f"row {i}: " + ", ".join(found))
            row = [row[name] for name in names]
        elif not isinstance(row, list):
            keyed = " or an object keyed by feature name" if names else " (this model has no feature names)"
            raise _bad(f"row {i} must be a list of {n} numbers{keyed}, got {_json_type(row)}")
        elif len(row) != n:
            raise _bad(f"row {i} has {len(row)} values, expected {n}")
        for j, v in enumerate(row):
            if type(v) is not float and type(v) is not int:  # bool subclasses int: refuse it too
                why = " (booleans are refused)" if isinstance(v, bool) else ""
                raise _bad(f"row {i}, column {_column(j, names)}: {_short(v)} is not a number{why}")
        matrix.append(row)
    dtype = np.dtype(meta.input_dtype)
    with np.errstate(over="ignore"):
        try:
            array = np.asarray(matrix, dtype=dtype)
            if np.isfinite(array).all():
                return array
        except OverflowError:  # an int too large even for float64
            pass
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                try:
                    finite = bool(np.isfinite(dtype.type(v)))
                except OverflowError:
                    finite = False
                if not finite:
                    raise _bad(f"row {i}, column {_column(j, names)}: {_short(v)} is not a finite "
                               f"{dtype} value (NaN, infinity or out of range)")
    raise AssertionError("unreachable: a non-finite value was detected but not located")



def marked(context: Any, idx: int, header: str) -> bool:
    """Whether request ``idx`` of a batch carries ``header`` (the router's pin or the replay marker)."""
    try:
        names = context.get_all_request_header(idx) if context is not None else {}
    except (AttributeError, IndexError, KeyError):
        return False
    return any(str(name).lower() == header for name in names)

