"""The manifest of a batch run: which parts are finished, and the proof that every input row is in exactly one.

``manifest.json`` sits in the run directory and is replaced atomically (at most once a second while parts land,
and when the run stops). Only the process coordinating the run writes it (tasks return their part's record; they
never touch it). A part file that exists but is not in the manifest (a crash before the manifest caught up) is
rewritten under the same name on the next run, so it can never count twice; a listed part whose files are
damaged (truncated, unreadable, another row count) is dropped from the manifest and rewritten too (:func:`repair`).
``_SUCCESS`` is written last, after :func:`verify` passed and the summary was recorded: an output directory
without it is not complete, whatever it holds.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from canaryflow.batch.io import ChunkSpec, join
from canaryflow.batch.write import write_text_atomic
from canaryflow.core.errors import BatchError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"
FORMAT = 1


@dataclass
class PartRecord:
    """One finished chunk: its rows, where its outputs are, what its checks found."""

    key: str
    file: int
    chunk: int
    start: int
    rows_in: int
    rows_scored: int
    rows_rejected: int
    part: str  # relative to the run directory
    rejects: str | None
    unexpected: dict[str, int]
    seconds: float
    scored_at: str


@dataclass
class Manifest:
    """What the run is (identity) and how far it got (parts)."""

    run_key: str
    identity: dict[str, Any]
    total_rows: int
    total_chunks: int
    status: str = "running"  # running | failed | complete
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    error: str | None = None
    summary: dict[str, Any] | None = None
    format: int = FORMAT

    def record(self, part: PartRecord) -> None:
        self.parts[part.key] = asdict(part)

    def save(self, fs: Any, root: str) -> None:
        self.updated_at = time.time()
        write_text_atomic(fs, json.dumps(asdict(self), indent=1, sort_keys=True), join(root, MANIFEST))

    @classmethod
    def load(cls, fs: Any, root: str) -> Manifest | None:
        path = join(root, MANIFEST)
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as fh:
            data = json.loads(fh.read())
        if data.get("format") != FORMAT:
            raise BatchError(f"{path} has manifest format {data.get('format')}, this canaryflow writes {FORMAT}")
        return cls(**data)

    @property
    def rows_done(self) -> int:
        return sum(p["rows_in"] for p in self.parts.values())


def is_complete(fs: Any, root: str) -> bool:
    return fs.exists(join(root, SUCCESS))


def verify(manifest: Manifest, plan: list[ChunkSpec], fs: Any, root: str, total_rows: int) -> dict[str, int]:
    """Every planned chunk finished once, its rows in = scored + rejected, and the files hold those rows.

    Row ids are (file, row index), and chunks are disjoint row ranges, so a complete, consistent set of parts has
    every input row exactly once. Returns the totals; raises BatchError listing what does not add up.
    """
    problems: list[str] = []
    planned = {s.key: s for s in plan}
    missing = sorted(set(planned) - set(manifest.parts))
    extra = sorted(set(manifest.parts) - set(planned))
    if missing:
        problems.append(f"{len(missing)} chunks never finished (first: {missing[:3]})")
    if extra:
        problems.append(f"{len(extra)} parts are not in the plan (first: {extra[:3]})")
    totals = {"rows_in": 0, "rows_scored": 0, "rows_rejected": 0, "parts": 0}
    for key, p in sorted(manifest.parts.items()):
        spec = planned.get(key)
        if spec is None:
            continue
        if (p["start"], p["rows_in"]) != (spec.start, spec.rows):
            problems.append(f"part {key} covers rows {p['start']}+{p['rows_in']}, planned {spec.start}+{spec.rows}")
        if p["rows_scored"] + p["rows_rejected"] != p["rows_in"]:
            problems.append(f"part {key}: {p['rows_in']} rows in != {p['rows_scored']} scored + "
                            f"{p['rows_rejected']} rejected")
        damage = part_damage(fs, root, p)
        if damage:
            problems.append(damage)
        totals["parts"] += 1
        for k in ("rows_in", "rows_scored", "rows_rejected"):
            totals[k] += p[k]
    if totals["rows_in"] != total_rows and not missing:
        problems.append(f"{totals['rows_in']} rows accounted for, the input has {total_rows}")
    if problems:
        raise BatchError("batch output does not add up: " + "; ".join(problems[:10]))
    return totals


def repair(manifest: Manifest, fs: Any, root: str, samples_dir: str | None = None) -> dict[str, str]:
    """Drop the listed parts whose files cannot be trusted (missing, truncated, unreadable, another row count than
    recorded; their drift sample under ``samples_dir`` unreadable), so the run scores them again under the same
    names, and save the manifest; returns why, by key.

    Writes are atomic, so this is damage from outside the run (a copy cut short, a disk error, a hand edit):
    without it every re-run would fail in :func:`verify`, for ever.
    """
    damaged = {}
    for key, record in manifest.parts.items():
        sample = join(samples_dir, os.path.basename(record["part"])) if samples_dir else None
        why = part_damage(fs, root, record) or (sample and file_damage(fs, join(root, sample), None, sample))
        if why:
            damaged[key] = why
    for key, why in damaged.items():
        log.warning("batch part %s is listed in the manifest but %s: scoring it again", key, why)
        manifest.parts.pop(key)
    if damaged:
        manifest.save(fs, root)  # before re-scoring: a crash from here on must not trust them either
    return damaged


def part_damage(fs: Any, root: str, record: dict[str, Any]) -> str | None:
    """Why the files of a listed part do not hold what the manifest says (None: they do)."""
    for name, expected in ((record["part"], record["rows_scored"]), (record["rejects"], record["rows_rejected"])):
        if name is not None:
            why = file_damage(fs, join(root, name), expected, name)
            if why:
                return why
    return None


def file_damage(fs: Any, path: str, expected_rows: int | None, name: str) -> str | None:
    """Why a Parquet output file is not whole (missing, unreadable footer, ``expected_rows`` not matched)."""
    try:
        with fs.open(path, "rb") as fh:
            rows = pq.ParquetFile(fh).metadata.num_rows
    except FileNotFoundError:
        return f"{name} is missing"
    except (OSError, pa.ArrowException) as exc:  # truncated or garbled: no valid footer
        return f"{name} is unreadable ({type(exc).__name__}: {str(exc)[:200]})"
    if expected_rows is not None and rows != expected_rows:
        return f"{name} holds {rows} rows, the manifest says {expected_rows}"
    return None
