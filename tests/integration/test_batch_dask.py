"""Batch inference on a real Dask cluster: ``dask scheduler`` and two ``dask worker`` processes on loopback
(tests/dask_cluster.py), the real batch code, a real serving bundle and real Parquet files (the model and inputs of
tests/unit/test_batch_run.py). A worker killed with SIGKILL in the middle of a part write, then a re-run: every
input row once. Through the plain functions (``canaryflow score``'s path, setting ``batch.dask_address``) and
through the Prefect flow's Dask task runner.

The kill is deterministic: worker 0 runs with ``CANARYFLOW_TEST_FAULT=kill:write:scores/*`` (the writer kills its
own process in the middle of its first part write); the other worker runs clean. Needs the ``dask`` extra.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed", reason="the dask extra is not installed")
pytest.importorskip("prefect_dask", reason="the dask extra is not installed")

from canaryflow.batch import run as batch  # noqa: E402
from canaryflow.batch.model import BatchModel  # noqa: E402
from canaryflow.batch.write import FAULT_ENV  # noqa: E402
from canaryflow.core.errors import BatchError  # noqa: E402
from tests.dask_cluster import dask_cluster  # noqa: E402
from tests.unit.test_batch_run import _inputs, _job, _scores, _settings, make_model  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
ROWS = 350 + 180  # what _inputs writes, in chunks of 100: 4 + 2 parts
KILL_FIRST_WRITE = {FAULT_ENV: "kill:write:scores/*"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> BatchModel:
    return make_model(tmp_path_factory.mktemp("model"))


def _on(settings, address: str):  # noqa: ANN001, ANN202 - Settings in, Settings out
    return settings.model_copy(update={"batch": settings.batch.model_copy(update={"dask_address": address})})


def _exactly_once(job: batch.BatchJob) -> None:
    ids = _scores(job).column("row_id").to_pylist()
    assert len(ids) == ROWS and len(set(ids)) == ROWS
    assert (Path(job.run_dir) / "_SUCCESS").exists() and not list(Path(job.run_dir).rglob(".tmp-*"))


@pytest.mark.usefixtures("default_settings")
def test_a_run_that_loses_a_worker_writes_what_a_run_on_threads_writes(tmp_path: Path, model: BatchModel) -> None:
    data = _inputs(tmp_path / "in")
    local = _settings(tmp_path / "threads")
    summary = batch.run_job(_job(local, model, data), local, report=False)
    with dask_cluster(tmp_path / "dask", [KILL_FIRST_WRITE, {}]) as cluster:
        settings = _on(_settings(tmp_path / "dask-run"), cluster.address)
        job = batch.plan_job(settings, model, str(data), batch.discover(str(data)),
                             output_dir=str(tmp_path / "out-dask"))
        on_dask = batch.run_job(job, settings, report=False)
        # worker 0 died in the middle of its first part write; Dask ran that chunk again on worker 1
        assert cluster.workers[0].wait(timeout=60) == -signal.SIGKILL, cluster.log("worker-0")
    assert (on_dask["rows_in"], on_dask["rows_scored"], on_dask["parts"]) == (ROWS, ROWS, 6)
    _exactly_once(job)
    ours = _scores(job).sort_by("row_id").select(["row_id", "proba_0", "proba_1", "prediction"])
    theirs = _scores(_job(local, model, data)).sort_by("row_id").select(["row_id", "proba_0", "proba_1",
                                                                          "prediction"])
    assert ours.equals(theirs) and summary["rows_scored"] == ROWS


@pytest.mark.usefixtures("default_settings")
def test_a_worker_killed_mid_write_then_a_rerun_scores_every_row_once(tmp_path: Path, model: BatchModel) -> None:
    data = _inputs(tmp_path / "in")
    with dask_cluster(tmp_path / "dask", [KILL_FIRST_WRITE, {}]) as cluster:
        settings = _on(_settings(tmp_path), cluster.address)
        job = batch.plan_job(settings, model, str(data), batch.discover(str(data)), output_dir=str(tmp_path / "out"))
        with pytest.raises(batch.BatchInterrupted):  # the coordinator stops too: the re-run must resume
            batch.run_job(job, settings, report=False, stop_after_parts=3)
        # both workers got a chunk at once (one thread each, three chunks in flight): worker 0 died writing its
        # part, and Dask ran that chunk again on worker 1
        assert cluster.workers[0].wait(timeout=60) == -signal.SIGKILL, cluster.log("worker-0")
        again = batch.plan_job(settings, model, str(data), batch.discover(str(data)),
                               output_dir=str(tmp_path / "out"))
        assert again.run_dir == job.run_dir and not again.complete
        summary = batch.run_job(again, settings, report=False)
    assert summary["rows_in"] == ROWS and summary["rows_scored"] == ROWS and summary["parts"] == 6
    _exactly_once(job)
    probs = _scores(job).select(["proba_0", "proba_1"]).to_pandas().to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.usefixtures("default_settings")
def test_an_unreachable_scheduler_is_a_clear_error(tmp_path: Path, model: BatchModel) -> None:
    from canaryflow.batch.cluster import DaskExecutor

    with pytest.raises(BatchError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        DaskExecutor("tcp://127.0.0.1:9", timeout_s=2)


@pytest.fixture(scope="module")
def prefect_api() -> str:
    """A real Prefect API for the module (Prefect's own test harness: a server process on a temporary database);
    the Dask workers report their task runs to it."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def _flow_on(address: str, job: batch.BatchJob, stop_after_parts: int | None = None) -> dict:
    """The chunk loop of flows/batch_inference.py as it runs there: the flow's task runner for ``address``
    (prefect-dask's DaskTaskRunner) and its chunk executor, each chunk a Prefect task run on a Dask worker."""
    from prefect import flow

    from tasks import batch as t

    @flow(name="batch-dask-test")
    def chunks() -> dict:
        with t.task_runner(address, job.max_parallel) as runner:
            return batch.run_chunks(job, t.PrefectChunkExecutor(runner), None, stop_after_parts)

    return chunks()


@pytest.mark.usefixtures("default_settings")
def test_the_flows_dask_task_runner_survives_a_killed_worker_and_a_rerun(tmp_path: Path, model: BatchModel,
                                                                         prefect_api: str) -> None:
    data = _inputs(tmp_path / "in")
    api = {"PREFECT_API_URL": prefect_api}
    with dask_cluster(tmp_path / "dask", [{**KILL_FIRST_WRITE, **api}, api]) as cluster:
        settings = _settings(tmp_path)
        job = _job(settings, model, data)
        with pytest.raises(batch.BatchInterrupted):
            _flow_on(cluster.address, job, stop_after_parts=3)
        assert cluster.workers[0].wait(timeout=60) == -signal.SIGKILL, cluster.log("worker-0")
        again = _job(settings, model, data)
        stats = _flow_on(cluster.address, again)
    summary = batch.finish(again, settings, stats, report=False)
    assert (summary["rows_in"], summary["rows_scored"], summary["parts"]) == (ROWS, ROWS, 6)
    _exactly_once(again)
