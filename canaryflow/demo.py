"""`canaryflow demo`: train a small real classifier, register it, and watch the webhook release it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx
import numpy as np

from canaryflow.errors import StackError
from canaryflow.registry import REASON_TAG, STATUS_TAG
from canaryflow.settings import Settings

DEMO_MODEL = "breast-cancer-classifier"


def train_classifier(seed: int = 0, epochs: int = 300):  # noqa: ANN201 - (module, train, holdout, accuracy)
    """An MLP on scikit-learn's bundled breast-cancer data (no download); standardisation is in the model."""
    import torch
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    X, y = load_breast_cancer(return_X_y=True)
    X = X.astype(np.float32)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    torch.manual_seed(seed)

    class Classifier(torch.nn.Module):
        def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
            super().__init__()
            self.register_buffer("mean", torch.from_numpy(mean))
            self.register_buffer("std", torch.from_numpy(std))
            self.net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 64), torch.nn.ReLU(),
                                           torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net((x - self.mean) / self.std)

    model = Classifier(X_tr.mean(axis=0), X_tr.std(axis=0) + 1e-6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(X_tr), torch.from_numpy(y_tr).long()
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(X_te)).argmax(1).numpy() == y_te).mean())
    return model, (X_tr, y_tr), (X_te, y_te), acc


def register_model(tracking_uri: str, name: str = DEMO_MODEL, seed: int = 0) -> tuple[str, np.ndarray, float]:
    """Train, log and register one version; returns (version, holdout rows, holdout accuracy)."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from canaryflow.datasets import frame, log_release_datasets

    model, (X_tr, y_tr), (X_te, y_te), acc = train_classifier(seed)

    with torch.no_grad():
        logits = model(torch.from_numpy(X_te[:5])).numpy()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("canaryflow-demo")
    with mlflow.start_run(run_name=f"train-{name}"):
        mlflow.log_metric("holdout_accuracy", acc)
        log_release_datasets(frame(X_tr, y_tr), frame(X_te, y_te))
        info = mlflow.pytorch.log_model(model, name="model", signature=infer_signature(X_te[:5], logits),
                                        input_example=X_te[:5], registered_model_name=name)
    return str(info.registered_model_version), X_te, acc


@dataclass
class ReleaseOutcome:
    status: str
    reason: str
    seconds: float


def wait_for_release(tracking_uri: str, name: str, version: str, timeout_s: float = 600.0) -> ReleaseOutcome:
    """Poll the version's canaryflow.status tag until the release ends."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        tags = client.get_model_version(name, version).tags
        if tags.get(STATUS_TAG) in ("released", "rejected", "failed"):
            return ReleaseOutcome(tags[STATUS_TAG], tags.get(REASON_TAG, ""), time.monotonic() - started)
        time.sleep(1)
    raise StackError(f"no release of {name} v{version} finished within {timeout_s:.0f} s; "
                     "check the Prefect UI and the worker log")


def find_flow_run(settings: Settings, name: str, version: str) -> dict | None:
    """The release flow run Prefect holds for this version (by its run name)."""
    body = {"flow_runs": {"name": {"any_": [f"release-{name}-v{version}"]}}, "limit": 1}
    resp = httpx.post(f"{settings.prefect_api_url}/flow_runs/filter", json=body, timeout=10)
    runs = resp.json() if resp.status_code == 200 else []
    return runs[0] if runs else None


def predict(settings: Settings, name: str, rows: np.ndarray) -> tuple[dict, str, str]:
    """A real prediction through the router, its request id, and the curl command that repeats it."""
    body = json.dumps({"inputs": np.round(rows.astype(np.float64), 4).tolist()})
    url = f"{settings.router_url}/predictions/{name}"
    resp = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    resp.raise_for_status()
    curl = f"curl -s -X POST {url} -H 'Content-Type: application/json' -d '{body}'"
    return resp.json(), resp.headers.get("X-Request-ID", ""), curl
