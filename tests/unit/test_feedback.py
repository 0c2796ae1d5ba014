"""Live labels: the bridge's feedback endpoint (no servers: a hand-written access log) and their join to the
canary window's answers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fakes import FakeLauncher
from starlette.testclient import TestClient

from canaryflow.core.paths import StatePaths
from canaryflow.core.settings import FeedbackSettings, Settings
from canaryflow.intake.bridge import create_app
from deployments.feedback import AnswerIndex, FeedbackError, FeedbackRecorder, parse
from deployments.metrics import AccessLogMetrics
from tests.unit.test_bridge_app import SECRET
from tests.unit.test_metrics import T0, line, write

TOKEN = "feedback-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def _fresh_cursors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AccessLogMetrics, "_cursors", {})


@pytest.fixture
def paths(tmp_path: Path) -> StatePaths:
    p = StatePaths(tmp_path)
    p.router_dir.mkdir(parents=True)
    write(p.router_access_log,
          line(T0, "1", prediction="0:0.900", request_id="a1"),
          line(T0 + 1, "2", prediction="1:0.800", request_id="a2"),
          line(T0 + 2, "1", prediction="0:0.900,1:0.700", request_id="two-rows"),
          line(T0 + 3, "2", prediction="0:0.600", request_id="a2", shadow=1),  # a mirrored copy: not an answer
          line(T0 + 4, "1", status=503, prediction="", request_id="failed"),
          line(T0 + 5, "1", prediction="0:0.900", request_id="wine-1", model="wine"))
    return p


@pytest.fixture
def client(paths: StatePaths) -> TestClient:
    settings = Settings(state_dir=paths.root, feedback=FeedbackSettings(answer_wait_s=0))  # 404s at once
    return TestClient(create_app(settings, launcher=FakeLauncher(), secret=SECRET, feedback_token=TOKEN,
                                 clock=lambda: T0 + 10))


def stored(paths: StatePaths, model: str = "iris") -> list[dict]:
    path = paths.feedback_file(model)
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_labels_for_given_answers_are_recorded(client: TestClient, paths: StatePaths) -> None:
    r = client.post("/feedback/iris", json={"request_id": "a1", "label": 1}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "recorded", "recorded": 1, "already_recorded": 0}
    r = client.post("/feedback/iris", json={"feedback": [{"request_id": "a2", "label": "1"},
                                                         {"request_id": "two-rows", "labels": [0, 0]}]}, headers=AUTH)
    assert r.json()["recorded"] == 2, r.text
    assert [(x["request_id"], x["labels"], x["ts"]) for x in stored(paths)] == [
        ("a1", ["1"], T0 + 10), ("a2", ["1"], T0 + 10), ("two-rows", ["0", "0"], T0 + 10)]
    assert os.stat(paths.feedback_file("iris")).st_mode & 0o077 == 0  # labels are not for other local users


def test_the_same_label_twice_is_recorded_once_and_a_different_one_is_refused(client: TestClient,
                                                                              paths: StatePaths) -> None:
    assert client.post("/feedback/iris", json={"request_id": "a1", "label": 0}, headers=AUTH).status_code == 200
    again = client.post("/feedback/iris", json={"request_id": "a1", "label": 0}, headers=AUTH)
    assert again.json() == {"status": "recorded", "recorded": 0, "already_recorded": 1}
    other = client.post("/feedback/iris", json={"request_id": "a1", "label": 1}, headers=AUTH)
    assert other.status_code == 409 and "already labelled ['0']" in other.json()["problems"][0], other.text
    assert len(stored(paths)) == 1


@pytest.mark.parametrize(("body", "status", "problem"), [
    ({"request_id": "nope", "label": 0}, 404, "nope: no answer of the router for this model"),
    ({"request_id": "wine-1", "label": 0}, 404, "wine-1: no answer"),  # another model's answer
    ({"request_id": "failed", "label": 0}, 404, "failed: no answer"),  # a 503
    ({"request_id": "two-rows", "label": 0}, 422, "1 labels for an answer of 2 rows"),
    ({"request_id": "a1"}, 422, "exactly one of label"),
    ({"request_id": "a1", "label": -1}, 422, "a label is a class index"),
    ({"request_id": "a1", "label": True}, 422, "a label is a class index"),
    ({"request_id": "a 1", "label": 0}, 422, "request_id must be"),
    ({"feedback": [{"request_id": "a1", "label": 0}, {"request_id": "nope", "label": 0}]}, 404, "nope: no answer"),
    ({"feedback": [{"request_id": "a1", "label": 0}, "x"]}, 422, "item 1: not an object"),
])
def test_bad_feedback_is_refused_whole_with_each_problem_named(client: TestClient, paths: StatePaths, body: dict,
                                                               status: int, problem: str) -> None:
    r = client.post("/feedback/iris", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert any(problem in p for p in r.json()["problems"]), r.json()
    assert stored(paths) == []  # nothing of a refused request is kept, not even its good items


def test_feedback_needs_the_token_and_json(client: TestClient, paths: StatePaths) -> None:
    body = {"request_id": "a1", "label": 0}
    assert client.post("/feedback/iris", json=body).status_code == 401
    assert client.post("/feedback/iris", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/feedback/iris", content=b"{not json", headers=AUTH).status_code == 400
    assert client.post("/feedback/iris", content=b"x" * (2 << 20), headers=AUTH).status_code == 413
    assert stored(paths) == []


def test_the_token_is_generated_private_in_the_state_dir(paths: StatePaths) -> None:
    TestClient(create_app(Settings(state_dir=paths.root), launcher=FakeLauncher(), secret=SECRET))
    assert len(paths.feedback_token.read_text().strip()) >= 32
    assert os.stat(paths.feedback_token).st_mode & 0o077 == 0


def test_too_many_labels_in_one_request() -> None:
    with pytest.raises(FeedbackError) as err:
        parse({"feedback": [{"request_id": f"r{i}", "label": 0} for i in range(11)]}, max_items=10)
    assert err.value.status == 413


def test_answer_index_follows_the_log_keeps_the_newest_and_survives_rotation(paths: StatePaths) -> None:
    index = AnswerIndex(paths.router_access_log, capacity=3)
    index.refresh()
    assert index.get("a1") is None and index.get("wine-1").model == "wine"  # capacity 3: a1 evicted
    assert index.get("two-rows").rows == 2 and index.get("failed") is None
    write(paths.router_access_log, line(T0 + 9, "3", request_id="new"), mode="w")  # rotated: read from its start
    index.refresh()
    assert index.get("new").version == "3"


def test_labels_are_joined_to_each_versions_answers(paths: StatePaths) -> None:
    """Per version: labelled rows and rows answered right; a mirrored copy is scored apart; a label sent before
    the window started cannot be for one of its answers."""
    paths.feedback_dir.mkdir()
    write(paths.feedback_file("iris"),
          json.dumps({"ts": T0 - 100, "request_id": "a1", "labels": ["1"]}) + "\n",  # older than the window
          json.dumps({"ts": T0 + 10, "request_id": "a1", "labels": ["0"]}) + "\n",
          json.dumps({"ts": T0 + 10, "request_id": "a2", "labels": ["0"]}) + "\n",
          "not json\n",
          json.dumps({"ts": T0 + 11, "request_id": "two-rows", "labels": ["0", "0"]}) + "\n")
    win = AccessLogMetrics(paths.router_access_log, paths.feedback_file).window("iris", T0, T0 + 60)
    champ, cand = win.get("1"), win.get("2")
    assert (champ.labelled, champ.correct, champ.accuracy) == (3, 2, pytest.approx(2 / 3))
    assert (cand.labelled, cand.correct) == (1, 0)
    assert (cand.shadow_labelled, cand.shadow_correct) == (1, 1)
    assert AccessLogMetrics(paths.router_access_log).window("iris", T0, T0 + 60).get("1").labelled == 0


def test_unreadable_labels_leave_the_rest_of_the_window(paths: StatePaths, monkeypatch: pytest.MonkeyPatch) -> None:
    paths.feedback_dir.mkdir()
    write(paths.feedback_file("iris"), json.dumps({"ts": T0 + 10, "request_id": "a1", "labels": ["0"]}) + "\n")
    real_open = open

    def deny(path: object, *a: object, **k: object) -> object:
        if str(path).endswith(".jsonl"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", deny)
    win = AccessLogMetrics(paths.router_access_log, paths.feedback_file).window("iris", T0, T0 + 60)
    assert win.get("1").requests == 3 and "Permission denied" in win.feedback_error


def test_a_label_sent_before_its_answer_reached_the_log_waits_for_it(paths: StatePaths) -> None:
    """The router writes its log within about two seconds: a client labelling an answer at once is ahead of it,
    not wrong. The recorder refreshes until the answer is there (here it lands during the second wait)."""
    waits: list[float] = []

    def sleep(s: float) -> None:
        waits.append(s)
        if len(waits) == 2:
            with open(paths.router_access_log, "ab") as fh:
                fh.write(line(T0 + 6, "2", prediction="1:0.800", request_id="late").encode())

    recorder = FeedbackRecorder(AnswerIndex(paths.router_access_log), paths.feedback_file, clock=lambda: T0 + 10,
                                answer_wait_s=3.0, sleep=sleep)
    assert recorder.record("iris", {"request_id": "late", "label": 1})["recorded"] == 1
    assert len(waits) == 2 and stored(paths)[0]["request_id"] == "late"
    waits.clear()
    with pytest.raises(FeedbackError) as err:  # never answered: a 404 once the wait is over, bounded
        recorder.record("iris", {"request_id": "never", "label": 1})
    assert err.value.status == 404 and sum(waits) == pytest.approx(3.0)
