"""Batch output writes that survive faults: temporary name, fsync, rename, fsync of the directory.

A crash (SIGKILL, power loss) leaves at most a ``.tmp-*`` file, which the next run deletes; a failed write (disk
full, fsync or rename error) removes its temporary file and raises :class:`BatchWriteError` naming the file and
what to do. Final names only ever hold complete files, so a part listed in the manifest is whole unless something
outside the run damaged it (the run checks that too: :func:`canaryflow.batch.run_chunks`).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import io
import os
import signal
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from canaryflow.batch.io import join
from canaryflow.core.errors import BatchWriteError

FAULT_ENV = "CANARYFLOW_TEST_FAULT"  # tests only: see _fault


def write_parquet_atomic(fs: Any, table: pa.Table, path: str) -> None:
    """Write under a temporary name in the same directory, then rename: readers never see half a file."""
    # snappy (3x faster to write than zstd here); dictionary pages only for the columns that are dictionaries:
    # trying them on random floats cost 9x the write time
    dictionary = [f.name for f in table.schema if pa.types.is_dictionary(f.type)]
    _write_atomic(fs, path, lambda fh: pq.write_table(table, fh, use_dictionary=dictionary))


def write_text_atomic(fs: Any, text: str, path: str) -> None:
    _write_atomic(fs, path, lambda fh: fh.write(text.encode()))


def _write_atomic(fs: Any, path: str, write: Callable[[Any], Any]) -> None:
    """Temporary file, flush + fsync, rename, fsync of the directory (local files). Any failure removes the
    temporary file and raises :class:`BatchWriteError`: nothing half-written ever sits under the final name."""
    directory = os.path.dirname(path)
    tmp = join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        fs.makedirs(directory, exist_ok=True)
        with fs.open(tmp, "wb") as fh:
            write(fh)
            _fault("write", path)
            _sync(fh)
        _fault("rename", path)
        fs.mv(tmp, path)
        _sync_dir(fs, directory)
    except OSError as exc:  # pyarrow's ArrowIOError is an OSError too
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)
        raise write_error(path, exc) from exc


def write_error(path: str, exc: OSError, written: str = "") -> BatchWriteError:
    """The typed error of a failed output write: what failed, where, and what to do (``written``: how far the run
    got, added by whoever knows)."""
    done = f"; {written}" if written else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return BatchWriteError(f"output disk full: no space left writing {path} ({exc.strerror or exc}){done}. "
                               "Free space and re-run: finished parts are kept", path, exc.errno)
    return BatchWriteError(f"cannot write {path}: {type(exc).__name__}: {exc}{done}. Nothing half-written is "
                           "visible (temporary file, then rename); fix the output location (permissions, quota, "
                           "storage health) and re-run: finished parts are kept", path, exc.errno)


def _sync(fh: Any) -> None:
    """Flush and fsync: the data must be on disk before the rename makes it visible. Errors raise; only a file
    without a descriptor (an object store's upload buffer, made durable by its close) is not fsynced."""
    fh.flush()
    try:
        fd = fh.fileno()
    except (AttributeError, io.UnsupportedOperation, NotImplementedError):
        return
    os.fsync(fd)


def _sync_dir(fs: Any, directory: str) -> None:
    # the rename itself is durable only once the directory entry is on disk (local filesystems)
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fault(point: str, path: str) -> None:
    """Test-only fault injection for the drills (tests/drills): ``CANARYFLOW_TEST_FAULT=<action>:<point>:<name>``
    with action ``kill`` (SIGKILL this process) or ``enospc`` (disk full), point ``write`` (data written, not yet
    synced) or ``rename`` (temporary file complete, not yet renamed), name the end of the output path
    (``scores/part-00000-000003.parquet``, or a pattern: ``scores/*`` is the first part this process writes).
    Unset (always, outside tests) it does nothing."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    action, at, name = spec.split(":", 2)
    if at != point or not fnmatch.fnmatchcase(path, "*/" + name):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def remove_temporaries(fs: Any, root: str) -> int:
    """Delete ``.tmp-*`` files a crashed run left behind; returns how many."""
    if not fs.exists(root):
        return 0
    stale = [p for p in fs.find(root) if os.path.basename(p).startswith(".tmp-")]
    for p in stale:
        fs.rm(p)
    return len(stale)
