"""Batch inference: score a Parquet dataset with a registered model, streamed, resumable, every row exactly once.

Plain functions (no Prefect): :func:`prepare` resolves the model and plans the run, :func:`run_chunks` streams the
input in chunks through an executor (threads here, a Prefect task runner in flows/batch_inference.py),
:func:`finish` proves the output adds up and reports it; :func:`run_batch` chains them (the CLI).

Output: ``<output_dir>/<model>/v<version>/<input name>-<run key>/`` with ``part-<file>-<chunk>.parquet``,
``rejects/``, ``manifest.json``, ``summary.json`` and, last, ``_SUCCESS``. The run key hashes the input files
(paths, sizes, versions), the model version and everything that shapes the output, so a re-run of the same input
resumes (or, finished, changes nothing), while a changed input or model writes to a new directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from canaryflow import batch_report
from canaryflow.batch_io import (
    ChunkSpec,
    InputFile,
    discover,
    filesystem,
    fingerprint,
    join,
    plan_chunks,
    remove_temporaries,
    schema_of,
    stream_chunks,
    write_text_atomic,
)
from canaryflow.batch_manifest import SUCCESS, Manifest, PartRecord, is_complete, verify
from canaryflow.batch_model import BatchModel, fetch_model, resolve_version
from canaryflow.batch_score import score_chunk
from canaryflow.errors import BatchError
from canaryflow.settings import Settings

OUTPUT_FORMAT = 1  # bump when the part layout changes: old runs are then not resumed into


class BatchInterrupted(BatchError):
    """The run stopped on purpose after some parts (the ``stop_after_parts`` hook that simulates a crash)."""


@dataclass(frozen=True)
class BatchJob:
    """Everything a chunk task needs (picklable, small: no chunk list, no data)."""

    model: BatchModel
    input_uri: str
    files: tuple[InputFile, ...]
    run_dir: str
    run_key: str
    chunk_rows: int
    score_rows: int
    keep_columns: tuple[str, ...]
    on_bad_rows: str
    row_expectations: bool
    drift_sample_rows: int
    max_parallel: int
    complete: bool = False

    @property
    def total_rows(self) -> int:
        return sum(f.rows for f in self.files)

    def chunks(self) -> list[ChunkSpec]:
        return plan_chunks(list(self.files), self.chunk_rows)


@dataclass(frozen=True)
class Progress:
    parts_done: int
    parts_total: int
    rows_done: int
    rows_total: int
    rows_per_s: float


def prepare(settings: Settings, model_name: str, input_uri: str, *, alias: str | None = None,
            version: str | None = None, output_dir: str | None = None, chunk_rows: int | None = None,
            keep_columns: list[str] | None = None, allow_unreleased: bool | None = None) -> BatchJob:
    """Resolve the model, read the input's footers, plan the run and open its manifest.

    Every error that can be found before scoring (no such alias, unreadable input, a missing kept column) is
    raised here, before anything is written.
    """
    from canaryflow.registry import MlflowRegistry

    cfg = settings.batch
    chunk_rows = int(chunk_rows or cfg.chunk_rows)
    files = discover(input_uri)
    registry = MlflowRegistry(settings.mlflow_uri)
    alias = None if version is not None else (alias or cfg.alias)
    number = resolve_version(registry, model_name, alias, version)
    work = settings.state_dir / "work" / "batch" / f"{_safe(model_name)}-v{number}"
    model = fetch_model(registry, model_name, number, alias, work,
                        allow_unreleased=cfg.allow_unreleased if allow_unreleased is None else allow_unreleased,
                        max_batch_rows=cfg.score_rows)
    keep = tuple(keep_columns or ())
    _check_kept(input_uri, files, keep)
    plan = plan_chunks(files, chunk_rows)
    key = fingerprint(files, model=model_name, version=number, chunk_rows=chunk_rows, keep=keep,
                      features=model.feature_columns, row_expectations=cfg.row_expectations, format=OUTPUT_FORMAT)
    out = str(output_dir or cfg.output_dir)
    if "://" not in out and not Path(out).is_absolute():
        out = str(settings.state_dir / out)
    run_dir = join(out, _safe(model_name), f"v{number}", f"{_input_name(input_uri)}-{key}")
    job = BatchJob(model, input_uri, tuple(files), run_dir, key, chunk_rows, cfg.score_rows, keep, cfg.on_bad_rows,
                   cfg.row_expectations, cfg.drift_sample_rows, cfg.max_parallel)
    fs, root = filesystem(run_dir)
    manifest = Manifest.load(fs, root)
    if manifest is not None and manifest.status == "complete" and is_complete(fs, root):
        return replace(job, complete=True)
    if manifest is None:
        identity = {"model": model_name, "version": number, "alias": alias, "input": input_uri,
                    "files": [f.rel for f in files], "chunk_rows": chunk_rows, "variant": model.variant}
        fs.makedirs(root, exist_ok=True)
        Manifest(key, identity, job.total_rows, len(plan)).save(fs, root)
    return job


def _check_kept(uri: str, files: list[InputFile], keep: tuple[str, ...]) -> None:
    for f in files if keep else []:
        missing = [c for c in keep if c not in schema_of(uri, f).names]
        if missing:
            raise BatchError(f"input file {f.rel!r} lacks the columns to keep {missing}")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def _input_name(uri: str) -> str:
    return _safe(Path(uri.rstrip("/").split("://")[-1]).stem)


class ChunkExecutor(Protocol):
    """Runs :func:`score_chunk` somewhere: threads, a Prefect task runner, a Dask cluster."""

    def submit(self, job: BatchJob, spec: ChunkSpec, table: pa.Table) -> Any: ...
    def first_done(self, handles: list[Any]) -> Any: ...


class ThreadExecutor:
    """Chunks on a local thread pool (onnxruntime and torch release the GIL while they compute)."""

    def __init__(self, max_workers: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="batch")

    def submit(self, job: BatchJob, spec: ChunkSpec, table: pa.Table) -> Future:
        return self.pool.submit(score_chunk, job, spec, table)

    def first_done(self, handles: list[Future]) -> Future:
        return next(iter(wait(handles, return_when=FIRST_COMPLETED).done))

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def run_chunks(job: BatchJob, executor: ChunkExecutor, on_part: Callable[[Progress], None] | None = None,
               stop_after_parts: int | None = None) -> dict[str, float]:
    """Score every chunk the manifest does not list yet, at most ``max_parallel + 1`` in flight (so memory stays
    bounded whatever the input size), recording each finished part in the manifest as it lands."""
    fs, root = filesystem(job.run_dir)
    manifest = Manifest.load(fs, root)
    if manifest is None:
        raise BatchError(f"{job.run_dir} has no manifest: call prepare() first")
    remove_temporaries(fs, root)
    plan = job.chunks()
    skipped = len(manifest.parts)
    manifest.status, manifest.error = "running", None
    source = _stream(job, plan, set(manifest.parts))
    inflight: dict[Any, ChunkSpec] = {}
    started, rows_now, parts_now = time.monotonic(), 0, 0
    try:
        while True:
            while len(inflight) <= job.max_parallel and (item := next(source, None)) is not None:
                inflight[executor.submit(job, *item)] = item[0]
            if not inflight:
                break
            handle = executor.first_done(list(inflight))
            inflight.pop(handle)
            part: PartRecord = handle.result()
            manifest.record(part)
            manifest.save(fs, root)
            parts_now, rows_now = parts_now + 1, rows_now + part.rows_in
            if on_part is not None:
                elapsed = max(time.monotonic() - started, 1e-9)
                on_part(Progress(len(manifest.parts), len(plan), manifest.rows_done, job.total_rows,
                                 rows_now / elapsed))
            if stop_after_parts is not None and parts_now >= stop_after_parts:
                raise BatchInterrupted(f"stopped after {parts_now} parts (stop_after_parts={stop_after_parts})")
    except BaseException as exc:
        _drain(inflight)
        manifest.status, manifest.error = "failed", f"{type(exc).__name__}: {exc}"[:2000]
        with contextlib.suppress(Exception):
            manifest.save(fs, root)
        raise
    seconds = time.monotonic() - started
    return {"parts_skipped": skipped, "parts_scored": parts_now, "rows_processed": rows_now,
            "seconds": seconds, "rows_per_s": rows_now / seconds if seconds > 0 else 0.0}


def _stream(job: BatchJob, plan: list[ChunkSpec], done: set[str]) -> Iterator[tuple[ChunkSpec, pa.Table]]:
    columns = list(dict.fromkeys([*job.model.feature_columns, *job.keep_columns]))
    fs, _ = filesystem(job.input_uri)
    by_file: dict[int, list[ChunkSpec]] = {}
    for spec in plan:
        by_file.setdefault(spec.file, []).append(spec)
    for i, f in enumerate(job.files):
        yield from stream_chunks(fs, f, by_file.get(i, []), columns, done)


def _drain(inflight: dict[Any, ChunkSpec]) -> None:
    """Wait for running chunks (their parts are not recorded) so nothing writes after the run has failed."""
    for handle in inflight:
        with contextlib.suppress(BaseException):
            handle.result()




def finish(job: BatchJob, settings: Settings, stats: dict[str, float], *, started: float | None = None,
           report: bool = True) -> dict[str, Any]:
    """Prove the output adds up (rows in = scored + rejected, every chunk once), report it (MLflow run, drift),
    then mark the run complete: ``summary.json``, the manifest's status, and ``_SUCCESS`` last."""
    fs, root = filesystem(job.run_dir)
    manifest = Manifest.load(fs, root)
    if manifest is None:
        raise BatchError(f"{job.run_dir} has no manifest")
    totals = verify(manifest, job.chunks(), fs, root, job.total_rows)
    summary = batch_report.summarize(job, manifest, totals, stats, started)
    if report:
        summary.update(batch_report.report(job, settings, summary, fs, root))
    write_text_atomic(fs, json.dumps(summary, indent=2, default=str), join(root, "summary.json"))
    manifest.status, manifest.summary = "complete", summary
    manifest.save(fs, root)
    write_text_atomic(fs, f"{summary['rows_in']} rows\n", join(root, SUCCESS))
    return summary


def previous_summary(job: BatchJob) -> dict[str, Any]:
    """The summary of a run that was already complete (nothing is scored or written again)."""
    fs, root = filesystem(job.run_dir)
    manifest = Manifest.load(fs, root)
    return {**(manifest.summary if manifest and manifest.summary else {}), "already_complete": True}


@contextlib.contextmanager
def run_lock(job: BatchJob) -> Iterator[None]:
    """One writer per run directory: a second run of the same input and model fails instead of interleaving.

    Local output only (flock); for object stores the Prefect deployment's concurrency limit plays this part.
    """
    fs, root = filesystem(job.run_dir)
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        yield
        return
    import fcntl

    fd = os.open(os.path.join(root, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BatchError(f"another batch run is writing {job.run_dir}; wait for it to finish") from None
        yield
    finally:
        os.close(fd)


def run_batch(settings: Settings, model_name: str, input_uri: str, *, alias: str | None = None,
              version: str | None = None, output_dir: str | None = None, chunk_rows: int | None = None,
              keep_columns: list[str] | None = None, allow_unreleased: bool | None = None,
              on_part: Callable[[Progress], None] | None = None, on_job: Callable[[BatchJob], None] | None = None,
              stop_after_parts: int | None = None, report: bool = True) -> dict[str, Any]:
    """The whole run on local threads (what ``canaryflow score`` calls); returns the summary."""
    started = time.monotonic()
    job = prepare(settings, model_name, input_uri, alias=alias, version=version, output_dir=output_dir,
                  chunk_rows=chunk_rows, keep_columns=keep_columns, allow_unreleased=allow_unreleased)
    if on_job is not None:
        on_job(job)
    if job.complete:
        return previous_summary(job)
    executor = ThreadExecutor(job.max_parallel)
    try:
        with run_lock(job):
            stats = run_chunks(job, executor, on_part, stop_after_parts)
            return finish(job, settings, stats, started=started, report=report)
    finally:
        executor.close()
