"""In-process prediction with an MLflow model of any flavor, as class probabilities (quality gate, reference)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from canaryflow.core import serving_contract


def to_probabilities(scores: np.ndarray) -> np.ndarray:
    """Class scores -> probabilities exactly as the handler answers (the serving contract's rule), output kind
    detected."""
    out = np.asarray(scores, dtype=np.float32)
    return serving_contract.to_probabilities(out, serving_contract.output_kind(out)).astype(np.float64)


def load_predictor(model_dir: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function from float32 rows to class probabilities, through MLflow's pyfunc of the model."""
    import mlflow.pyfunc
    import pandas as pd

    model = mlflow.pyfunc.load_model(str(model_dir))
    spec = model.metadata.get_input_schema()
    names = None if spec is None or spec.is_tensor_spec() else spec.input_names()

    def call(rows: np.ndarray) -> np.ndarray:
        data = pd.DataFrame(rows, columns=names) if names else rows
        out = model.predict(data)
        return np.asarray(out.to_numpy() if hasattr(out, "to_numpy") else out, dtype=np.float64)

    def predict(rows: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        try:
            scores = call(rows)
        except Exception:
            # a pt2 model logged with a 1-row example only takes batch 1
            scores = np.concatenate([call(rows[i:i + 1]) for i in range(len(rows))])
        return to_probabilities(scores)

    return predict
