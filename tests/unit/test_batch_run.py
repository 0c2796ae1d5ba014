"""A batch run end to end without servers: a real serving bundle (torch.export, the handler's code), real Parquet
files, local threads. Every row once, crash and resume, rejects and the fail policy, refusal to mix runs."""

from __future__ import annotations

import os
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from canaryflow.batch import run as batch
from canaryflow.batch.io import FILE_BITS, discover, filesystem
from canaryflow.batch.manifest import SUCCESS, Manifest, verify
from canaryflow.batch.model import BatchModel
from canaryflow.batch.report import drift_report, markdown
from canaryflow.batch.score import score_chunk
from canaryflow.core.errors import BatchError
from canaryflow.core.settings import Settings
from canaryflow.model.packaging import InputContract, export_module
from deployments.handler import CanaryflowHandler
from validation.data import build_suite, suite_to_json

FEATURES = [f"f{i}" for i in range(4)]
PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> BatchModel:
    return make_model(tmp_path_factory.mktemp("model"))


def make_model(root: Path) -> BatchModel:
    """A 4 -> 8 -> 2 MLP exported like a release (max batch 64, so scoring slices), a suite from its reference."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    rows = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    export_module(net, rows, root / "bundle", contract=InputContract(4, FEATURES, "float32"), name="unit-batch",
                  version="3", max_batch_rows=64, class_labels=["no", "yes"])
    reference = pd.DataFrame(np.random.default_rng(1).normal(size=(2000, 4)), columns=FEATURES)
    reference.to_parquet(root / "reference.parquet")
    suite = suite_to_json(build_suite(reference, FEATURES))
    return BatchModel("unit-batch", "3", "champion", "", "run-1", "run-0", str(root / "bundle"), "torch_export",
                      "torch_fp32", tuple(FEATURES), "float32", suite, str(root / "reference.parquet"))


def _settings(tmp_path: Path, **batch_settings) -> Settings:
    s = Settings(state_dir=tmp_path / "state")
    return s.model_copy(update={"batch": s.batch.model_copy(update={"chunk_rows": 100, **batch_settings})})


def _inputs(root: Path, bad: bool = False) -> Path:
    rng = np.random.default_rng(2)
    for name, n, group in (("a.parquet", 350, 64), ("sub/b.parquet", 180, 1000)):
        x = rng.normal(size=(n, 4))
        if bad and name == "a.parquet":
            x[7, 1] = np.nan
            x[210, 3] = 1e6  # far outside the reference's range
        frame = pd.DataFrame(x, columns=FEATURES).assign(customer=[f"c{i}" for i in range(n)])
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), root / name, row_group_size=group)
    return root


def _job(settings: Settings, model: BatchModel, data: Path, **kw) -> batch.BatchJob:
    return batch.plan_job(settings, model, str(data), discover(str(data)), output_dir=str(data.parent / "out"), **kw)


def _scores(job: batch.BatchJob) -> pa.Table:
    return ds.dataset(f"{job.run_dir}/scores", format="parquet").to_table()


def _files(root: str) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in Path(root).rglob("*") if p.is_file() and p.name != ".lock"}


def test_a_run_scores_every_row_once_exactly_like_the_handler(tmp_path: Path, model: BatchModel) -> None:
    data = _inputs(tmp_path / "in")
    job = _job(_settings(tmp_path), model, data, keep_columns=["customer"])
    summary = batch.run_job(job, _settings(tmp_path), report=False)
    assert (summary["rows_in"], summary["rows_scored"], summary["rows_rejected"]) == (530, 530, 0)
    assert summary["parts"] == 4 + 2 and summary["rows_per_s"] > 0
    scores = _scores(job).to_pandas()
    assert len(scores) == 530 and scores["row_id"].is_unique
    ordinal = scores["source_file"].astype(str).map({"a.parquet": 0, "sub/b.parquet": 1}).to_numpy(np.int64)
    assert (scores["row_id"].to_numpy() == (ordinal << FILE_BITS) + scores["source_row"].to_numpy()).all()
    a = pd.read_parquet(data / "a.parquet")
    mine = scores[scores["source_file"] == "a.parquet"].sort_values("source_row")
    handler, x = CanaryflowHandler.for_bundle(model.bundle_dir), a[FEATURES].to_numpy(np.float32)
    expected = np.concatenate([handler.probabilities(x[i:i + 64]) for i in range(0, len(x), 64)])
    np.testing.assert_allclose(mine[["proba_0", "proba_1"]].to_numpy(), expected, rtol=1e-6)
    assert mine["customer"].tolist() == a["customer"].tolist()
    assert set(mine["prediction"]) <= {"no", "yes"}
    assert (mine["prediction"] == np.where(expected.argmax(1) == 1, "yes", "no")).all()
    assert set(scores["model_version"]) == {"3"} and set(scores["model_name"]) == {"unit-batch"}
    assert str(scores["scored_at"].dt.tz) == "UTC"
    fs, root = filesystem(job.run_dir)
    assert Manifest.load(fs, root).status == "complete" and (Path(job.run_dir) / SUCCESS).exists()


def test_a_run_stopped_half_way_resumes_to_exactly_the_input_rows(tmp_path: Path, model: BatchModel) -> None:
    data = _inputs(tmp_path / "in")
    settings = _settings(tmp_path)
    job = _job(settings, model, data)
    with pytest.raises(batch.BatchInterrupted):
        batch.run_job(job, settings, report=False, stop_after_parts=2)
    fs, root = filesystem(job.run_dir)
    manifest = Manifest.load(fs, root)
    assert manifest.status == "failed" and len(manifest.parts) == 2 and not (Path(root) / SUCCESS).exists()
    (Path(root) / "scores" / ".tmp-crashed-part-00000-000003.parquet").write_bytes(b"half")  # a write cut short
    again = _job(settings, model, data)
    assert again.run_dir == job.run_dir and not again.complete
    summary = batch.run_job(again, settings, report=False)
    # which two parts landed first is up to the threads (chunks have 100, 50 or 80 rows): count what was listed
    assert summary["parts_skipped"] == 2 and summary["rows_processed"] == 530 - manifest.rows_done
    scores = _scores(job)
    assert scores.num_rows == 530 and len(set(scores.column("row_id").to_pylist())) == 530
    assert not list(Path(root).rglob(".tmp-*"))


def test_re_running_a_finished_run_changes_nothing(tmp_path: Path, model: BatchModel) -> None:
    data = _inputs(tmp_path / "in")
    settings = _settings(tmp_path)
    first = batch.run_job(_job(settings, model, data), settings, report=False)
    before = _files(first["output"])
    job = _job(settings, model, data)
    assert job.complete
    summary = batch.run_job(job, settings, report=False)
    assert summary["already_complete"] and summary["rows_in"] == 530
    assert _files(first["output"]) == before


def test_bad_rows_are_rejected_with_reasons_and_counted(tmp_path: Path, model: BatchModel) -> None:
    data = _inputs(tmp_path / "in", bad=True)
    settings = _settings(tmp_path)
    job = _job(settings, model, data)
    summary = batch.run_job(job, settings, report=False)
    assert (summary["rows_in"], summary["rows_scored"], summary["rows_rejected"]) == (530, 528, 2)
    rejects = pq.read_table(f"{job.run_dir}/rejects").to_pandas().sort_values("source_row")
    assert rejects["source_row"].tolist() == [7, 210] and set(rejects["source_file"]) == {"a.parquet"}
    assert rejects["reason"].iloc[0] == "f1 is null"  # pandas wrote the NaN as a Parquet null
    assert rejects["reason"].iloc[1].startswith("f3=1000000.0 outside [")
    assert '"f3": 1000000.0' in rejects["values"].iloc[1]
    ids = set(_scores(job).column("row_id").to_pylist())
    assert len(ids) == 528 and not ids & set(rejects["row_id"])
    assert "expect_column_values_to_be_between(f3)" in {e["expectation"] for e in summary["expectations"]}


def test_fail_policy_stops_the_run_and_nothing_is_marked_complete(tmp_path: Path, model: BatchModel) -> None:
    """Chunks 0 (row 7) and 2 (row 210) of a.parquet are bad: the run reports chunk 0, the first in input order,
    whichever thread fails first."""
    data = _inputs(tmp_path / "in", bad=True)
    settings = _settings(tmp_path, on_bad_rows="fail")
    job = _job(settings, model, data)
    with pytest.raises(BatchError, match=r"on_bad_rows=fail .*a\.parquet:7: f1 is null") as raised:
        batch.run_job(job, settings, report=False)
    assert "chunk 00000-000000" in str(raised.value) and ":210:" not in str(raised.value)
    fs, root = filesystem(job.run_dir)
    manifest = Manifest.load(fs, root)
    assert manifest.status == "failed" and "a.parquet:7: f1 is null" in manifest.error
    assert not (Path(root) / SUCCESS).exists()


class _LastFirst:
    """Runs each chunk at once and reports the latest submitted as done first: the worst scheduling for "which
    error is reported" (a later chunk always fails before an earlier one is looked at)."""

    def submit(self, job: batch.BatchJob, spec, table: pa.Table) -> Future:
        done: Future = Future()
        try:
            done.set_result(score_chunk(job, spec, table))
        except Exception as exc:
            done.set_exception(exc)
        return done

    def first_done(self, handles: list[Future]) -> Future:
        return handles[-1]


def test_the_reported_error_is_the_first_failing_chunk_in_input_order(tmp_path: Path, model: BatchModel) -> None:
    data = _inputs(tmp_path / "in", bad=True)
    settings = _settings(tmp_path, on_bad_rows="fail")
    job = _job(settings, model, data)
    with pytest.raises(BatchError, match=r"chunk 00000-000000 .*a\.parquet:7: f1 is null"):
        batch.run_chunks(job, _LastFirst())


def test_output_that_does_not_add_up_is_refused(tmp_path: Path, model: BatchModel) -> None:
    data = _inputs(tmp_path / "in")
    settings = _settings(tmp_path)
    job = _job(settings, model, data)
    batch.run_job(job, settings, report=False)
    fs, root = filesystem(job.run_dir)
    manifest = Manifest.load(fs, root)
    os.remove(Path(root) / "scores" / "part-00001-000000.parquet")
    with pytest.raises(BatchError, match="scores/part-00001-000000.parquet is missing"):
        verify(manifest, job.chunks(), fs, root, job.total_rows)
    manifest.parts.pop("00000-000001")
    with pytest.raises(BatchError, match="1 chunks never finished"):
        verify(manifest, job.chunks(), fs, root, job.total_rows)


def test_changed_input_or_chunking_gets_its_own_run_directory(tmp_path: Path, model: BatchModel) -> None:
    data = _inputs(tmp_path / "in")
    settings = _settings(tmp_path)
    first = _job(settings, model, data)
    assert _job(settings, model, data, chunk_rows=50).run_dir != first.run_dir
    pq.write_table(pa.table({f: [0.0] for f in FEATURES}), data / "c.parquet")
    assert _job(settings, model, data).run_dir != first.run_dir
    with pytest.raises(BatchError, match=r"lacks the columns to keep \['customer'\]"):
        _job(settings, model, data, keep_columns=["customer"])


def test_a_second_writer_of_the_same_run_is_refused(tmp_path: Path, model: BatchModel) -> None:
    data = _inputs(tmp_path / "in")
    settings = _settings(tmp_path)
    job = _job(settings, model, data)
    with batch.run_lock(job), pytest.raises(BatchError, match="another batch run is writing"):
        batch.run_job(job, settings, report=False)


def test_fsspec_input_and_output(tmp_path: Path, model: BatchModel) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/unit-batch/in/d.parquet", "wb") as fh:
        pq.write_table(pa.table({f: np.linspace(-1, 1, 250) for f in FEATURES}), fh)
    settings = _settings(tmp_path)
    job = batch.plan_job(settings, model, "memory://unit-batch/in", discover("memory://unit-batch/in"),
                         output_dir="memory://unit-batch/out")
    summary = batch.run_job(job, settings, report=False)
    assert summary["rows_scored"] == 250 and fs.exists(f"{job.run_dir}/{SUCCESS}".removeprefix("memory://"))
    fs.rm("/unit-batch", recursive=True)


def test_drift_report_and_markdown_summary(tmp_path: Path, model: BatchModel) -> None:
    data = _inputs(tmp_path / "in")
    settings = _settings(tmp_path)
    job = _job(settings, model, data)
    summary = batch.run_job(job, settings, report=False)
    fs, root = filesystem(job.run_dir)
    drift = drift_report(job, settings, fs, root, tmp_path / "drift")
    assert drift["outcome"] == "passed" and drift["sample_rows"] > 0, drift
    assert (tmp_path / "drift" / "drift_report.html").exists()
    text = markdown({**summary, "drift": drift})
    assert "| 530 | 530 | 0 | 6 (0) |" in text and "unit-batch" in text


def test_both_deployments_exist_and_the_cron_matches_the_setting() -> None:
    spec = yaml.safe_load((PROJECT / "prefect.yaml").read_text())
    found = {d["name"]: d for d in spec["deployments"] if d["entrypoint"].startswith("flows/batch_inference.py")}
    assert set(found) == {"scheduled", "manual"}
    assert {d["entrypoint"] for d in found.values()} == {"flows/batch_inference.py:batch_inference"}
    assert [s["cron"] for s in found["scheduled"]["schedules"]] == [Settings().batch.schedule_cron]
    assert "schedules" not in found["manual"]


def test_a_chunk_with_every_row_rejected_still_writes_a_part_with_every_column(tmp_path: Path,
                                                                               model: BatchModel) -> None:
    data = _inputs(tmp_path / "in")
    pq.write_table(pa.table({f: pa.array([None] * 100, pa.float64()) for f in FEATURES}), data / "z.parquet")
    settings = _settings(tmp_path)
    job = _job(settings, model, data)
    summary = batch.run_job(job, settings, report=False)
    assert (summary["rows_in"], summary["rows_scored"], summary["rows_rejected"]) == (630, 530, 100)
    empty = pq.read_table(f"{job.run_dir}/scores/part-00002-000000.parquet")
    assert empty.num_rows == 0 and empty.schema == pq.read_schema(f"{job.run_dir}/scores/part-00000-000000.parquet")
    assert _scores(job).num_rows == 530
