"""The load-test gate for real: locust (subprocess) -> nginx router -> TorchServe, pinned to a released version,
alone and paired with the stack's calibration model in the same run."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from canaryflow.core.settings import LoadTestSettings
from canaryflow.local.demo import register_model, wait_for_release
from canaryflow.release.calibration import CALIBRATION_MODEL, ensure_calibration
from canaryflow.services import Services
from deployments.loadtest import Peer, run_load_test
from deployments.torchserve import batched_name
from validation.loadtest import gate_load_test
from validation.results import Outcome

pytestmark = pytest.mark.integration
MODEL = "loadtest-it-model"


@pytest.fixture(scope="module")
def released(stack) -> tuple[str, object]:
    """A first release of MODEL (its own load test ran against the calibration peer); (version, rows)."""
    uri = stack.settings.mlflow_uri
    # bars a busy test machine meets: this module tests the measurement, tests/e2e the default bars
    policy = {"loadtest": {"max_p95_ms": 1000, "min_rps": 5}}
    MlflowClient(uri).create_registered_model(MODEL, tags={"canaryflow.policy": json.dumps(policy)})
    version, rows, _ = register_model(uri, name=MODEL)
    outcome = wait_for_release(uri, MODEL, version, timeout_s=240)
    assert outcome.status == "released", outcome.reason
    return version, rows


def _access_log(stack, model: str, at_least: int) -> list[dict]:
    """The router's JSON access-log lines of ``model`` once at least ``at_least`` are there (flushed each 1 s)."""
    deadline = time.monotonic() + 10
    while True:
        text = stack.paths.router_access_log.read_text()
        ours = [json.loads(line) for line in text.splitlines() if f'"model":"{model}"' in line]
        if len(ours) >= at_least or time.monotonic() > deadline:
            return ours
        time.sleep(0.5)


def test_load_test_through_the_router_pinned_to_a_version(stack, released, tmp_path: Path) -> None:
    version, rows = released

    settings = LoadTestSettings(users=4, spawn_rate=4, duration_s=3, max_p95_ms=1000.0, min_rps=5.0)
    unpinned = run_load_test(stack.settings.router_url, MODEL, version, rows[:16], settings, tmp_path / "no-key",
                             timeout_s=90)  # the pipeline's pin key is what makes the router honour the pin
    assert set(unpinned.failure_messages) == {
        'HTTP 403: {"code":403,"type":"PinRefused","message":"X-Model-Version pins are for the release pipeline only"}'
    } and unpinned.requests == unpinned.failures > 0, unpinned.failure_messages
    result = run_load_test(stack.settings.router_url, MODEL, version, rows[:16], settings, tmp_path, timeout_s=90,
                           pin=Services(stack.settings).router.pin_credentials())

    assert result.error is None, result.error
    assert result.requests > 30 and result.failures == 0, result.failure_messages
    assert 0 <= result.p50_ms <= result.p95_ms <= result.p99_ms < 1000 and result.p99_ms > 0
    assert result.rps > 10
    gate = gate_load_test(result, settings)
    assert gate.outcome is Outcome.PASSED, gate.reason
    assert Path(gate.measured["files"]["html"]).stat().st_size > 1000
    # every locust request went through the router to the pinned version (its JSON access log flushes each 1 s)
    ours = _access_log(stack, MODEL, result.requests)
    assert len(ours) >= result.requests
    assert {line["version"] for line in ours} == {version}


def test_paired_load_reaches_the_candidate_and_the_calibration_peer(stack, released, tmp_path: Path) -> None:
    version, rows = released
    # the release's own gate was judged against the calibration peer, and says so
    tags = MlflowClient(stack.settings.mlflow_uri).get_model_version(MODEL, version).tags
    assert tags["canaryflow.gate.load_test"].startswith("passed: p95 "), tags["canaryflow.gate.load_test"]
    assert "; peer calibration: p95 " in tags["canaryflow.gate.load_test"]

    svc = Services(stack.settings)
    calibration = ensure_calibration(svc, rows.shape[1])  # registered by that release: found, not rebuilt
    assert calibration == f"n{rows.shape[1]}" and calibration in svc.backend.versions(CALIBRATION_MODEL)
    before = len(_access_log(stack, CALIBRATION_MODEL, 0))
    settings = LoadTestSettings(users=3, spawn_rate=3, duration_s=3, target_rps=30, max_p95_ms=1000.0, min_rps=5.0)
    peer = Peer("calibration", CALIBRATION_MODEL, calibration, rows[:16])
    result = run_load_test(stack.settings.router_url, MODEL, version, rows[:16], settings, tmp_path, timeout_s=90,
                           peer=peer, pin=svc.router.pin_credentials())

    assert result.error is None and result.peer is not None and result.peer.error is None, result
    assert result.requests > 10 and result.failures == 0, result.failure_messages
    assert result.peer.requests > 10 and result.peer.failures == 0, result.peer.failure_messages
    gate = gate_load_test(result, settings)
    assert gate.outcome is Outcome.PASSED, gate.reason
    assert gate.measured["peer_requests"] == result.peer.requests and gate.measured["peer_p95_ms"] > 0
    # both targets were served through the router, each by its pinned version
    peer_lines = _access_log(stack, CALIBRATION_MODEL, before + result.peer.requests)[before:]
    assert len(peer_lines) >= result.peer.requests
    assert {line["version"] for line in peer_lines} == {calibration}
    assert all(line["status"] == 200 for line in peer_lines)


def test_serving_settings_are_chosen_by_measurement_and_kept_across_registrations(stack, released,
                                                                                  tmp_path: Path) -> None:
    """A staged version is served with serving.* and with each `tune` setting in turn, loaded through the router
    at the offered load and closed-loop; the setting kept follows the rule on the measured numbers, TorchServe
    serves it, and a re-registration (what a TorchServe restart or reconcile does) serves it the same way, until
    it is unregistered."""
    import zipfile

    from canaryflow.core.serving_contract import META_FILE
    from canaryflow.core.settings import ServingConfig
    from canaryflow.release.tuning import choose, tune_serving
    from deployments.archive import build_mar

    version, rows = released
    services = Services(stack.settings)
    backend, staged = services.backend, "900"
    with zipfile.ZipFile(stack.paths.model_store / f"{MODEL}_v{version}.mar") as z:  # the released bundle
        z.extract("model.onnx" if "model.onnx" in z.namelist() else "model.pt2", tmp_path / "bundle")
        z.extract(META_FILE, tmp_path / "bundle")
    model_file = next(p for p in (tmp_path / "bundle").iterdir() if p.name != META_FILE)
    archive = build_mar(model_file, [tmp_path / "bundle" / META_FILE], model=MODEL, version=staged,
                        model_store=stack.paths.model_store).path
    assert backend.register(MODEL, staged, archive)
    try:
        base = ServingConfig.of(stack.settings.serving)
        cfg = LoadTestSettings(users=4, spawn_rate=4, max_p95_ms=1000.0, tune=["2x1", "1x4"], tune_duration_s=2)
        tuning = tune_serving(backend, base, stack.settings.router_url, MODEL, staged, archive, rows[:16], cfg,
                              tmp_path / "tuning", pin=services.router.pin_credentials())
        assert tuning is not None
        tried = [base, ServingConfig(workers=2, batch_size=1), ServingConfig(workers=1, batch_size=4)]
        # every setting twice (loadtest.tune_rounds), interleaved A/B/C/C/B/A
        assert [t.config for t in tuning.trials] == [*tried, *tried[::-1]]
        for trial in tuning.trials:  # each setting answered real requests through the router
            assert trial.error is None and trial.requests > 10 and trial.rps > 0 and trial.failure_ratio == 0, trial
            assert trial.capacity_rps > 0, trial  # its closed-loop burst answered too
        assert (tuning.chosen, tuning.reason) == choose(tuning.trials, cfg)
        assert json.loads((tmp_path / "tuning" / "tuning.json").read_text())["chosen"] == tuning.chosen.model_dump()

        def served() -> tuple[int, int]:
            """(workers, batch size) the setting is served with: a batched one by the batched twin, next to the
            version's own registration without batching (adaptive batching, serving.adaptive_batching)."""
            d = backend.describe(MODEL, staged)
            if backend.batched_config(MODEL, staged) is None:
                return d["minWorkers"], d["batchSize"]
            assert (d["minWorkers"], d["batchSize"]) == (1, 1)
            twin = backend.describe(batched_name(MODEL), staged)
            return twin["minWorkers"], twin["batchSize"]

        assert served() == (tuning.chosen.workers, tuning.chosen.batch_size)
        wanted = ServingConfig(workers=2, batch_size=4, max_batch_delay_ms=3)
        backend.tune(MODEL, staged, archive, wanted)
        assert served() == (2, 4) and backend.describe(batched_name(MODEL), staged)["maxBatchDelay"] == 3
        _a_lone_request_skips_the_batch_and_an_overlapping_one_gets_it(stack, staged, rows, services)
        # lost by TorchServe (a restart): registered again with what was measured, not serving.*
        backend._unregister(MODEL, staged)
        assert backend.register(MODEL, staged, archive) and served() == (2, 4)
        assert backend.serving_config(MODEL, staged) == wanted
    finally:
        backend.unregister(MODEL, staged)
    assert backend.serving_config(MODEL, staged) == ServingConfig.of(stack.settings.serving)  # forgotten


def _served_by(stack, version: str) -> dict[str, float]:
    """TorchServe's own request counts of ``version`` per registration (the model's and its batched twin's)."""
    text = httpx.get(f"http://127.0.0.1:{stack.settings.ports.torchserve_metrics}/metrics", timeout=10).text
    counts = {MODEL: 0.0, batched_name(MODEL): 0.0}
    for labels, value in re.findall(r"^ts_inference_requests_total\{([^}]*)\} (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found.get("model_version") == version and found.get("model_name") in counts:
            counts[found["model_name"]] += float(value)
    return counts


def _a_lone_request_skips_the_batch_and_an_overlapping_one_gets_it(stack, version: str, rows, services) -> None:
    """On the real router and TorchServe: requests one after another go to the version's own registration; a
    request that arrives while another is in flight goes to the batched twin. Deterministic: the first request is
    sent with ``Expect: 100-continue`` and its body held back until nginx answers 100 Continue, which it does when
    it starts reading the body, after the route's Lua counted the request in flight."""
    headers = {**services.router.pin_credentials(), "X-Model-Version": version, "Content-Type": "application/json"}
    body = json.dumps({"inputs": rows[:1].tolist()}).encode()

    def post() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", stack.settings.ports.router, timeout=30)
        try:
            conn.request("POST", f"/predictions/{MODEL}", body=body, headers=headers)
            return conn.getresponse().status
        finally:
            conn.close()

    before = _served_by(stack, version)
    assert [post() for _ in range(3)] == [200, 200, 200]
    with socket.create_connection(("127.0.0.1", stack.settings.ports.router), timeout=30) as held:
        head = {**headers, "Content-Length": str(len(body)), "Expect": "100-continue"}
        held.sendall(f"POST /predictions/{MODEL} HTTP/1.1\r\nHost: router\r\n".encode()
                     + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode() + b"\r\n")
        assert held.recv(64).startswith(b"HTTP/1.1 100 Continue")
        assert post() == 200  # while the held one is in flight
        held.sendall(body)
        assert held.recv(64).startswith(b"HTTP/1.1 200")
    assert post() == 200
    # TorchServe counts a request when it answered it: wait for the held one's count (each answer is counted)
    deadline = time.monotonic() + 10
    while True:
        after = _served_by(stack, version)
        moved = (after[MODEL] - before[MODEL], after[batched_name(MODEL)] - before[batched_name(MODEL)])
        if moved == (5, 1) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert moved == (5, 1)
