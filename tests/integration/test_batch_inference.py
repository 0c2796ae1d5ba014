"""Batch inference on the real stack: a model released by the real pipeline scores real Parquet files through
the Prefect deployment (stopped half-way and resumed) and through the plain function (rejects, the fail policy,
clear errors that write nothing). `canaryflow score` killed with SIGKILL, or stopped by a full disk, and re-run:
tests/drills/test_batch_drills.py (it reuses the fixtures and helpers here)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
from mlflow import MlflowClient

from canaryflow.batch.manifest import MANIFEST, SUCCESS
from canaryflow.batch.run import run_batch
from canaryflow.core.errors import BatchError
from canaryflow.intake.launcher import PrefectLauncher
from canaryflow.local.demo import pinned_requirements, register_model, train_classifier, wait_for_release

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]
MODEL = "batch-it-model"
FEATURES = [f"f{i}" for i in range(30)]


@pytest.fixture(scope="module")
def released(stack) -> str:
    return release_model(stack)


def release_model(stack) -> str:
    """The released champion of MODEL, released once per session stack (tests/drills use it too)."""
    client = MlflowClient(stack.settings.mlflow_uri)
    if client.search_registered_models(f"name = '{MODEL}'"):
        return client.get_model_version_by_alias(MODEL, "champion").version
    # Batch scoring is in-process: the load test gate only has to let this model through on a busy machine.
    policy = {"loadtest": {"max_p95_ms": 5000, "min_rps": 1, "max_failure_ratio": 0.5}}
    client.create_registered_model(MODEL, tags={"canaryflow.policy": json.dumps(policy)})
    version, _, _ = register_model(stack.settings.mlflow_uri, name=MODEL, seed=0)
    outcome = wait_for_release(stack.settings.mlflow_uri, MODEL, version, timeout_s=400)
    assert outcome.status == "released", outcome
    return version


def _dataset(directory: Path, rows: list[int], seed: int = 0, bad: bool = False) -> Path:
    """Rows of the model's training split (its reference data), jittered by 1%, so none breaks the release's data
    expectations unless ``bad``; one Parquet file per entry of ``rows``."""
    _, (x, _), _, _ = train_classifier(seed=0, epochs=0)  # register_model(seed=0) trains on this split
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(rows):
        sample = x[rng.integers(0, len(x), n)] * rng.normal(1.0, 0.01, size=(n, 30))
        frame = pd.DataFrame(sample, columns=FEATURES)
        if bad and i == 0:
            frame.loc[3, "f2"] = None
            frame.loc[11, "f5"] = 1e9
        frame.to_parquet(directory / f"part-{i}.parquet", row_group_size=1000, index=False)
    return directory


def _run_dir(out: Path) -> Path:
    (manifest,) = out.glob(f"{MODEL}/v*/*/{MANIFEST}")
    return manifest.parent


def _assert_exactly_once(run_dir: Path, rows: int) -> ds.Dataset:
    assert (run_dir / SUCCESS).exists()
    scores = ds.dataset(run_dir / "scores", format="parquet").to_table(columns=["row_id"])
    assert scores.num_rows == rows
    assert len(set(scores.column("row_id").to_pylist())) == rows
    return scores


def _api(stack, method: str, path: str, body: dict | None = None) -> dict | list:
    """A Prefect API call that rides out a busy server (503 while SQLite is locked), as the pipeline's own calls
    do: through the launcher's retrying request."""
    launcher = PrefectLauncher(stack.settings.prefect_api_url, timeout_s=30)
    return launcher._request(method, path, json=body).json()


def _deployment_run(stack, parameters: dict, timeout_s: float = 400, deployment: str = "manual") -> dict:
    dep = _api(stack, "GET", f"/deployments/name/batch-inference/{deployment}")
    # an idempotency key: a create retried after a 503 that did commit returns the same run, not a second one
    run = _api(stack, "POST", f"/deployments/{dep['id']}/create_flow_run",
               {"parameters": parameters, "idempotency_key": f"test-{uuid.uuid4().hex}"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = _api(stack, "GET", f"/flow_runs/{run['id']}")
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {run['id']} still {run['state_type']} after {timeout_s} s")


def test_scheduled_deployment_exists_with_its_cron(stack) -> None:
    scheduled = _api(stack, "GET", "/deployments/name/batch-inference/scheduled")
    crons = [s["schedule"].get("cron") for s in scheduled["schedules"]]
    assert crons == [stack.settings.batch.schedule_cron] == ["0 2 * * *"]
    assert all(s["active"] for s in scheduled["schedules"])
    manual = _api(stack, "GET", "/deployments/name/batch-inference/manual")
    assert manual["schedules"] == [] and manual["entrypoint"] == scheduled["entrypoint"]


def test_scheduled_run_without_model_or_input_is_skipped_not_failed(stack) -> None:
    run = _deployment_run(stack, {}, deployment="scheduled")
    assert run["state_type"] == "COMPLETED", run["state"]
    (artifact,) = _api(stack, "POST", "/artifacts/latest/filter",
                       {"artifacts": {"key": {"any_": ["batch-unconfigured"]}}})
    assert "skipped" in artifact["data"] and "CANARYFLOW_BATCH__MODEL" in artifact["data"]


def test_deployment_run_stopped_half_way_resumes_to_every_row_once(stack, released, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "in", [6000, 4000])
    params = {"model_name": MODEL, "input": str(data), "output_dir": str(tmp_path / "out"), "chunk_rows": 1000}
    first = _deployment_run(stack, {**params, "stop_after_parts": 3})
    assert first["state_type"] == "FAILED", first["state"]
    run_dir = _run_dir(tmp_path / "out")
    manifest = json.loads((run_dir / MANIFEST).read_text())
    assert manifest["status"] == "failed" and len(manifest["parts"]) == 3 and not (run_dir / SUCCESS).exists()

    second = _deployment_run(stack, params)
    assert second["state_type"] == "COMPLETED", second["state"]
    _assert_exactly_once(run_dir, 10_000)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["parts_skipped"] == 3 and summary["rows_processed"] == 7000
    assert (summary["rows_in"], summary["rows_scored"], summary["rows_rejected"]) == (10_000, 10_000, 0)
    assert summary["version"] == released and summary["variant"] and summary["drift"]["outcome"] == "passed"

    run = MlflowClient(stack.settings.mlflow_uri).get_run(summary["mlflow_run"])
    assert run.data.tags["canaryflow.version"] == released
    assert run.data.metrics["rows_in"] == 10_000 and run.data.metrics["rows_per_s"] > 0
    artifacts = {a.path for a in MlflowClient(stack.settings.mlflow_uri).list_artifacts(run.info.run_id, "batch")}
    assert {"batch/summary.json", "batch/manifest.json", "batch/drift"} <= artifacts
    found = _api(stack, "POST", "/artifacts/latest/filter", {"artifacts": {"key": {"any_": [
        f"batch-{MODEL}", f"batch-progress-{MODEL}"]}}})
    by_type = {a["type"]: a for a in found}
    assert "10,000" in by_type["markdown"]["data"] and by_type["progress"]["data"] == 100.0

    third = _deployment_run(stack, params)  # a finished run: nothing changes
    assert third["state_type"] == "COMPLETED"
    assert json.loads((run_dir / "summary.json").read_text()) == summary


def test_bad_rows_are_rejected_with_reasons_or_fail_the_run(stack, released, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "in", [2000], seed=2, bad=True)
    summary = run_batch(stack.settings, MODEL, str(data), output_dir=str(tmp_path / "out"), chunk_rows=500)
    assert (summary["rows_in"], summary["rows_scored"], summary["rows_rejected"]) == (2000, 1998, 2)
    rejects = pd.read_parquet(Path(summary["output"]) / "rejects").sort_values("source_row")
    assert rejects["source_row"].tolist() == [3, 11]
    assert rejects["reason"].tolist()[0] == "f2 is null"
    assert rejects["reason"].tolist()[1].startswith("f5=1000000000.0 outside [")

    strict = stack.settings.model_copy(update={"batch": stack.settings.batch.model_copy(
        update={"on_bad_rows": "fail"})})
    with pytest.raises(BatchError, match=r"on_bad_rows=fail .*part-0\.parquet:3: f2 is null"):
        run_batch(strict, MODEL, str(data), output_dir=str(tmp_path / "strict"), chunk_rows=500)
    assert not list((tmp_path / "strict").rglob(SUCCESS))


def test_missing_alias_or_unreadable_input_is_a_clear_error_and_writes_nothing(stack, released,
                                                                               tmp_path: Path) -> None:
    data = _dataset(tmp_path / "in", [100])
    out = tmp_path / "out"
    with pytest.raises(BatchError, match=f"model '{MODEL}' has no version with alias 'nightly'"):
        run_batch(stack.settings, MODEL, str(data), alias="nightly", output_dir=str(out))
    with pytest.raises(BatchError, match="has no version with alias 'champion'"):
        run_batch(stack.settings, "no-such-model", str(data), output_dir=str(out))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(BatchError, match="'x.parquet' .* is not readable Parquet"):
        run_batch(stack.settings, MODEL, str(tmp_path / "broken"), output_dir=str(out))
    with pytest.raises(BatchError, match="does not exist"):
        run_batch(stack.settings, MODEL, str(tmp_path / "nowhere"), output_dir=str(out))
    assert not out.exists() or not any(out.rglob("*"))


def test_unreleased_version_is_refused_unless_allowed(stack, tmp_path: Path) -> None:
    """A version whose release was rejected (no release data: the data gate says no) has no serving artifact;
    scoring it needs --allow-unreleased, which exports the MLflow model unoptimized."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    name = "batch-it-unreleased"
    model, (x, _), _, _ = train_classifier(seed=1, epochs=5)
    mlflow.set_tracking_uri(stack.settings.mlflow_uri)
    with mlflow.start_run(), torch.no_grad():
        info = mlflow.pytorch.log_model(model, name="model", signature=infer_signature(x[:5], model(
            torch.from_numpy(x[:5])).numpy()), input_example=x[:5], registered_model_name=name,
            pip_requirements=pinned_requirements("mlflow", "torch", "numpy"))
    version = str(info.registered_model_version)
    outcome = wait_for_release(stack.settings.mlflow_uri, name, version, timeout_s=300)
    assert outcome.status == "rejected" and outcome.reason.startswith("data: "), outcome
    data = _dataset(tmp_path / "in", [700])
    with pytest.raises(BatchError, match=f"'{name}' v{version} has no released serving artifact .*rejected"):
        run_batch(stack.settings, name, str(data), version=version, output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    summary = run_batch(stack.settings, name, str(data), version=version, output_dir=str(tmp_path / "out"),
                        allow_unreleased=True)
    assert summary["variant"] == "export" and summary["rows_scored"] == 700
    assert summary["drift"]["outcome"] == "skipped"  # no reference data on the training run
