"""What a batch run is: the job every chunk task receives, and how it is planned from settings and input."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from canaryflow.batch.io import ChunkSpec, InputFile, filesystem, fingerprint, join, plan_chunks, schema_of
from canaryflow.batch.manifest import Manifest, is_complete
from canaryflow.batch.model import BatchModel
from canaryflow.core.errors import BatchError
from canaryflow.core.settings import Settings

OUTPUT_FORMAT = 1  # bump when the part layout changes: old runs are then not resumed into


@dataclass(frozen=True)
class BatchJob:
    """Everything a chunk task needs (picklable, small: no chunk list, no data)."""

    model: BatchModel
    input_uri: str
    files: tuple[InputFile, ...]
    run_dir: str
    run_key: str
    chunk_rows: int
    score_rows: int | None  # None: the bundle's own call size (serving_contract.batch_call_rows)
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


def plan_job(settings: Settings, model: BatchModel, input_uri: str, files: list[InputFile], *,
             output_dir: str | None = None, chunk_rows: int | None = None,
             keep_columns: list[str] | None = None) -> BatchJob:
    """The run directory (from the run key) and its manifest, created if new; ``complete`` if already done."""
    cfg = settings.batch
    chunk_rows = int(chunk_rows or cfg.chunk_rows)
    keep = tuple(keep_columns or ())
    _check_kept(input_uri, files, keep)
    plan = plan_chunks(files, chunk_rows)
    key = fingerprint(files, model=model.name, version=model.version, chunk_rows=chunk_rows, keep=keep,
                      features=model.feature_columns, row_expectations=cfg.row_expectations, format=OUTPUT_FORMAT)
    out = str(output_dir or cfg.output_dir)
    if "://" not in out and not Path(out).is_absolute():
        out = str(settings.state_dir / out)
    run_dir = join(out, safe_name(model.name), f"v{model.version}", f"{_input_name(input_uri)}-{key}")
    job = BatchJob(model, input_uri, tuple(files), run_dir, key, chunk_rows, cfg.score_rows, keep, cfg.on_bad_rows,
                   cfg.row_expectations, cfg.drift_sample_rows, cfg.max_parallel)
    fs, root = filesystem(run_dir)
    manifest = Manifest.load(fs, root)
    if manifest is not None and manifest.status == "complete" and is_complete(fs, root):
        return replace(job, complete=True)
    if manifest is None:
        identity = {"model": model.name, "version": model.version, "alias": model.alias, "input": input_uri,
                    "files": [f.rel for f in files], "chunk_rows": chunk_rows, "variant": model.variant}
        fs.makedirs(root, exist_ok=True)
        Manifest(key, identity, job.total_rows, len(plan)).save(fs, root)
    return job


def _check_kept(uri: str, files: list[InputFile], keep: tuple[str, ...]) -> None:
    for f in files if keep else []:
        missing = [c for c in keep if c not in schema_of(uri, f).names]
        if missing:
            raise BatchError(f"input file {f.rel!r} lacks the columns to keep {missing}")


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def _input_name(uri: str) -> str:
    return safe_name(Path(uri.rstrip("/").split("://")[-1]).stem)


