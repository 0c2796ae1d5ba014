"""The load-test gate for real: locust (subprocess) -> nginx router -> TorchServe, pinned to a released version."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from canaryflow.demo import register_model, wait_for_release
from canaryflow.settings import LoadTestSettings
from deployments.loadtest import gate_load_test, run_load_test
from validation.results import Outcome

pytestmark = pytest.mark.integration
MODEL = "loadtest-it-model"


def test_load_test_through_the_router_pinned_to_a_version(stack, tmp_path: Path) -> None:
    uri = stack.settings.mlflow_uri
    version, rows, _ = register_model(uri, name=MODEL)
    outcome = wait_for_release(uri, MODEL, version, timeout_s=240)
    assert outcome.status == "released", outcome.reason

    settings = LoadTestSettings(users=4, spawn_rate=4, duration_s=3, max_p95_ms=1000.0, min_rps=5.0)
    result = run_load_test(stack.settings.router_url, MODEL, version, rows[:16], settings, tmp_path, timeout_s=90)

    assert result.error is None, result.error
    assert result.requests > 30 and result.failures == 0, result.failure_messages
    assert 0 <= result.p50_ms <= result.p95_ms <= result.p99_ms < 1000 and result.p99_ms > 0
    assert result.rps > 10
    gate = gate_load_test(result, settings)
    assert gate.outcome is Outcome.PASSED, gate.reason
    assert Path(gate.measured["files"]["html"]).stat().st_size > 1000
    # every locust request went through the router to the pinned version (its JSON access log flushes each 1 s)
    deadline = time.monotonic() + 10
    while True:
        text = stack.paths.router_access_log.read_text()
        ours = [json.loads(line) for line in text.splitlines() if f'"model":"{MODEL}"' in line]
        if len(ours) >= result.requests or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(ours) >= result.requests
    assert {line["version"] for line in ours} == {version}
