"""The router's JSON access log and the feedback labels file as files: finding a time in them by bisection,
reading whole lines only (a line being written is left for the next read), parsing a line. Lines are in ``ts``
order give or take a reload's overlap; see deployments/metrics.py for what the lines mean.

The access log is rotated (:meth:`deployments.router.NginxRouter.rotate_logs`): ``access.log`` is renamed to
``access.log.1`` (``.1`` to ``.2`` ... the oldest dropped) and nginx writes to a new ``access.log``. A reader opens
the whole chain with :func:`open_rotated`, which sees every line exactly once even while a rotation renames the
files under it."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

SEARCH_BLOCK = 64 << 10  # below this many bytes, scan instead of bisecting
TS_PREFIX = b'{"ts":'


HEAD_BYTES = 64
"""A file's first bytes (its first line's ``ts`` and more): a new file that reuses a freed inode has another head."""


@dataclass
class LogFile:
    """One file of a log's rotation chain, open for reading."""

    path: Path
    """Its name when it was opened (a rotation may have renamed it since: read through ``fh``)."""
    fh: BinaryIO
    stat: os.stat_result
    """``fstat`` at open: ``st_size`` is what the reader looks at, later appends wait for the next read."""
    rotated: bool
    """Not the live file: nginx no longer writes to it, but for the last lines of a reload's old workers."""

    @property
    def key(self) -> tuple[int, int]:
        return self.stat.st_dev, self.stat.st_ino

    def head(self) -> bytes:
        return os.pread(self.fh.fileno(), HEAD_BYTES, 0)


def rotated_path(path: Path, index: int) -> Path:
    """``path`` (index 0) or its ``index``-th newest rotated file, ``<path>.<index>``."""
    return path if index == 0 else path.with_name(f"{path.name}.{index}")


def rotated_indices(path: Path) -> list[int]:
    """Indices of the rotated files of ``path`` that exist now (``access.log.3`` -> 3), ascending."""
    pattern = re.compile(re.escape(path.name) + r"\.([1-9][0-9]{0,5})")
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for name in names if (m := pattern.fullmatch(name)))


def open_rotated(path: Path, stack: ExitStack) -> list[LogFile]:
    """``path`` and its rotated files, open (``stack`` closes them), oldest first, each file once; files that do
    not exist are left out (none at all: ``[]``). Other errors of ``open`` (OSError) are raised.

    Safe against a rotation running meanwhile, without a lock: a rotation only renames a file to the next higher
    index (or deletes the oldest), and the files are opened in increasing index order, up to one past the highest
    index there was. A renamed file is therefore met at its old name or at its new one, never missed; met at both,
    it is kept once (by inode). An index missing in the middle (a rotation is shifting the files) is skipped."""
    top = max(rotated_indices(path), default=0) + 1
    files: list[LogFile] = []
    seen: set[tuple[int, int]] = set()
    for index in range(top + 1):
        name = rotated_path(path, index)
        try:
            fh = stack.enter_context(open(name, "rb"))  # noqa: SIM115 (the stack closes it)
        except FileNotFoundError:
            continue
        file = LogFile(name, fh, os.fstat(fh.fileno()), rotated=index > 0)
        if file.key in seen:
            continue  # renamed between two opens: already open under its earlier name
        seen.add(file.key)
        files.append(file)
    return files[::-1]


def last_ts(fh: BinaryIO, size: int) -> float | None:
    """The ``ts`` of the last whole line of ours among the file's last SEARCH_BLOCK bytes below ``size``; None when
    there is none there."""
    start = max(0, size - SEARCH_BLOCK)
    fh.seek(start)
    block = fh.read(size - start)
    for line in reversed(block.split(b"\n")[1 if start else 0 : -1]):  # the first may be the end of a longer one
        ts = line_ts(line)
        if ts is not None:
            return ts
    return None


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
