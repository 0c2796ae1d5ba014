"""The manifest of a batch run: which parts are finished, and the proof that every input row is in exactly one.

``manifest.json`` sits in the run directory and is replaced atomically (at most once a second while parts land,
and when the run stops). Only the process coordinating the run writes it (tasks return their part's record; they
never touch it). A part file that exists but is not in the manifest (a crash before the manifest caught up) is
rewritten under the same name on the next run, so it can never count twice. ``_SUCCESS`` is written last, after
:func:`verify` passed and the summary was recorded: an output directory without it is not complete, whatever it
holds.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.parquet as pq

from canaryflow.batch_io import ChunkSpec, join, write_text_atomic
from canaryflow.errors import BatchError

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
        for name, expected in ((p["part"], p["rows_scored"]), (p["rejects"], p["rows_rejected"])):
            if name is not None:
                found = _rows_in_file(fs, join(root, name))
                if found != expected:
                    problems.append(f"{name} holds {found} rows, the manifest says {expected}")
        totals["parts"] += 1
        for k in ("rows_in", "rows_scored", "rows_rejected"):
            totals[k] += p[k]
    if totals["rows_in"] != total_rows and not missing:
        problems.append(f"{totals['rows_in']} rows accounted for, the input has {total_rows}")
    if problems:
        raise BatchError("batch output does not add up: " + "; ".join(problems[:10]))
    return totals


def _rows_in_file(fs: Any, path: str) -> int | None:
    try:
        with fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).metadata.num_rows
    except FileNotFoundError:
        return None
