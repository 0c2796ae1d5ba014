"""`canaryflow demo`: train a small real classifier, register it, and watch the webhook release it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from canaryflow.core.errors import OrchestrationError, StackError
from canaryflow.core.settings import Settings, get_settings
from canaryflow.core.state import FINAL, Tag
from canaryflow.intake.launcher import prefect_launcher

DEMO_MODEL = "breast-cancer-classifier"
# The demo's ramp: shorter than the defaults (5/25/50/100 %, 30 s, 50 requests) so it ends in a few minutes.
DEMO_CANARY = {"CANARYFLOW_CANARY__STEPS": "[10, 25, 50, 100]", "CANARYFLOW_CANARY__INTERVAL_S": "5",
               "CANARYFLOW_CANARY__MIN_REQUESTS": "30", "CANARYFLOW_CANARY__RETIRE_GRACE_S": "5",
               "CANARYFLOW_CANARY__BAKE_S": "10"}


@dataclass(frozen=True)
class Segment:
    """Rows whose feature ``column`` is above ``above``: rare in the holdout, common in the demo's live traffic."""

    column: int
    above: float
    name: str

    def describe(self) -> str:
        return f"{self.name} (f{self.column}) > {self.above:g}"


def rare_segment(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, names: list[str],
                 min_train_rows: int = 5) -> Segment:
    """The feature region the holdout barely has (above its second-largest value) with the most mixed labels in
    training: a feature that does not decide the class alone, so a fault there keeps the class balance."""
    best: tuple[float, Segment] | None = None
    for j in range(x_tr.shape[1]):
        above = float(np.sort(x_te[:, j])[-2])
        hit = x_tr[:, j] > above
        if hit.sum() < min_train_rows:
            continue
        mixed = 1.0 - abs(float(y_tr[hit].mean()) - 0.5) * 2  # 1.0 = half and half
        if best is None or mixed > best[0]:
            best = (mixed, Segment(j, above, str(names[j])))
    assert best is not None, "no feature has a rare region with training rows"
    return best[1]


def segment_rows(x_te: np.ndarray, y_te: np.ndarray, segment: Segment, n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct rows in the segment: holdout rows whose one feature reads 1-15 % above the holdout's range
    (a new source of live traffic, e.g. a scanner that reports that feature higher; the others keep their
    distribution, so the drift gate sees one drifted column, not a new population). Half of each class, so a
    fault that inverts the answers there keeps the class balance."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(y_te == c), k, replace=False) for c, k in ((0, n // 2), (1, n - n // 2))]
    rows = x_te[np.concatenate(picks)].copy()
    rows[:, segment.column] = segment.above * rng.uniform(1.01, 1.15, n)
    return rows.astype(np.float32)


def live_rows(seed: int = 0, extra: int = 40) -> tuple[np.ndarray, Segment]:
    """The demo's live traffic: the holdout rows plus ``extra`` rows from the rare segment (about a fifth)."""
    rows, _, segment = labelled_live_rows(seed, extra)
    return rows, segment


def labelled_live_rows(seed: int = 0, extra: int = 40) -> tuple[np.ndarray, np.ndarray, Segment]:
    """:func:`live_rows` with their true labels (a segment row keeps the class of the holdout row it came from:
    only the reading of one feature moved)."""
    from sklearn.datasets import load_breast_cancer

    _, (x_tr, y_tr), (x_te, y_te), _ = train_classifier(seed, epochs=0)
    segment = rare_segment(x_tr, y_tr, x_te, list(load_breast_cancer().feature_names))
    labels = np.concatenate([y_te, np.repeat([0, 1], [extra // 2, extra - extra // 2])])
    return np.concatenate([x_te, segment_rows(x_te, y_te, segment, extra, seed)]), labels, segment


def train_classifier(seed: int = 0, epochs: int = 300,  # noqa: ANN201 - (module, train, holdout, accuracy)
                     flip_labels: bool = False, fault: Segment | None = None):
    """An MLP on scikit-learn's bundled breast-cancer data (no download); standardisation is in the model.

    ``fault``: the trained model inverts its answers for rows in that segment (a bug in its own forward, e.g. a
    feature pipeline that mis-scales values past the range it was tested on)."""
    import torch
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    X, y = load_breast_cancer(return_X_y=True)
    X = X.astype(np.float32)
    if flip_labels:
        y = 1 - y
    # one fixed evaluation split (as a team would keep): versions differ by initialisation, not by holdout
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
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
    if fault is not None:
        model = SegmentFault(model, fault.column, fault.above)
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(X_te)).argmax(1).numpy() == y_te).mean())
    return model, (X_tr, y_tr), (X_te, y_te), acc


def _segment_fault_class():  # noqa: ANN202 - torch is imported lazily (nothing at import time)
    import torch

    class _SegmentFault(torch.nn.Module):
        """A model whose scores are reversed for rows with feature ``column`` > ``above``."""

        def __init__(self, inner: torch.nn.Module, column: int, above: float) -> None:
            super().__init__()
            self.inner, self.column, self.above = inner, column, above

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.inner(x)
            hit = (x[:, self.column] > self.above).unsqueeze(1)
            return torch.where(hit, out.flip(1), out)

    return _SegmentFault


def SegmentFault(inner, column: int, above: float):  # noqa: ANN001, ANN201, N802 - a class built lazily
    return _segment_fault_class()(inner, column, above)


def register_model(tracking_uri: str, name: str = DEMO_MODEL, seed: int = 0, flip_labels: bool = False,
                   tags: dict[str, Any] | None = None,
                   fault: Segment | None = None) -> tuple[str, np.ndarray, float]:
    """Train, log and register one version; returns (version, holdout rows, holdout accuracy).

    ``tags`` are set on the version at its creation (values JSON-encoded unless strings), so the release the
    webhook starts already sees them (e.g. ``canaryflow.chaos``).

    ``flip_labels`` simulates a data bug upstream of training: the labels are inverted in the training AND the
    holdout data: the quality gate's own-holdout comparison looks fine, and its cross-check on the champion's
    holdout (gate ``quality_cross``) refuses it. ``fault``: see :func:`train_classifier`; every offline gate
    passes (the holdout barely has the segment) and only the canary's pairwise replay sees it.
    """
    import mlflow

    model, train, (X_te, y_te), acc = train_classifier(seed, flip_labels=flip_labels, fault=fault)
    model_uri = log_trained(tracking_uri, "canaryflow-demo", name, model, train, (X_te, y_te), acc)
    encoded = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (tags or {}).items()}
    mv = mlflow.register_model(model_uri, name, tags=encoded)
    return str(mv.version), X_te, acc


def pinned_requirements(*dists: str) -> list[str]:
    """``name==version`` of installed distributions (a local label such as ``+cpu`` dropped), for ``log_model``'s
    ``pip_requirements``: given them, MLflow skips inferring them, which loads the model in a subprocess (about
    6 s per model logged on these machines)."""
    from importlib.metadata import version

    return [f"{dist}=={version(dist).split('+')[0]}" for dist in dists]


def log_trained(tracking_uri: str, experiment: str, name: str, model: Any, train: tuple[np.ndarray, np.ndarray],
                holdout: tuple[np.ndarray, np.ndarray], accuracy: float) -> str:
    """Log a trained PyTorch model the way a data scientist does (MLflow's default pt2, a signature and an input
    example, the release datasets beside it) in a run of ``experiment``; its model URI."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from canaryflow.model.datasets import frame, log_release_datasets

    x_te = holdout[0]
    with torch.no_grad():
        logits = model(torch.from_numpy(x_te[:5])).numpy()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"train-{name}"):
        mlflow.log_metric("holdout_accuracy", accuracy)
        log_release_datasets(frame(*train), frame(*holdout))
        info = mlflow.pytorch.log_model(model, name="model", signature=infer_signature(x_te[:5], logits),
                                        input_example=x_te[:5],
                                        pip_requirements=pinned_requirements("mlflow", "torch", "numpy"))
    return info.model_uri


@dataclass
class ReleaseOutcome:
    status: str
    reason: str
    seconds: float


def wait_for_release(tracking_uri: str, name: str, version: str, timeout_s: float = 600.0,
                     settings: Settings | None = None) -> ReleaseOutcome:
    """Poll the version's canaryflow.status tag until the release ends (see :func:`watch_release`)."""
    return watch_release(tracking_uri, name, version, None, timeout_s, settings)


def watch_release(tracking_uri: str, name: str, version: str, on_decision: Callable[[str], None] | None,
                  timeout_s: float = 900.0, settings: Settings | None = None) -> ReleaseOutcome:
    """Poll the version's canaryflow.status tag until the release ends, calling ``on_decision`` (when given)
    with each canary analysis as it is persisted. A release that does not end within ``timeout_s`` is a
    :class:`StackError` saying where it stands: the version's status tag and its release flow runs' states on
    the Prefect server of ``settings`` (the process's settings when not given)."""
    from mlflow import MlflowClient

    from deployments.canary import CanaryStatus

    client = MlflowClient(tracking_uri)
    started, seen, tags = time.monotonic(), -1, {}
    while time.monotonic() - started < timeout_s:
        tags = client.get_model_version(name, version).tags
        raw = tags.get(Tag.CANARY)
        if raw and on_decision is not None:
            st = CanaryStatus.from_json(raw)
            if st.iterations > seen:
                seen = st.iterations
                what = "start" if st.iterations == 0 else f"analysis {st.iterations}"
                on_decision(f"{what}: {st.phase.value} at {st.weight:g}% - " + "; ".join(st.reasons or ["ramping"]))
        if tags.get(Tag.STATUS) in FINAL:
            return ReleaseOutcome(tags[Tag.STATUS], tags.get(Tag.REASON, ""), time.monotonic() - started)
        time.sleep(1)
    status = (f"status tag {tags[Tag.STATUS]!r} ({tags.get(Tag.REASON, '')[:160]})" if Tag.STATUS in tags
              else "no status tag (its release never began)")
    raise StackError(f"no release of {name} v{version} finished within {timeout_s:.0f} s: {status}; "
                     f"{release_runs_line(settings, name, version)}; check the Prefect UI and the worker log")


def release_runs_line(settings: Settings | None, name: str, version: str) -> str:
    """The version's release flow runs as one line (name, state and the state's message), for a report that must
    say where a release stands; what could not be read is said instead."""
    try:
        runs = prefect_launcher(settings or get_settings()).list_flow_runs(name, version)
    except Exception as exc:  # noqa: BLE001 - a diagnosis; the caller's error is what matters
        return f"its flow runs could not be read: {str(exc)[:160]}"
    if not runs:
        return "no release flow run (was the webhook delivered?)"
    states = []
    for run in runs:
        state = run.get("state") or {}
        message = " ".join(str(state.get("message") or "").split())[:200]
        states.append(f"{run.get('name')}: {state.get('name') or state.get('type')}" + (f" ({message})" if message
                                                                                         else ""))
    return "flow runs: " + "; ".join(states)


def mlflow_ui_url(settings: Settings) -> str:
    """The MLflow UI's link to print: the release experiment's runs in the classic view when it exists (a bare
    server link opens MLflow 3's GenAI overview), else the server."""
    from canaryflow.core.registry import MlflowRegistry

    try:
        return MlflowRegistry(settings.mlflow_uri).experiment_url(settings.release.experiment)
    except Exception:  # noqa: BLE001 - a link to print; the server's own page is a fine fallback
        return settings.mlflow_uri


def release_links(settings: Settings, name: str, version: str) -> list[str]:
    """Where a person reads one release in MLflow: its release run and its model version page."""
    from mlflow import MlflowClient

    from canaryflow.release.story import version_url

    links = [f"MLflow model version: {version_url(settings.mlflow_uri, name, version)}"]
    run_id = MlflowClient(settings.mlflow_uri).get_model_version(name, version).tags.get(Tag.RELEASE_RUN)
    if run_id:
        from canaryflow.core.registry import MlflowRegistry

        links.insert(0, f"MLflow release run: {MlflowRegistry(settings.mlflow_uri).run_url(run_id)}")
    return links


def find_flow_run(settings: Settings, name: str, version: str) -> dict | None:
    """The version's latest release flow run on the Prefect server, read through the launcher (so with the team's
    Prefect API key when one is set); None when there is none or Prefect cannot be read."""
    try:
        runs = prefect_launcher(settings).list_flow_runs(name, version)
    except OrchestrationError:
        return None
    return runs[-1] if runs else None


def predict(settings: Settings, name: str, rows: np.ndarray) -> tuple[dict, str, str]:
    """A real prediction through the router, its request id, and the curl command that repeats it."""
    body = json.dumps({"inputs": np.round(rows.astype(np.float64), 4).tolist()})
    url = f"{settings.router_url}/predictions/{name}"
    resp = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    resp.raise_for_status()
    curl = f"curl -s -X POST {url} -H 'Content-Type: application/json' -d '{body}'"
    return resp.json(), resp.headers.get("X-Request-ID", ""), curl
