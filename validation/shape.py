"""The shape gate: the model takes the signature's input and answers one row per input row."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from validation.results import GateResult, failed, passed


def check_shape(predict: Callable[[np.ndarray], np.ndarray], n_features: int, rows: np.ndarray) -> GateResult:
    """Run ``predict`` on a batch shaped by the signature and check the answer's shape and values."""
    gate = "shape"
    if rows.ndim != 2 or rows.shape[1] != n_features:
        return failed(gate, f"example has shape {list(rows.shape)}, signature expects [-1, {n_features}]")
    try:
        out = np.asarray(predict(rows))
    except Exception as exc:  # the model's own error is the measurement here
        return failed(gate, f"model raised {type(exc).__name__} on a {len(rows)}-row batch: {exc}"[:500])
    if out.ndim == 0 or out.shape[0] != len(rows):
        return failed(gate, f"output shape {list(out.shape)} for {len(rows)} input rows; expected "
                            f"{len(rows)} rows", output_shape=list(out.shape))
    if not np.isfinite(out).all():
        return failed(gate, f"output has {int((~np.isfinite(out)).sum())} non-finite values on the example")
    return passed(gate, f"{len(rows)} x {n_features} in -> {list(out.shape)} out, all finite",
                  output_shape=list(out.shape))
