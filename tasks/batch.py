"""Prefect wrappers of batch inference (canaryflow/batch/): tasks, the task runner, the chunk executor, and
the run's artifacts (a progress bar while it runs, a markdown summary at the end)."""

from __future__ import annotations

import re
import time
from typing import Any

import pyarrow as pa
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from canaryflow.batch import report as batch_report
from canaryflow.batch import run as batch
from canaryflow.batch.io import ChunkSpec
from canaryflow.batch.manifest import PartRecord
from canaryflow.batch.score import score_chunk as score_chunk_fn
from canaryflow.core.errors import BatchError
from canaryflow.core.settings import get_settings


@task(name="prepare-batch", cache_policy=NO_CACHE)
def prepare(model_name: str, input_uri: str, alias: str | None, version: str | None, output_dir: str | None,
            chunk_rows: int | None, keep_columns: list[str] | None, allow_unreleased: bool | None) -> batch.BatchJob:
    return batch.prepare(get_settings(), model_name, input_uri, alias=alias, version=version, output_dir=output_dir,
                         chunk_rows=chunk_rows, keep_columns=keep_columns, allow_unreleased=allow_unreleased)


@task(name="score-chunk", task_run_name="chunk-{spec.key}", cache_policy=NO_CACHE)
def score_chunk(job: batch.BatchJob, spec: ChunkSpec, table: pa.Table) -> PartRecord:
    return score_chunk_fn(job, spec, table)


@task(name="finish-batch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3)
def finish(job: batch.BatchJob, stats: dict[str, float], started: float) -> dict[str, Any]:
    return batch.finish(job, get_settings(), stats, started=started)


def task_runner(dask_address: str | None, max_workers: int) -> TaskRunner:
    """Threads by default; a Dask cluster when a scheduler address is given (the ``dask`` extra)."""
    if not dask_address:
        return ThreadPoolTaskRunner(max_workers=max_workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise BatchError(f"a Dask scheduler ({dask_address}) was named but prefect-dask is not installed: "
                         "pip install 'canaryflow[dask]'") from exc
    return DaskTaskRunner(address=dask_address)


class PrefectChunkExecutor:
    """:class:`canaryflow.batch.run.ChunkExecutor` on an entered Prefect task runner: each chunk is a task run."""

    def __init__(self, runner: TaskRunner) -> None:
        self.runner = runner
        self.parallel = _dask_threads(runner)

    def submit(self, job: batch.BatchJob, spec: ChunkSpec, table: pa.Table) -> Any:
        return self.runner.submit(score_chunk, {"job": job, "spec": spec, "table": table})

    def first_done(self, handles: list[Any]) -> Any:
        return next(as_completed(handles))


def _dask_threads(runner: TaskRunner) -> int | None:
    """On a Dask cluster, its thread count: as many chunks in flight (the run adds one read ahead)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        return None
    return max(1, sum(runner.client.nthreads().values())) if isinstance(runner, DaskTaskRunner) else None


def artifact_key(prefix: str, model: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{model}".lower()).strip("-")


class ProgressArtifact:
    """A Prefect progress artifact, updated at most once a second (and at the end)."""

    def __init__(self, model: str, total_parts: int) -> None:
        self.id = create_progress_artifact(0.0, key=artifact_key("batch-progress", model),
                                           description=f"batch inference of {model}: {total_parts} parts")
        self.last = 0.0

    def update(self, p: batch.Progress) -> None:
        now = time.monotonic()
        if now - self.last >= 1.0 or p.parts_done == p.parts_total:
            self.last = now
            update_progress_artifact(self.id, 100.0 * p.rows_done / max(p.rows_total, 1),
                                     description=f"{p.rows_done:,} of {p.rows_total:,} rows, "
                                                 f"{p.rows_per_s:,.0f} rows/s")


def summary_artifact(model: str, summary: dict[str, Any]) -> None:
    create_markdown_artifact(key=artifact_key("batch", model), markdown=batch_report.markdown(summary),
                             description=f"batch inference of {model}: {summary.get('status')}")
