"""The router's JSON access log and the feedback labels file as files: finding a time in them by bisection,
reading whole lines only (a line being written is left for the next read), parsing a line. Lines are in ``ts``
order give or take a reload's overlap; see deployments/metrics.py for what the lines mean."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

SEARCH_BLOCK = 64 << 10  # below this many bytes, scan instead of bisecting
TS_PREFIX = b'{"ts":'


def line_ts(line: bytes) -> float | None:
    """The ``ts`` of a log line, without parsing all of it; None when the line is not one of ours."""
    if line.startswith(TS_PREFIX):
        comma = line.find(b",", len(TS_PREFIX))
        try:
            return float(line[len(TS_PREFIX) : comma])
        except ValueError:
            return None
    return None


def bisect(fh: BinaryIO, low: int, high: int, since: float) -> int:
    """A line-start offset in [low, high] at or before the first line with ``ts >= since``."""
    while high - low > SEARCH_BLOCK:
        mid = (low + high) // 2
        fh.seek(mid)
        fh.readline()  # the rest of the line mid fell into
        line_start = fh.tell()
        ts = None
        while ts is None and fh.tell() < high:
            line = fh.readline()
            if not line.endswith(b"\n"):
                break
            ts = line_ts(line)
        if ts is None or ts >= since:
            high = mid
        else:
            low = line_start
    return low


def lines(fh: BinaryIO, offset: int) -> Iterator[bytes]:
    fh.seek(offset)
    for line in fh:
        if not line.endswith(b"\n"):
            return  # being written: the next window gets it whole
        yield line


def read_labels(path: Path, since: float, wanted: set[str]) -> dict[str, list[str]]:
    """Labels of the ``wanted`` request ids sent at or after ``since`` (a label follows its answer); the last one
    sent wins. No file yet: no labels. Malformed lines are skipped."""
    found: dict[str, list[str]] = {}
    try:
        fh = open(path, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return found
    with fh:
        for line in lines(fh, bisect(fh, 0, os.fstat(fh.fileno()).st_size, since)):
            rec = parse_line(line)
            if rec is None or str(rec.get("request_id")) not in wanted or not isinstance(rec.get("labels"), list):
                continue
            found[str(rec["request_id"])] = [str(x) for x in rec["labels"]]
    return found


def parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def upstream_seconds(value: Any) -> float | None:
    """``$upstream_response_time``: "0.004", "0.002, 0.004" after a retry (summed), "-" or "" when none."""
    total, seen = 0.0, False
    for part in str(value or "").replace(":", ",").split(","):
        try:
            total += float(part)
            seen = True
        except ValueError:
            continue
    return total if seen else None
