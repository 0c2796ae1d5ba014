"""The load-test gate: real locust subprocess runs against a tiny stand-in of the router, and the gate's reasons.

The stand-in (stdlib http.server in a thread) answers like our router: ``POST /predictions/<model>`` with
``{"inputs": [...]}`` -> ``{"predictions": [...]}`` one per row, version from ``X-Model-Version``. Locust itself is
only ever a subprocess (importing it would gevent-patch pytest).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from canaryflow.settings import LoadTestSettings
from deployments import loadtest
from deployments.loadtest import LoadTestResult, gate_load_test, parse_locust_stats, percentile, run_load_test
from tests.conftest import free_ports
from validation.results import Outcome

ROWS = np.arange(12, dtype=np.float64).reshape(4, 3)
QUICK = LoadTestSettings(users=2, spawn_rate=2, duration_s=2)


class _RouterStandIn(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    seen: list[tuple[str, str, int]] = []
    counter = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        model = self.path.rsplit("/", 1)[-1]
        version = self.headers.get("X-Model-Version", "")
        type(self).seen.append((model, version, len(body["inputs"])))
        type(self).counter += 1
        if model == "flaky" and type(self).counter % 4 == 0:
            self._answer(503, {"code": 503, "type": "ServiceUnavailable", "message": "worker died"})
            return
        preds = [{"class": "0", "class_index": 0, "model_version": version} for _ in body["inputs"]]
        self._answer(200, {"model_name": model, "model_version": version, "predictions": preds})

    def _answer(self, status: int, payload: dict) -> None:
        out = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # locust drops its connections mid-request when the run time is up


@pytest.fixture(scope="module")
def router_url() -> Iterator[str]:
    server = _QuietServer(("127.0.0.1", 0), _RouterStandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def real_run(router_url: str, tmp_path_factory: pytest.TempPathFactory) -> LoadTestResult:
    """One real locust run (about 3 s), shared by the parsing tests."""
    return run_load_test(router_url, "iris", "7", ROWS, QUICK, tmp_path_factory.mktemp("locust"), timeout_s=60)


def test_real_run_is_parsed_into_sane_numbers(real_run: LoadTestResult) -> None:
    r = real_run
    assert r.error is None, r.error
    assert r.requests > 20 and r.failures == 0 and r.failure_ratio == 0.0
    assert 0 <= r.p50_ms <= r.p95_ms <= r.p99_ms <= max(r.max_ms, r.p99_ms)
    assert r.rps > 10
    assert Path(r.files["json"]).exists() and Path(r.files["html"]).exists()
    # pinned through X-Model-Version, one row per request (rows_per_request=1)
    assert ("iris", "7", 1) in _RouterStandIn.seen


def test_locust_json_sample_parses_like_locust(real_run: LoadTestResult) -> None:
    entries = json.loads(Path(real_run.files["json"]).read_text())
    assert isinstance(entries, list) and entries[0]["name"] == "/predictions/[model]"
    assert {"num_requests", "num_failures", "response_times", "start_time", "last_request_timestamp"} <= set(entries[0])
    stats = parse_locust_stats(entries)
    assert stats["requests"] == real_run.requests == entries[0]["num_requests"]
    assert stats["p95_ms"] == real_run.p95_ms
    elapsed = entries[0]["last_request_timestamp"] - entries[0]["start_time"]
    assert stats["rps"] == pytest.approx(entries[0]["num_requests"] / elapsed, rel=0.01)
    # two entries merge: counts add, histograms add
    doubled = parse_locust_stats([entries[0], entries[0]])
    assert doubled["requests"] == 2 * stats["requests"] and doubled["p95_ms"] == stats["p95_ms"]


def test_percentile_over_histogram() -> None:
    # locust's definition: the smallest bucket with at most q*N requests below it (conservative for a gate)
    hist = {1: 90, 5: 5, 40: 4, 300: 1}  # 100 requests, as locust buckets them (ms)
    assert percentile(hist, 100, 0.50) == 1
    assert percentile(hist, 100, 0.90) == 5
    assert percentile(hist, 100, 0.95) == 40
    assert percentile(hist, 100, 0.99) == 300
    assert percentile({}, 0, 0.95) == 0.0


def test_failures_are_counted_and_quoted(router_url: str, tmp_path: Path) -> None:
    r = run_load_test(router_url, "flaky", "3", ROWS, QUICK, tmp_path, timeout_s=60)
    assert r.error is None, r.error
    assert r.failure_ratio == pytest.approx(0.25, abs=0.03)
    gate = gate_load_test(r, QUICK)
    assert gate.outcome is Outcome.FAILED
    assert gate.reason.startswith(f"failure ratio {r.failure_ratio:.2%} > 1.00% (most common: HTTP 503: ")
    assert "worker died" in gate.reason


def test_unreachable_target_is_an_error_not_a_model_failure(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_ports(1)[0]}"
    r = run_load_test(url, "iris", "1", ROWS, QUICK, tmp_path)
    gate = gate_load_test(r, QUICK)
    assert gate.outcome is Outcome.ERROR
    assert gate.reason.startswith(f"load test could not be measured: target {url} unreachable: ")
    assert not (tmp_path / "locust.log").exists()  # locust was never started


def test_crashed_locust_is_an_error(router_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken_locustfile.py"
    broken.write_text("raise SystemExit('locustfile exploded')\n")
    monkeypatch.setattr(loadtest, "LOCUSTFILE", broken)
    gate = gate_load_test(run_load_test(router_url, "iris", "1", ROWS, QUICK, tmp_path / "out"), QUICK)
    assert gate.outcome is Outcome.ERROR
    assert gate.reason.startswith("load test could not be measured: locust exited with code 1 after ")
    assert "locustfile exploded" in gate.reason


def test_hung_locust_is_killed_at_the_timeout(router_url: str, tmp_path: Path) -> None:
    r = run_load_test(router_url, "iris", "1", ROWS, QUICK, tmp_path, timeout_s=1)
    assert r.error == "locust did not finish within 1 s and was killed"
    assert gate_load_test(r, QUICK).outcome is Outcome.ERROR


def _result(**kw: object) -> LoadTestResult:
    base = dict(target="http://r", users=8, duration_s=10.0, requests=1000, failures=0, p50_ms=3.0, p95_ms=9.0,
                p99_ms=20.0, rps=100.0, files={"json": "a.json", "html": "a.html"})
    return LoadTestResult(**{**base, **kw})


def test_gate_pass_reason_quotes_every_number() -> None:
    gate = gate_load_test(_result(), LoadTestSettings())
    assert gate.outcome is Outcome.PASSED
    assert gate.gate == "load_test"
    assert gate.reason == ("p95 9.0 ms <= 50.0 ms; failure ratio 0.00% <= 1.00%; throughput 100.0 req/s >= "
                           "50.0 req/s [1000 requests, 8 users, 10 s]")
    assert gate.measured["files"] == {"json": "a.json", "html": "a.html"}
    assert gate.thresholds == {"max_p95_ms": 50.0, "max_failure_ratio": 0.01, "min_rps": 50.0}


def test_gate_fail_reasons_name_only_what_failed() -> None:
    s = LoadTestSettings()
    assert gate_load_test(_result(p95_ms=61.0), s).reason == "p95 61.0 ms > 50.0 ms [1000 requests, 8 users, 10 s]"
    slow = gate_load_test(_result(rps=12.34), s)
    assert slow.outcome is Outcome.FAILED
    assert slow.reason == "throughput 12.3 req/s < 50.0 req/s [1000 requests, 8 users, 10 s]"
    bad = gate_load_test(_result(failures=25, p95_ms=41.2, failure_messages={"HTTP 503: x": 25}),
                         LoadTestSettings(max_p95_ms=25.0))
    assert bad.reason == ("p95 41.2 ms > 25.0 ms; failure ratio 2.50% > 1.00% (most common: HTTP 503: x) "
                          "[1000 requests, 8 users, 10 s]")
    assert bad.measured["failure_ratio"] == 0.025


def test_gate_error_and_inconclusive() -> None:
    err = gate_load_test(_result(requests=0, error="target http://r unreachable: refused"), LoadTestSettings())
    assert (err.outcome, err.reason) == (Outcome.ERROR,
                                         "load test could not be measured: target http://r unreachable: refused")
    none = gate_load_test(_result(requests=0), LoadTestSettings())
    assert (none.outcome, none.reason) == (Outcome.INCONCLUSIVE, "no request completed; nothing to judge")
