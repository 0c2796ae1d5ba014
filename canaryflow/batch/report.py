"""What a batch run reports: the summary, an MLflow run, the Evidently drift report, a markdown table."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from canaryflow.batch.io import join
from canaryflow.batch.manifest import Manifest
from canaryflow.batch.score import SAMPLES
from canaryflow.core.registry import experiment_id
from canaryflow.core.state import Tag

if TYPE_CHECKING:
    from canaryflow.batch.job import BatchJob
    from canaryflow.core.settings import Settings

SUPPORTED = {"expect_table_columns_to_match_set", "expect_column_values_to_be_in_type_list",  # see batch_checks
             "expect_column_values_to_not_be_null", "expect_column_values_to_be_between",
             "expect_column_values_to_be_in_set"}
METRICS = ("rows_in", "rows_scored", "rows_rejected", "rows_processed", "rows_per_s", "duration_s", "parts",
           "parts_skipped", "parts_repaired", "drift_share")


def summarize(job: BatchJob, manifest: Manifest, totals: dict[str, int], stats: dict[str, float],
              started: float | None) -> dict[str, Any]:
    """Counts, speed, model and where everything is; the expectations' share of unexpected rows over the run."""
    m = job.model
    unexpected: dict[str, int] = {}
    for part in manifest.parts.values():
        for label, n in part["unexpected"].items():
            unexpected[label] = unexpected.get(label, 0) + n
    mostly = {f"{e['type']}({e['kwargs'].get('column')})": e["kwargs"].get("mostly", 1.0)
              for e in (m.suite or {}).get("expectations", []) if e.get("kwargs", {}).get("column")}
    rows = max(totals["rows_in"], 1)
    expectations = [{"expectation": label, "unexpected": n, "share": n / rows, "mostly": mostly.get(label, 1.0),
                     "ok": 1 - n / rows >= mostly.get(label, 1.0)} for label, n in sorted(unexpected.items())]
    return {
        "status": "complete", "model": m.name, "version": m.version, "alias": m.alias, "variant": m.variant,
        "serving_format": m.serving_format, "release_run": m.release_run, "input": job.input_uri,
        "files": len(job.files), "output": job.run_dir, "run_key": job.run_key, "chunk_rows": job.chunk_rows,
        "on_bad_rows": job.on_bad_rows, **totals,
        "parts_skipped": int(stats.get("parts_skipped", 0)), "parts_repaired": int(stats.get("parts_repaired", 0)),
        "rows_processed": int(stats.get("rows_processed", 0)),
        "scoring_s": round(stats.get("seconds", 0.0), 3), "rows_per_s": round(stats.get("rows_per_s", 0.0), 1),
        "duration_s": round(time.monotonic() - started, 3) if started is not None else None,
        "expectations_failed": [e["expectation"] for e in expectations if not e["ok"]],
        "expectations_not_checked": sorted({e.get("type", "") for e in (m.suite or {}).get("expectations", [])}
                                           - SUPPORTED),
        "expectations": expectations, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def report(job: BatchJob, settings: Settings, summary: dict[str, Any], fs: Any, root: str) -> dict[str, Any]:
    """Drift of the scored rows against the training reference, then one MLflow run with everything; the report
    files are also copied into ``<run dir>/reports/``. Returns the keys to add to the summary."""
    with tempfile.TemporaryDirectory(prefix="canaryflow-batch-") as tmp:
        out = Path(tmp)
        drift = drift_report(job, settings, fs, root, out / "drift")
        added = {"drift": drift, "drift_share": drift.get("share")}
        (out / "summary.json").write_text(json.dumps({**summary, **added}, indent=2, default=str))
        with fs.open(join(root, "manifest.json"), "rb") as fh:
            (out / "manifest.json").write_bytes(fh.read())
        fs.makedirs(join(root, "reports"), exist_ok=True)
        for path in (out / "drift").glob("*"):
            fs.put_file(str(path), join(root, "reports", path.name))
        added["mlflow_run"] = log_run(job, settings, {**summary, **added}, out)
    return added


def drift_report(job: BatchJob, settings: Settings, fs: Any, root: str, out: Path) -> dict[str, Any]:
    """Evidently's data drift of a sample of the scored rows against the training reference (informative: a
    drifted batch is still scored; the release gates decide on drift, this tells whoever reads the scores)."""
    import pandas as pd
    import pyarrow.parquet as pq

    from validation.drift import check_drift

    if not job.model.reference_path:
        return {"outcome": "skipped", "reason": "the model's training run has no canaryflow/reference.parquet"}
    samples = join(root, SAMPLES)
    parts = sorted(p for p in fs.find(samples) if p.endswith(".parquet")) if fs.exists(samples) else []
    frames = []
    for p in parts:
        with fs.open(p, "rb") as fh:
            frames.append(pq.read_table(fh).to_pandas())
    current = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    reference = pd.read_parquet(job.model.reference_path)
    features = list(job.model.feature_columns)
    g = settings.gates
    result = check_drift(reference, current, features, g.drift_max_share, out, g.drift_stattest_threshold)
    return {"outcome": result.outcome.value, "reason": result.reason, "share": result.measured.get("drift_share"),
            "sample_rows": len(current), "drifted_columns": result.measured.get("drifted_columns", [])}


def log_run(job: BatchJob, settings: Settings, summary: dict[str, Any], files_dir: Path) -> str:
    """One MLflow run per batch invocation (experiment ``batch.experiment``), tagged with model and version."""
    from mlflow import MlflowClient

    client = MlflowClient(job.model.tracking_uri)
    exp_id = experiment_id(client, settings.batch.experiment)
    tags = {Tag.MODEL: job.model.name, Tag.VERSION: job.model.version,
            Tag.BATCH_RUN_KEY: job.run_key, Tag.BATCH_OUTPUT: job.run_dir}
    run = client.create_run(exp_id, run_name=f"batch-{job.model.name}-v{job.model.version}-{job.run_key[:8]}",
                            tags=tags)
    run_id = run.info.run_id
    params = {"model": job.model.name, "version": job.model.version, "alias": job.model.alias or "",
              "variant": job.model.variant, "input": job.input_uri[:500], "output": job.run_dir[:500],
              "chunk_rows": job.chunk_rows, "on_bad_rows": job.on_bad_rows, "files": len(job.files)}
    for key, value in params.items():
        client.log_param(run_id, key, value)
    for key in METRICS:
        if isinstance(summary.get(key), int | float):
            client.log_metric(run_id, key, float(summary[key]))
    for path in sorted(files_dir.rglob("*")):
        if path.is_file():
            client.log_artifact(run_id, str(path), "batch" if path.parent == files_dir else "batch/drift")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def markdown(summary: dict[str, Any]) -> str:
    """The run as a markdown summary (Prefect artifact, CLI)."""
    if summary.get("status") != "complete":
        return f"# Batch inference {summary.get('status')}\n\n{summary.get('reason', '')}\n"
    drift = summary.get("drift") or {}
    lines = [
        f"# Batch inference: `{summary['model']}` v{summary['version']} ({summary.get('variant')})",
        "" if not summary.get("already_complete") else "\n_already complete: nothing was scored or written again_",
        "| rows in | scored | rejected | parts (skipped) | rows/s | duration |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {summary['rows_in']:,} | {summary['rows_scored']:,} | {summary['rows_rejected']:,} | "
        f"{summary['parts']} ({summary.get('parts_skipped', 0)}) | {summary.get('rows_per_s', 0):,.0f} | "
        f"{summary.get('duration_s')} s |", "",
        f"- input: `{summary['input']}`", f"- output: `{summary['output']}`",
        f"- drift vs training reference: {drift.get('outcome', 'n/a')}: {drift.get('reason', '')}",
        f"- MLflow run: `{summary.get('mlflow_run', 'n/a')}`",
    ]
    failed = summary.get("expectations_failed") or []
    if failed:
        lines.append(f"- data expectations broken over the run (beyond their `mostly`): {', '.join(failed)}")
    return "\n".join(lines) + "\n"
