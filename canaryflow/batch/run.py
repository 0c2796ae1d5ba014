"""Batch inference: score a Parquet dataset with a registered model, streamed, resumable, every row exactly once.

Plain functions (no Prefect): :func:`prepare` resolves the model and plans the run, :func:`run_chunks` streams the
input in chunks through an executor (threads here, a Dask cluster in :mod:`canaryflow.batch.cluster`, a Prefect
task runner in flows/batch_inference.py), :func:`finish` proves the output adds up and reports it;
:func:`run_batch` chains them (the CLI).

Output: ``<output_dir>/<model>/v<version>/<input name>-<run key>/`` with ``scores/part-<file>-<chunk>.parquet``,
``rejects/``, ``manifest.json``, ``summary.json``, ``reports/`` and, last, ``_SUCCESS``. The run key hashes the
input files (paths, sizes, versions), the model version and everything that shapes the output, so a re-run of the
same input resumes (or, finished, changes nothing), while a changed input or model writes to a new directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from canaryflow.batch import report as batch_report
from canaryflow.batch.io import ChunkSpec, discover, filesystem, join, stream_chunks
from canaryflow.batch.job import BatchJob, Progress, plan_job, safe_name
from canaryflow.batch.manifest import SUCCESS, Manifest, PartRecord, repair, verify
from canaryflow.batch.model import fetch_model, resolve_version
from canaryflow.batch.score import SAMPLES, score_chunk
from canaryflow.batch.write import remove_temporaries, write_error, write_text_atomic
from canaryflow.core import seal
from canaryflow.core.errors import BatchError, BatchWriteError, RegistryError
from canaryflow.core.names import name_problem
from canaryflow.core.paths import StatePaths
from canaryflow.core.settings import BatchSettings, Settings

if TYPE_CHECKING:
    from canaryflow.batch.cluster import DaskExecutor

__all__ = ["BatchInterrupted", "BatchJob", "Progress", "finish", "plan_job", "prepare", "run_batch", "run_chunks",
           "run_job"]


EXPORT_BATCH_ROWS = 4096  # what an unreleased version's program is exported to take per call

# The manifest is rewritten whole (atomically) at most this often: per part it would cost O(parts^2) bytes.
MANIFEST_EVERY_S = 1.0


class BatchInterrupted(BatchError):
    """The run stopped on purpose after some parts (the ``stop_after_parts`` hook that simulates a crash)."""


def prepare(settings: Settings, model_name: str, input_uri: str, *, alias: str | None = None,
            version: str | None = None, output_dir: str | None = None, chunk_rows: int | None = None,
            keep_columns: list[str] | None = None, allow_unreleased: bool | None = None) -> BatchJob:
    """Read the input's footers, resolve and fetch the model, plan the run and open its manifest.

    Every error that can be found before scoring (unreadable input, no such alias or version, a version that was
    never released, a missing kept column) is raised here, before anything is written.
    """
    from canaryflow.core.registry import MlflowRegistry

    problem = name_problem(model_name, version)
    if problem:
        raise BatchError(problem)
    cfg = settings.batch
    files = discover(input_uri)
    registry = MlflowRegistry(settings.mlflow_uri)
    alias = None if version is not None else (alias or cfg.alias)
    paths = StatePaths.of(settings)
    if alias == settings.release.champion_alias:  # the champion the pipeline set, not whatever the alias says
        try:
            number = seal.trusted_champion(registry, paths, model_name)
        except RegistryError as exc:
            raise BatchError(f"model {model_name!r} has no version with alias {alias!r}: {exc}") from exc
        if number is None:
            raise BatchError(f"model {model_name!r} has no version with alias {alias!r} set by the release pipeline "
                             f"in the registry at {settings.mlflow_uri}: release a version first, or pass an "
                             "explicit version")
    else:
        number = resolve_version(registry, model_name, alias, version)
    work = settings.state_dir / "work" / "batch" / f"{safe_name(model_name)}-v{number}"
    model = fetch_model(registry, model_name, number, alias, work,
                        allow_unreleased=cfg.allow_unreleased if allow_unreleased is None else allow_unreleased,
                        max_batch_rows=cfg.score_rows or EXPORT_BATCH_ROWS, paths=paths)
    return plan_job(settings, model, input_uri, files, output_dir=output_dir, chunk_rows=chunk_rows,
                    keep_columns=keep_columns)


UNCONFIGURED = ("no model and no input: pass model_name and input, or set CANARYFLOW_BATCH__MODEL and "
                "CANARYFLOW_BATCH__INPUT")


def batch_target(cfg: BatchSettings, model_name: str | None, input_uri: str | None) -> tuple[str, str] | None:
    """The model and input a batch run scores: the ones given, else the settings' ``batch.model`` /
    ``batch.input``; None when neither is anywhere (a scheduled run with nothing configured is skipped, not
    failed). Raises BatchError when only one of them is known."""
    model_name, input_uri = model_name or cfg.model, input_uri or cfg.input
    if not model_name and not input_uri:
        return None
    if not (model_name and input_uri):
        raise BatchError(f"batch inference needs both a model and an input (got model={model_name!r}, "
                         f"input={input_uri!r})")
    return model_name, input_uri


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
    """Score every chunk the manifest does not list yet, at most ``max_parallel + 1`` in flight (a cluster's
    executor: its thread count + 1), so memory stays bounded whatever the input size, recording each finished part
    in the manifest as it lands.

    Listed parts whose files are damaged are scored again (:func:`canaryflow.batch_manifest.repair`). When chunks
    fail, the error raised is that of the first failing chunk in input order, whichever thread failed first. A
    failed write (disk full) says how far the run got; finished parts are kept and a re-run resumes.
    """
    fs, root = filesystem(job.run_dir)
    manifest = Manifest.load(fs, root)
    if manifest is None:
        raise BatchError(f"{job.run_dir} has no manifest: call prepare() first")
    remove_temporaries(fs, root)
    repaired = repair(manifest, fs, root, SAMPLES)
    plan = job.chunks()
    skipped = len(manifest.parts)
    manifest.status, manifest.error = "running", None
    source = _stream(job, plan, set(manifest.parts))
    inflight: dict[Any, ChunkSpec] = {}
    parallel = getattr(executor, "parallel", None) or job.max_parallel  # a cluster: its thread count
    started, rows_now, parts_now, saved = time.monotonic(), 0, 0, 0.0
    rows_before = manifest.rows_done
    try:
        while True:
            while len(inflight) <= parallel and (item := next(source, None)) is not None:
                inflight[executor.submit(job, *item)] = item[0]
            if not inflight:
                break
            handle = executor.first_done(list(inflight))
            spec = inflight.pop(handle)
            try:
                part: PartRecord = handle.result()
            except Exception as exc:
                raise _first_in_input_order({spec: exc} | _drain(inflight))  # noqa: B904 - keeps its cause
            manifest.record(part)
            if time.monotonic() - saved >= MANIFEST_EVERY_S:  # parts landing in between are redone after a crash
                manifest.save(fs, root)
                saved = time.monotonic()
            parts_now, rows_now = parts_now + 1, rows_now + part.rows_in
            if on_part is not None:
                elapsed = max(time.monotonic() - started, 1e-9)
                on_part(Progress(len(manifest.parts), len(plan), rows_before + rows_now, job.total_rows,
                                 rows_now / elapsed))
            if stop_after_parts is not None and parts_now >= stop_after_parts:
                raise BatchInterrupted(f"stopped after {parts_now} parts (stop_after_parts={stop_after_parts})")
    except BaseException as exc:
        _drain(inflight)
        manifest.status, manifest.error = "failed", f"{type(exc).__name__}: {exc}"[:2000]
        with contextlib.suppress(Exception):  # on a full disk this fails too: the last saved manifest stands
            manifest.save(fs, root)
        if isinstance(exc, BatchWriteError):
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else OSError(  # lost on a pickled way back
                exc.errno or 0, os.strerror(exc.errno) if exc.errno else "write failed")
            raise write_error(exc.path, cause, f"{len(manifest.parts)} of {len(plan)} parts "
                              f"({manifest.rows_done:,} of {job.total_rows:,} rows) were finished before it, in "
                              f"{job.run_dir}") from exc
        raise
    manifest.save(fs, root)
    seconds = time.monotonic() - started
    return {"parts_skipped": skipped, "parts_scored": parts_now, "parts_repaired": len(repaired),
            "rows_processed": rows_now, "seconds": seconds, "rows_per_s": rows_now / seconds if seconds > 0 else 0.0}


def _stream(job: BatchJob, plan: list[ChunkSpec], done: set[str]) -> Iterator[tuple[ChunkSpec, pa.Table]]:
    columns = list(dict.fromkeys([*job.model.feature_columns, *job.keep_columns]))
    fs, _ = filesystem(job.input_uri)
    by_file: dict[int, list[ChunkSpec]] = {}
    for spec in plan:
        by_file.setdefault(spec.file, []).append(spec)
    for i, f in enumerate(job.files):
        yield from stream_chunks(fs, f, by_file.get(i, []), columns, done)


def _drain(inflight: dict[Any, ChunkSpec]) -> dict[ChunkSpec, BaseException]:
    """Wait for running chunks (their parts are not recorded) so nothing writes after the run has failed; returns
    the chunks that failed meanwhile, with their errors."""
    failed = {}
    for handle, spec in list(inflight.items()):
        try:
            handle.result()
        except BaseException as exc:  # noqa: BLE001 - collected, the caller raises one
            failed[spec] = exc
    inflight.clear()
    return failed


def _first_in_input_order(failed: dict[ChunkSpec, BaseException]) -> BaseException:
    """The error of the earliest failing chunk: chunks are submitted in input order and a failure drains every
    chunk in flight, so this is the first failing chunk of the input however the threads were scheduled."""
    return failed[min(failed, key=lambda s: (s.file, s.chunk))]


def finish(job: BatchJob, settings: Settings, stats: dict[str, float], *, started: float | None = None,
           report: bool = True) -> dict[str, Any]:
    """Prove the output adds up (rows in = scored + rejected, every chunk once), report it (MLflow run, drift),
    then mark the run complete: ``summary.json``, the manifest's status, and ``_SUCCESS`` last."""
    fs, root = filesystem(job.run_dir)
    manifest = Manifest.load(fs, root)
    if manifest is None:
        raise BatchError(f"{job.run_dir} has no manifest")
    remove_temporaries(fs, root)  # left by a worker killed mid-write whose chunk ran again elsewhere
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
    return run_job(job, settings, on_part=on_part, stop_after_parts=stop_after_parts, report=report,
                   started=started)


def run_job(job: BatchJob, settings: Settings, *, on_part: Callable[[Progress], None] | None = None,
            stop_after_parts: int | None = None, report: bool = True,
            started: float | None = None) -> dict[str, Any]:
    """Score a prepared job on local threads, or on the Dask cluster of the setting ``batch.dask_address``, and
    finish it (nothing to do if it is already complete)."""
    if job.complete:
        return previous_summary(job)
    executor: ThreadExecutor | DaskExecutor
    if settings.batch.dask_address:
        from canaryflow.batch.cluster import DaskExecutor

        executor = DaskExecutor(settings.batch.dask_address)
    else:
        executor = ThreadExecutor(job.max_parallel)
    try:
        with run_lock(job):
            stats = run_chunks(job, executor, on_part, stop_after_parts)
            return finish(job, settings, stats, started=started or time.monotonic(), report=report)
    finally:
        executor.close()
