"""One chunk of a batch run: check its rows, score the good ones, write the part (and rejects) atomically.

Runs wherever the executor puts it (a thread, a Prefect task, a Dask worker); it only reads its job and its chunk
and returns a :class:`PartRecord`, which the coordinating process records in the manifest.
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from canaryflow.batch.checks import RowChecks
from canaryflow.batch.io import FILE_BITS, ChunkSpec, InputFile, filesystem, join
from canaryflow.batch.manifest import PartRecord
from canaryflow.batch.scorer import scorer_for
from canaryflow.batch.write import write_parquet_atomic
from canaryflow.core.errors import BatchError

if TYPE_CHECKING:
    from canaryflow.batch.job import BatchJob

SCORES, REJECTS, SAMPLES = "scores", "rejects", "_samples"  # directories of the run directory

_checks: dict[str, RowChecks] = {}


def score_chunk(job: BatchJob, spec: ChunkSpec, table: pa.Table) -> PartRecord:
    """Check, score and write one chunk: ``part-<key>.parquet`` and, if rows were bad, ``rejects/part-<key>``."""
    started = time.monotonic()
    fs, root = filesystem(job.run_dir)
    file = job.files[spec.file]
    checks = _checks.get(job.run_key) or _checks.setdefault(job.run_key, RowChecks(
        list(job.model.feature_columns), job.model.input_dtype, job.model.suite, job.row_expectations))
    checked = checks.apply(table)
    rows = spec.start + np.arange(table.num_rows, dtype=np.int64)
    if checked.n_bad and job.on_bad_rows == "fail":
        bad = rows[~checked.good]
        listed = "; ".join(f"{file.rel}:{r}: {why}" for r, why in zip(bad[:5], checked.reasons[:5], strict=False))
        raise BatchError(f"{checked.n_bad} of {table.num_rows} rows of chunk {spec.key} are bad and the policy is "
                         f"on_bad_rows=fail (set it to 'reject' to write them to rejects/): {listed}")
    scorer = scorer_for(job.model, job.score_rows, job.max_parallel)
    probs = scorer.probabilities(checked.x)
    scored_at = datetime.now(UTC)
    kept = table.filter(pa.array(checked.good)) if checked.n_bad else table
    out = _scored_table(job, spec, file, rows[checked.good], probs, kept, scorer.class_labels, scored_at)
    part = f"{SCORES}/{spec.part_name}"
    write_parquet_atomic(fs, out, join(root, part))
    rejects = None
    if checked.n_bad:
        rejects = f"{REJECTS}/{spec.part_name}"
        write_parquet_atomic(fs, _rejects_table(job, file, spec, rows[~checked.good], checked.reasons,
                                                table.filter(pa.array(~checked.good))), join(root, rejects))
    _write_sample(job, spec, checked.x, fs, root)
    return PartRecord(spec.key, spec.file, spec.chunk, spec.start, table.num_rows, len(checked.x), checked.n_bad,
                      part, rejects, checked.unexpected, round(time.monotonic() - started, 4),
                      scored_at.isoformat())


def _const(value: str, n: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value]))


def _ids(spec: ChunkSpec, file: InputFile, rows: np.ndarray) -> dict[str, pa.Array]:
    return {"row_id": pa.array((spec.file << FILE_BITS) + rows), "source_file": _const(file.rel, len(rows)),
            "source_row": pa.array(rows)}


def _scored_table(job: BatchJob, spec: ChunkSpec, file: InputFile, rows: np.ndarray, probs: np.ndarray,
                  kept: pa.Table, labels: list[str] | None, scored_at: datetime) -> pa.Table:
    n = len(rows)
    top = probs.argmax(axis=1).astype(np.int32) if n else np.zeros(0, np.int32)
    prediction = pa.DictionaryArray.from_arrays(pa.array(top), pa.array(labels)) if labels else pa.array(
        top.astype(np.int64))
    cols: dict[str, Any] = _ids(spec, file, rows)
    cols.update({c: kept.column(c) for c in job.keep_columns})
    cols.update({"prediction": prediction, "class_index": pa.array(top),
                 "probability": pa.array(probs.max(axis=1) if n else np.zeros(0, np.float32))})
    cols.update({f"proba_{k}": pa.array(probs[:, k]) for k in range(probs.shape[1])})
    cols.update({"model_name": _const(job.model.name, n), "model_version": _const(job.model.version, n),
                 "scored_at": pa.array(np.full(n, np.datetime64(scored_at.replace(tzinfo=None), "us")),
                                       pa.timestamp("us", tz="UTC"))})
    return pa.table(cols)


def _rejects_table(job: BatchJob, file: InputFile, spec: ChunkSpec, rows: np.ndarray, reasons: list[str],
                   bad: pa.Table) -> pa.Table:
    features = [c for c in job.model.feature_columns if c in bad.column_names]
    values = [json.dumps(r, default=str) for r in bad.select(features).to_pylist()]
    cols: dict[str, Any] = _ids(spec, file, rows)
    cols.update({c: bad.column(c) for c in job.keep_columns})
    cols.update({"reason": pa.array(reasons, pa.string()), "values": pa.array(values, pa.string())})
    return pa.table(cols)


def _write_sample(job: BatchJob, spec: ChunkSpec, x: np.ndarray, fs: Any, root: str) -> None:
    """A share of the chunk's scored rows proportional to its size, for the drift report (bounded in total)."""
    k = min(len(x), math.ceil(job.drift_sample_rows * spec.rows / max(job.total_rows, 1)))
    pick = np.random.default_rng(spec.file * 1_000_003 + spec.chunk).choice(len(x), size=k, replace=False)
    sample = pa.table({c: x[np.sort(pick), j] for j, c in enumerate(job.model.feature_columns)})
    write_parquet_atomic(fs, sample, join(root, SAMPLES, spec.part_name))
