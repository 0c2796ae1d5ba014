"""Outcomes as Prefect states on a real (ephemeral) Prefect server: a refused gate ends its task run in a named
Failed state without raising, the flow reads it back and ends Failed "Rejected" with the reason and its result
dict; a held analysis's Failed state gives its data back; an idle reconcile run is tagged and the older idle runs
are deleted."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from prefect import flow, get_client, task
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.logging.handlers import APILogHandler
from prefect.states import Failed
from prefect.testing.utilities import prefect_test_harness

from canaryflow.core.errors import GateFailed
from flows.release import ReleaseEnded, _quiet_engine_log, as_state
from tasks.housekeeping import NOOP_TAG, quiet_idle_run
from tasks.outcomes import gate_task, unwrap
from validation.results import GateResult, Outcome

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@task(name="quality-gate")
@gate_task
def quality(st: SimpleNamespace) -> GateResult:
    result = GateResult("quality", Outcome.FAILED, "accuracy 0.61 < 0.90", {"accuracy": 0.61})
    st.results.append(result)
    raise GateFailed("quality", result.reason)


@task(name="canary-analysis", task_run_name="canary-analysis-{number}")
def analysis(number: int) -> object:
    return Failed(name="ChecksFailed", message="agreement 0.81 < 0.95", data={"action": "hold", "n": number})


@flow(name="release-like")
def release_like() -> dict:
    _quiet_engine_log()
    st = SimpleNamespace(results=[])
    held = unwrap(analysis(1))
    assert held == {"action": "hold", "n": 1}
    try:
        unwrap(quality(st))
    except GateFailed as exc:
        return as_state({"status": "rejected", "reason": str(exc)}, f"v3 rejected; v2 still serves: {exc}")
    raise AssertionError("the gate passed")


def test_an_expected_outcome_ends_in_a_named_state_with_its_reason_and_no_traceback() -> None:
    state = release_like(return_state=True)
    assert state.is_failed() and state.name == "Rejected"
    assert state.message == "v3 rejected; v2 still serves: quality: accuracy 0.61 < 0.90"
    ended = state.result(raise_on_failure=False)
    assert isinstance(ended, ReleaseEnded)
    assert ended.outcome == {"status": "rejected", "reason": "quality: accuracy 0.61 < 0.90"}
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details
                                                                                              .flow_run_id])))
        by_name = {r.name: r.state for r in runs}
        text = _logs(client, "quality failed")
    assert by_name["canary-analysis-1"].name == "ChecksFailed"
    [gate] = [s for name, s in by_name.items() if name.startswith("quality-gate")]
    assert gate.type.value == "FAILED" and gate.name == "GateFailed" and "accuracy 0.61" in gate.message
    assert "quality failed: accuracy 0.61 < 0.90 (accuracy=0.61)" in text  # the gate's one line, with numbers
    assert "Traceback" not in text


def _logs(client: object, expect: str, timeout_s: float = 30.0) -> str:
    """Every log line the server holds, once ``expect`` is among them (logs are shipped in batches)."""
    APILogHandler().flush()
    deadline, text = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline and expect not in text:
        text = "\n".join(log.message for log in client.read_logs())
        time.sleep(0.2)
    return text


@flow(name="reconcile-like")
def idle() -> int:
    return quiet_idle_run(flow_name="reconcile-like")


def test_idle_reconcile_runs_are_tagged_and_only_the_latest_is_kept() -> None:
    states = [idle(return_state=True) for _ in range(3)]
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs() if r.flow_id == client.read_flow_run(
            states[-1].state_details.flow_run_id).flow_id]
    assert [str(r.id) for r in runs] == [str(states[-1].state_details.flow_run_id)]
    assert NOOP_TAG in runs[0].tags


def test_a_deployment_run_of_an_expected_outcome_logs_no_engine_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """The worker's process runs the flow with run_flow(error_logger=the run's logger), which raises a failed
    run's result and logs "Engine execution exited with unexpected exception" with its traceback: not for an
    expected outcome. Any other exception still is logged."""
    from prefect.flow_engine import run_flow
    from prefect.logging import get_logger

    with pytest.raises(ReleaseEnded):
        run_flow(release_like, error_logger=get_logger("prefect.flow_runs"))
    assert "Engine execution exited" not in caplog.text

    @flow(name="broken")
    def broken() -> None:
        raise RuntimeError("a real bug")

    with pytest.raises(RuntimeError):
        run_flow(broken, error_logger=get_logger("prefect.flow_runs"))
    assert "Engine execution exited" in caplog.text and "a real bug" in caplog.text
