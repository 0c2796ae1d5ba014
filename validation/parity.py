"""Parity of an optimized variant with the model it came from: the same holdout rows through both, compared as
predicted classes (argmax agreement) and as probabilities (max |difference|)."""

from __future__ import annotations

from typing import Any

import numpy as np

from canaryflow.core.settings import OptimizationSettings


def parity(got: np.ndarray, expected: np.ndarray, s: OptimizationSettings) -> dict[str, Any]:
    """Passed when the variant agrees on at least ``min_argmax_agreement`` of the rows and no probability moves
    by more than ``max_abs_diff``; the row of the optimization table (status, agreement, max_abs_diff, reason)."""
    agreement = float((got.argmax(axis=1) == expected.argmax(axis=1)).mean())
    diff = float(np.abs(got - expected).max())
    problems = ([f"agreement {agreement:.3f} < {s.min_argmax_agreement:.3f}"]
                if agreement < s.min_argmax_agreement else [])
    problems += [f"max |diff| {diff:.4f} > {s.max_abs_diff:.4f}"] if diff > s.max_abs_diff else []
    reason = ", ".join(problems) or (f"agreement {agreement:.3f} >= {s.min_argmax_agreement:.3f}, "
                                     f"max |diff| {diff:.2e} <= {s.max_abs_diff:.4f}")
    return {"status": "failed" if problems else "passed", "agreement": round(agreement, 6),
            "max_abs_diff": diff, "reason": reason}
