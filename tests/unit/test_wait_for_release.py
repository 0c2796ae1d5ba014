"""What the demo and the tests read of a release from Prefect: a release that does not end in time is reported
with where it stands, the version's status tag and its flow runs' states (CI once printed only "no release ...
finished within 400 s" while the run had failed at its first step); the demo's link is the version's latest run,
read with the launcher's credentials."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fakes import FakeLauncher

from canaryflow.core.errors import OrchestrationError, StackError
from canaryflow.core.settings import Settings
from canaryflow.core.state import Tag
from canaryflow.local import demo

FAILED_RUN = {"name": "release-m-v1", "parameters": {"model_name": "m", "version": "1"},
              "state": {"type": "FAILED", "name": "Failed",
                        "message": "Flow run encountered an exception: RestException: RESOURCE_ALREADY_EXISTS:\n"
                                   "Experiment(name=canaryflow-releases) already exists."}}


class Tags:
    def __init__(self, tags: dict[str, str]) -> None:
        self.tags = tags

    def __call__(self, tracking_uri: str) -> object:
        return SimpleNamespace(get_model_version=lambda name, version: SimpleNamespace(tags=self.tags))


@pytest.fixture
def launcher(monkeypatch: pytest.MonkeyPatch) -> FakeLauncher:
    fake = FakeLauncher(runs=[FAILED_RUN])
    monkeypatch.setattr(demo, "prefect_launcher", lambda settings: fake)
    clock = [0.0]  # the wait's own clock: each poll's sleep moves it on, so the loop runs the same on any machine
    monkeypatch.setattr(demo, "time", SimpleNamespace(monotonic=lambda: clock[0],
                                                      sleep=lambda s: clock.__setitem__(0, clock[0] + s)))
    return fake


def test_a_release_that_never_began_names_its_failed_run(monkeypatch: pytest.MonkeyPatch,
                                                        launcher: FakeLauncher) -> None:
    monkeypatch.setattr("mlflow.MlflowClient", Tags({}))
    with pytest.raises(StackError) as err:
        demo.wait_for_release("http://127.0.0.1:1", "m", "1", timeout_s=3, settings=Settings())
    message = str(err.value)
    assert "no status tag (its release never began)" in message
    assert ("flow runs: release-m-v1: Failed (Flow run encountered an exception: RestException: "
            "RESOURCE_ALREADY_EXISTS: Experiment(name=canaryflow-releases) already exists.)") in message


def test_a_release_under_way_says_its_status_and_a_missing_run_says_so(monkeypatch: pytest.MonkeyPatch,
                                                                      launcher: FakeLauncher) -> None:
    monkeypatch.setattr("mlflow.MlflowClient", Tags({Tag.STATUS: "releasing", Tag.REASON: "release started"}))
    launcher.runs.clear()
    with pytest.raises(StackError, match=r"status tag 'releasing' \(release started\); no release flow run "
                                         r"\(was the webhook delivered\?\)"):
        demo.watch_release("http://127.0.0.1:1", "m", "1", None, timeout_s=3, settings=Settings())


def test_an_unreachable_prefect_is_said_not_raised(monkeypatch: pytest.MonkeyPatch, launcher: FakeLauncher) -> None:
    monkeypatch.setattr(FakeLauncher, "list_flow_runs", lambda self, *a: (_ for _ in ()).throw(
        OrchestrationError("cannot reach the Prefect API: connection refused")))
    line = demo.release_runs_line(Settings(), "m", "1")
    assert line == "its flow runs could not be read: cannot reach the Prefect API: connection refused"


def test_the_demo_links_the_versions_latest_run_and_survives_an_unreadable_prefect(
        monkeypatch: pytest.MonkeyPatch, launcher: FakeLauncher) -> None:
    rerun = {**FAILED_RUN, "id": "run-2", "state": {"type": "COMPLETED", "name": "Released"}}
    launcher.runs.append(rerun)  # the launcher lists a version's runs oldest first
    assert demo.find_flow_run(Settings(), "m", "1")["id"] == "run-2"
    assert demo.find_flow_run(Settings(), "m", "2") is None
    monkeypatch.setattr(FakeLauncher, "list_flow_runs", lambda self, *a: (_ for _ in ()).throw(
        OrchestrationError("Prefect API answered 401: Unauthorized")))
    assert demo.find_flow_run(Settings(), "m", "1") is None
