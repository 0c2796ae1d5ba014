"""Batch input and output: discovery, chunk plans, streaming chunks from any row-group layout, atomic writes."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from canaryflow.batch import write as batch_write
from canaryflow.batch.io import discover, filesystem, fingerprint, plan_chunks, stream_chunks
from canaryflow.batch.write import FAULT_ENV, remove_temporaries, write_parquet_atomic, write_text_atomic
from canaryflow.core.errors import BatchError, BatchWriteError


def _write(path: Path, n: int, row_group_size: int | None = None, start: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"i": np.arange(start, start + n), "f0": np.ones(n, np.float32)}), path,
                   row_group_size=row_group_size)


def test_discover_finds_parquet_recursively_sorted_and_skips_markers(tmp_path: Path) -> None:
    _write(tmp_path / "b" / "x.parquet", 5)
    _write(tmp_path / "a.parquet", 3, row_group_size=2)
    _write(tmp_path / "_temporary" / "y.parquet", 4)  # Spark's in-progress output
    _write(tmp_path / ".hidden.parquet", 4)
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "notes.txt").write_text("not data")
    files = discover(str(tmp_path))
    assert [(f.rel, f.rows, f.row_groups) for f in files] == [("a.parquet", 3, (2, 1)), ("b/x.parquet", 5, (5,))]
    single = discover(str(tmp_path / "a.parquet"))
    assert [(f.rel, f.rows) for f in single] == [("a.parquet", 3)]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nope", "does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds no *.parquet files"),
    (lambda d: (d / "bad.parquet").write_bytes(b"not parquet at all") and d / "bad.parquet", "not readable Parquet"),
])
def test_unreadable_input_is_a_clear_error(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(BatchError, match=message.replace("*", r"\*")):
        discover(str(make(tmp_path)))


def test_fsspec_uri_input() -> None:
    fs = fsspec.filesystem("memory")
    with fs.open("/batch-io-test/in/d.parquet", "wb") as fh:
        pq.write_table(pa.table({"i": np.arange(10)}), fh)
    files = discover("memory://batch-io-test/in")
    assert [(f.rel, f.rows) for f in files] == [("d.parquet", 10)]
    fs.rm("/batch-io-test", recursive=True)


def test_plan_covers_every_row_once_with_stable_names(tmp_path: Path) -> None:
    _write(tmp_path / "a.parquet", 10)
    _write(tmp_path / "b.parquet", 4)
    files = discover(str(tmp_path))
    plan = plan_chunks(files, 4)
    assert [(s.file, s.chunk, s.start, s.rows) for s in plan] == [
        (0, 0, 0, 4), (0, 1, 4, 4), (0, 2, 8, 2), (1, 0, 0, 4)]
    assert plan[1].part_name == "part-00000-000001.parquet"
    assert plan == plan_chunks(discover(str(tmp_path)), 4)
    with pytest.raises(BatchError, match="chunk_rows"):
        plan_chunks(files, 0)


@pytest.mark.parametrize("n, row_group, chunk", [(100, 7, 10), (100, 50, 8), (100, 100, 33), (64, 16, 16),
                                                 (5, 2, 100)])
def test_stream_chunks_yields_exact_row_ranges_for_any_row_group_layout(tmp_path: Path, n: int, row_group: int,
                                                                       chunk: int) -> None:
    _write(tmp_path / "d.parquet", n, row_group_size=row_group)
    (f,) = discover(str(tmp_path))
    plan = plan_chunks([f], chunk)
    fs, _ = filesystem(str(tmp_path))
    got = list(stream_chunks(fs, f, plan, ["i", "absent"]))
    assert [s for s, _ in got] == plan
    for spec, table in got:
        assert table.column_names == ["i"]
        assert table.column("i").to_pylist() == list(range(spec.start, spec.start + spec.rows))
    skip = {plan[0].key, plan[-1].key}
    rest = [s for s, _ in stream_chunks(fs, f, plan, ["i"], skip)]
    assert rest == [s for s in plan if s.key not in skip]


def test_stream_chunks_notices_a_file_that_shrank(tmp_path: Path) -> None:
    _write(tmp_path / "d.parquet", 20, row_group_size=5)
    (f,) = discover(str(tmp_path))
    plan = plan_chunks([f], 8)
    _write(tmp_path / "d.parquet", 10, row_group_size=5)
    fs, _ = filesystem(str(tmp_path))
    shrunk = type(f)(f.path, f.rel, f.size, f.version, (5, 5))
    with pytest.raises(BatchError, match="did it change"):
        list(stream_chunks(fs, shrunk, plan, ["i"]))


def test_fingerprint_follows_content_and_identity(tmp_path: Path) -> None:
    _write(tmp_path / "d.parquet", 10)
    files = discover(str(tmp_path))
    key = fingerprint(files, model="m", version="1")
    assert key == fingerprint(discover(str(tmp_path)), model="m", version="1")
    assert key != fingerprint(files, model="m", version="2")
    _write(tmp_path / "d.parquet", 11)
    os.utime(tmp_path / "d.parquet", (1, 1))
    assert key != fingerprint(discover(str(tmp_path)), model="m", version="1")


def test_atomic_write_leaves_only_the_final_file_and_temporaries_are_cleaned(tmp_path: Path) -> None:
    fs, root = filesystem(str(tmp_path))
    write_parquet_atomic(fs, pa.table({"x": [1, 2]}), f"{root}/out/part.parquet")
    assert sorted(os.listdir(tmp_path / "out")) == ["part.parquet"]
    (tmp_path / "out" / ".tmp-dead-part.parquet").write_bytes(b"half a file")
    assert remove_temporaries(fs, root) == 1
    assert sorted(os.listdir(tmp_path / "out")) == ["part.parquet"]


def _fail(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize("where", ["fsync", "rename"])
def test_a_failed_fsync_or_rename_raises_names_the_file_and_leaves_nothing(tmp_path: Path, where: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    fs, root = filesystem(str(tmp_path))
    if where == "fsync":
        monkeypatch.setattr(batch_write.os, "fsync", _fail(errno.EIO))
    else:
        monkeypatch.setattr(type(fs), "mv", _fail(errno.EXDEV))
    with pytest.raises(BatchWriteError, match=rf"cannot write {root}/out/part\.parquet: OSError: .*re-run") as err:
        write_parquet_atomic(fs, pa.table({"x": [1, 2]}), f"{root}/out/part.parquet")
    assert err.value.path == f"{root}/out/part.parquet"
    assert err.value.errno == (errno.EIO if where == "fsync" else errno.EXDEV)
    assert os.listdir(tmp_path / "out") == []  # no final file, no temporary


def test_disk_full_is_a_clear_error_that_survives_pickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs, root = filesystem(str(tmp_path))
    monkeypatch.setenv(FAULT_ENV, "enospc:write:out/summary.json")
    write_text_atomic(fs, "{}", f"{root}/out/other.json")  # the fault names one file only
    with pytest.raises(BatchWriteError, match="output disk full: no space left writing .*/out/summary.json "
                                              r"\(No space left on device\)\. Free space and re-run: finished "
                                              "parts are kept") as err:
        write_text_atomic(fs, "{}", f"{root}/out/summary.json")
    assert sorted(os.listdir(tmp_path / "out")) == ["other.json"]
    copy = pickle.loads(pickle.dumps(err.value))
    assert (str(copy), copy.path, copy.errno) == (str(err.value), err.value.path, errno.ENOSPC)


def test_files_without_a_descriptor_are_written_without_fsync() -> None:
    fs = fsspec.filesystem("memory")
    write_parquet_atomic(fs, pa.table({"x": [1, 2, 3]}), "/batch-write-test/out/part.parquet")
    with fs.open("/batch-write-test/out/part.parquet", "rb") as fh:
        assert pq.read_table(fh).num_rows == 3
    assert fs.ls("/batch-write-test/out", detail=False) == ["/batch-write-test/out/part.parquet"]
    fs.rm("/batch-write-test", recursive=True)
