"""The datasets a release validates against, by convention logged on the model's training run.

Convention (documented in README): the run that logged the model also logs two Parquet artifacts,
``canaryflow/reference.parquet`` (training data, or a sample of it) and ``canaryflow/holdout.parquet``
(data the model never saw), each with the model's feature columns and a label column
(``CANARYFLOW_GATES__LABEL_COLUMN``, default ``label``). :func:`log_release_datasets` writes them.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from canaryflow.core.errors import RegistryError

REFERENCE = "canaryflow/reference.parquet"
HOLDOUT = "canaryflow/holdout.parquet"


@dataclass(frozen=True)
class ReleaseData:
    """Reference and holdout frames plus the column roles."""

    reference: pd.DataFrame
    holdout: pd.DataFrame
    feature_columns: list[str]
    label_column: str

    def features(self, frame: pd.DataFrame) -> np.ndarray:
        return frame[self.feature_columns].to_numpy(dtype=np.float32)


def frame(x: np.ndarray, y: np.ndarray | None, feature_names: list[str] | None = None,
          label_column: str = "label") -> pd.DataFrame:
    """Rows and labels as a DataFrame with the column names a release expects."""
    names = feature_names or [f"f{i}" for i in range(x.shape[1])]
    df = pd.DataFrame(np.asarray(x), columns=names)
    if y is not None:
        df[label_column] = np.asarray(y)
    return df


def log_release_datasets(reference: pd.DataFrame, holdout: pd.DataFrame) -> None:
    """Log both frames as artifacts of the active MLflow run (the data scientist's side of the convention)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        for name, df in (("reference.parquet", reference), ("holdout.parquet", holdout)):
            df.to_parquet(Path(tmp) / name, index=False)
            mlflow.log_artifact(str(Path(tmp) / name), artifact_path="canaryflow")


def load_release_data(tracking_uri: str, run_id: str | None, dst: Path, label_column: str,
                      feature_names: list[str] | None, n_features: int) -> ReleaseData:
    """Download and check the two frames of a training run; RegistryError says what is missing."""
    import mlflow.artifacts

    if not run_id:
        raise RegistryError("the model version has no training run, so no reference/holdout data: log the model "
                            f"inside a run that also logs {REFERENCE} and {HOLDOUT}")
    frames = []
    for artifact in (REFERENCE, HOLDOUT):
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(dst),
                                                       tracking_uri=tracking_uri)
        except Exception as exc:  # MLflow raises several types for a missing artifact
            raise RegistryError(f"training run {run_id} has no {artifact} (see README, 'Release data'): {exc}"
                                [:500]) from exc
        frames.append(pd.read_parquet(path))
    reference, holdout = frames
    features = [c for c in reference.columns if c != label_column]
    if feature_names and features != list(feature_names):
        raise RegistryError(f"reference columns {features[:5]}... do not match the signature's {feature_names[:5]}...")
    if len(features) != n_features:
        raise RegistryError(f"reference has {len(features)} feature columns, the signature {n_features}")
    for name, df in (("reference", reference), ("holdout", holdout)):
        if label_column not in df.columns:
            raise RegistryError(f"{name} data has no label column {label_column!r}")
        if list(df.drop(columns=[label_column]).columns) != features:
            raise RegistryError(f"{name} data columns differ from the reference's")
    return ReleaseData(reference, holdout, features, label_column)


def load_traffic(path: Path, feature_columns: list[str], max_rows: int = 5000) -> pd.DataFrame:
    """The most recent served rows the handler sampled for a model (rotated file first); rows whose width does
    not match the features (an older contract) are skipped."""
    import json

    rows: list[list[float]] = []
    for part in (path.with_name(path.name + ".1"), path):
        if part.exists():
            for line in part.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by rotation
                if isinstance(row, list) and len(row) == len(feature_columns):
                    rows.append(row)
    return pd.DataFrame(rows[-max_rows:], columns=feature_columns, dtype=np.float64)
