"""batch_inference: the champion (or a named version) scores a Parquet dataset, streamed in chunks, resumable.

Deployed twice (prefect.yaml): ``batch-inference/scheduled`` on a cron, ``batch-inference/manual`` on demand.
Chunks fan out over a Prefect task runner: threads here, a Dask cluster when ``dask_address`` (or the setting
``batch.dask_address``) names a scheduler. The work itself is in canaryflow/batch/; ``canaryflow score`` runs
the same functions without Prefect.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from canaryflow.batch.run import UNCONFIGURED, batch_target, previous_summary, run_chunks, run_lock
from canaryflow.core.settings import get_settings
from tasks import batch as t


@flow(name="batch-inference", log_prints=True)
def batch_inference(model_name: str | None = None, input: str | None = None, output_dir: str | None = None,
                    alias: str | None = None, version: str | None = None, chunk_rows: int | None = None,
                    keep_columns: list[str] | None = None, allow_unreleased: bool | None = None,
                    dask_address: str | None = None, stop_after_parts: int | None = None) -> dict[str, Any]:
    """Score ``input`` (Parquet file or directory, path or fsspec URI) with ``model_name`` at ``alias``
    (default champion) or ``version``; ``keep_columns`` are copied from the input; returns the summary. Unset
    model and input fall back to the settings ``batch.model`` / ``batch.input``; with neither anywhere the
    (scheduled) run is skipped, not failed.
    ``stop_after_parts`` stops the run on purpose after that many parts (tests of resumption)."""
    log = get_run_logger()
    cfg = get_settings().batch
    target = batch_target(cfg, model_name, input)
    if target is None:
        summary = {"status": "skipped", "reason": UNCONFIGURED}
        log.warning(summary["reason"])
        t.summary_artifact("unconfigured", summary)
        return summary
    model_name, input = target
    started = time.monotonic()
    job = t.prepare(model_name, input, alias, version, output_dir, chunk_rows, keep_columns, allow_unreleased)
    if job.complete:
        log.info("%s is already complete; nothing to do", job.run_dir)
        summary = previous_summary(job)
    else:
        log.info("scoring %s rows of %s with %s v%s (%s) into %s", f"{job.total_rows:,}", input, job.model.name,
                 job.model.version, job.model.variant, job.run_dir)
        progress = t.ProgressArtifact(job.model.name, len(job.chunks()))
        try:
            with run_lock(job):
                with t.task_runner(dask_address or cfg.dask_address, job.max_parallel) as runner:
                    stats = run_chunks(job, t.PrefectChunkExecutor(runner), progress.update, stop_after_parts)
                summary = t.finish(job, stats, started)
        except Exception as exc:
            t.summary_artifact(model_name, {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"})
            raise
    t.summary_artifact(model_name, summary)
    return summary
