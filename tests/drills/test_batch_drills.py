"""Fault drills of batch inference: a run killed with SIGKILL in the middle of a part write, a run stopped by a
full disk, and parts listed in the manifest but damaged afterwards; each then re-run to exactly the input rows.

Faults are deterministic: the real writer (canaryflow/batch/write.py) kills its own process or raises
ENOSPC at a named file and point when the test sets ``CANARYFLOW_TEST_FAULT`` (never set outside tests). The
file drills run the real batch code on real Parquet files without servers (the model of
tests/unit/test_batch_run.py); the stack drills run `canaryflow score` against a model released by the real
pipeline (the fixtures of tests/integration/test_batch_inference.py).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from canaryflow.batch import run as batch
from canaryflow.batch.io import FILE_BITS, filesystem
from canaryflow.batch.manifest import MANIFEST, SUCCESS, Manifest
from canaryflow.batch.model import BatchModel
from canaryflow.batch.write import FAULT_ENV
from canaryflow.core.errors import BatchWriteError
from tests.integration.test_batch_inference import MODEL, _assert_exactly_once, _dataset, _run_dir, release_model
from tests.unit.test_batch_run import _inputs, _job, _scores, _settings, make_model

PROJECT = Path(__file__).resolve().parents[2]
ROWS = {"a.parquet": 350, "sub/b.parquet": 180}  # what tests.unit.test_batch_run._inputs writes: chunks of 100


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> BatchModel:
    """A real serving bundle (torch.export, the handler's code), as in tests/unit/test_batch_run.py."""
    return make_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def released(stack) -> str:
    """MODEL released by the real pipeline on the session's stack (once per session)."""
    return release_model(stack)


def _expected_ids(rows: list[int]) -> set[int]:
    return {(i << FILE_BITS) | r for i, n in enumerate(rows) for r in range(n)}


def _listed(run_dir: str | Path) -> Manifest:
    fs, root = filesystem(str(run_dir))
    return Manifest.load(fs, root)


def _exactly_once(job: batch.BatchJob) -> None:
    ids = _scores(job).column("row_id").to_pylist()
    assert len(ids) == sum(ROWS.values()) and set(ids) == _expected_ids(list(ROWS.values()))
    assert (Path(job.run_dir) / SUCCESS).exists() and not list(Path(job.run_dir).rglob(".tmp-*"))


@pytest.mark.parametrize("point, target", [
    ("rename", "scores/part-00001-000001.parquet"),  # the part is complete under its temporary name
    ("write", "_samples/part-00001-000001.parquet"),  # the part is renamed, the manifest does not list it
])
@pytest.mark.usefixtures("default_settings")
def test_a_run_killed_during_a_part_write_resumes_to_exactly_the_input_rows(tmp_path: Path, model: BatchModel,
                                                                            point: str, target: str) -> None:
    data = _inputs(tmp_path / "in")
    settings = _settings(tmp_path, max_parallel=2)
    job = _job(settings, model, data)
    (tmp_path / "job.pickle").write_bytes(pickle.dumps((job, settings)))
    driver = ("import pickle, sys; from canaryflow.batch import run as batch; "
              "job, settings = pickle.loads(open(sys.argv[1], 'rb').read()); "
              "batch.run_job(job, settings, report=False)")
    killed = subprocess.run([sys.executable, "-c", driver, str(tmp_path / "job.pickle")], cwd=PROJECT,
                            env={**os.environ, FAULT_ENV: f"kill:{point}:{target}"}, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = Path(job.run_dir)
    assert not (run / SUCCESS).exists()
    folder, name = target.split("/")
    assert any(p.name.endswith(f"-{name}") for p in (run / folder).glob(".tmp-*"))  # cut mid-write
    assert (run / "scores" / name).exists() == (point == "write")
    listed = _listed(run)
    # the last chunk is read only after three others finished: the first finished part is in the manifest
    assert listed.status == "running" and 1 <= len(listed.parts) < 6 and "00001-000001" not in listed.parts

    summary = batch.run_job(_job(settings, model, data), settings, report=False)
    assert summary["parts_skipped"] == len(listed.parts) and summary["parts_repaired"] == 0
    assert summary["rows_processed"] == 530 - listed.rows_done and summary["rows_in"] == 530
    _exactly_once(job)


@pytest.mark.usefixtures("default_settings")
def test_a_full_disk_stops_the_run_with_a_clear_error_then_it_resumes(tmp_path: Path, model: BatchModel,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = _inputs(tmp_path / "in")
    settings = _settings(tmp_path)
    job = _job(settings, model, data)
    monkeypatch.setenv(FAULT_ENV, "enospc:write:scores/part-00000-000003.parquet")
    with pytest.raises(BatchWriteError) as raised:
        batch.run_job(job, settings, report=False)
    message = str(raised.value)
    found = re.fullmatch(r"output disk full: no space left writing (\S+) \(No space left on device\); (\d) of 6 "
                         r"parts \(([\d,]+) of 530 rows\) were finished before it, in (\S+)\. Free space and "
                         r"re-run: finished parts are kept", message)
    assert found, message
    assert found[1] == f"{job.run_dir}/scores/part-00000-000003.parquet" and found[4] == job.run_dir
    listed = _listed(job.run_dir)
    assert listed.status == "failed" and "No space left on device" in listed.error
    assert (int(found[2]), int(found[3].replace(",", ""))) == (len(listed.parts), listed.rows_done)
    assert "00000-000003" not in listed.parts and not list(Path(job.run_dir).rglob(".tmp-*"))
    assert not (Path(job.run_dir) / SUCCESS).exists()

    monkeypatch.delenv(FAULT_ENV)  # space is back
    summary = batch.run_job(_job(settings, model, data), settings, report=False)
    assert summary["parts_skipped"] == len(listed.parts) and summary["rows_processed"] == 530 - listed.rows_done
    _exactly_once(job)


@pytest.mark.usefixtures("default_settings")
def test_damaged_parts_listed_in_the_manifest_are_scored_again(tmp_path: Path, model: BatchModel) -> None:
    data = _inputs(tmp_path / "in")
    settings = _settings(tmp_path)
    job = _job(settings, model, data)
    with pytest.raises(batch.BatchInterrupted):
        batch.run_job(job, settings, report=False, stop_after_parts=4)
    listed = _listed(job.run_dir)
    truncated, short, sample, intact = sorted(listed.parts)
    run = Path(job.run_dir)
    part = run / "scores" / f"part-{truncated}.parquet"
    before = pq.read_table(part)
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # a copy cut short
    shorter = run / "scores" / f"part-{short}.parquet"
    pq.write_table(pq.read_table(shorter).slice(0, 10), shorter)  # readable, but not the rows recorded
    (run / "_samples" / f"part-{sample}.parquet").write_bytes(b"PAR1")  # the drift report would fail on it

    summary = batch.run_job(_job(settings, model, data), settings, report=False)
    assert (summary["parts_repaired"], summary["parts_skipped"]) == (3, 1)
    assert summary["rows_processed"] == 530 - listed.parts[intact]["rows_in"]
    _exactly_once(job)
    again = pq.read_table(part)
    assert again.drop_columns(["scored_at"]).equals(before.drop_columns(["scored_at"]))
    assert pq.read_table(shorter).num_rows == listed.parts[short]["rows_scored"]
    assert sorted(_listed(job.run_dir).parts) == [s.key for s in job.chunks()]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 32 KiB filesystem (tmpfs) for the output: needs root (mount), skipped without it."""
    out = tmp_path / "out"
    out.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the injected-ENOSPC drill covers the same path")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(out)], capture_output=True,
                             text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield out
    finally:
        subprocess.run(["umount", "-l", str(out)], capture_output=True, timeout=30)


@pytest.mark.usefixtures("default_settings")
def test_a_really_full_disk_stops_the_run_then_more_space_lets_it_finish(tmp_path: Path, model: BatchModel,
                                                                        small_disk: Path) -> None:
    data = _inputs(tmp_path / "in")
    settings = _settings(tmp_path)
    job = _job(settings, model, data)  # the manifest fits; six parts and six drift samples do not
    with pytest.raises(BatchWriteError, match=r"^output disk full: no space left writing .* \(No space left on "
                                              r"device\).* Free space and re-run: finished parts are kept$"):
        batch.run_job(job, settings, report=False)
    assert not (Path(job.run_dir) / SUCCESS).exists() and not list(Path(job.run_dir).rglob(".tmp-*"))

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True, timeout=30)
    summary = batch.run_job(_job(settings, model, data), settings, report=False)
    assert summary["rows_in"] == 530 and summary["parts_skipped"] < 6
    _exactly_once(job)


def _score(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "1000"}  # rich wraps at 80 columns: keep the error on one line
    if fault:
        env[FAULT_ENV] = fault
    cmd = [str(Path(sys.executable).with_name("canaryflow")), "score", MODEL, *args, "--json"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_cli_killed_during_a_part_write_resumes_to_exactly_the_input_rows(stack, released,
                                                                          tmp_path: Path) -> None:
    data = _dataset(tmp_path / "in", [3000, 3000], seed=1)
    args = [str(data), "--output", str(tmp_path / "out"), "--chunk-rows", "250"]
    killed = _score(*args, fault="kill:rename:scores/part-00001-000005.parquet")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = _run_dir(tmp_path / "out")
    assert not (run_dir / SUCCESS).exists()
    assert any(p.name.endswith("-part-00001-000005.parquet") for p in (run_dir / "scores").glob(".tmp-*"))
    listed = json.loads((run_dir / MANIFEST).read_text())["parts"]
    assert 1 <= len(listed) < 24 and "00001-000005" not in listed

    done = _score(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["parts_skipped"] == len(listed) and summary["rows_in"] == 6000 and summary["version"] == released
    scores = _assert_exactly_once(run_dir, 6000)
    assert set(scores.column("row_id").to_pylist()) == _expected_ids([3000, 3000])
    assert not list(run_dir.rglob(".tmp-*"))


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_cli_stopped_by_a_full_disk_says_so_and_resumes(stack, released, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "in", [2000], seed=3)
    args = [str(data), "--output", str(tmp_path / "out"), "--chunk-rows", "250"]
    full = _score(*args, fault="enospc:write:scores/part-00000-000004.parquet")
    assert full.returncode == 1, full.stderr[-2000:]
    run_dir = _run_dir(tmp_path / "out")
    said = " ".join((full.stdout + full.stderr).split())
    assert f"output disk full: no space left writing {run_dir}/scores/part-00000-000004.parquet" in said, said
    assert re.search(r"\d of 8 parts \([\d,]+ of 2,000 rows\) were finished before it", said), said
    assert "Free space and re-run: finished parts are kept" in said and not (run_dir / SUCCESS).exists()

    done = _score(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout[done.stdout.index("{"):])["rows_in"] == 2000
    scores = _assert_exactly_once(run_dir, 2000)
    assert set(scores.column("row_id").to_pylist()) == _expected_ids([2000])
