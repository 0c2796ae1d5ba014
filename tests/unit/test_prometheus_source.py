"""PrometheusMetricsSource against a fake Prometheus HTTP API (httpx MockTransport): counter growth with resets,
latency samples rebuilt from buckets, classes, errors; unreachable or refusing Prometheus -> MetricsSourceError.
Also the handler's metric lines (TorchServe's Context, no server), the generated rule file and the local
Prometheus config (checked by promtool)."""

from __future__ import annotations

import gc
import json
import logging
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from test_handler import TinyModel, load, make_bundle, predict, rows_body, wire
from ts.utils.util import PredictionException

from canaryflow.core.errors import MetricsSourceError
from canaryflow.core.paths import StatePaths
from canaryflow.core.serving_contract import PINNED_HEADER, REPLAY_HEADER
from canaryflow.core.settings import MetricsSettings, Settings
from canaryflow.local import prometheus as local_prometheus
from deployments import prometheus as prom
from deployments.handler import CanaryflowHandler, LiveMetrics
from deployments.prometheus import PrometheusMetricsSource, increase, samples_from_buckets

URL = "http://prometheus.test:9090"
T0 = 1_800_000_000.0


def series(name: str, version: str, points: list[tuple[float, float]], **labels: str) -> dict[str, Any]:
    metric = {"__name__": name, "model_name": "iris", "model_version": version, "instance": "ts:8082", **labels}
    return {"metric": metric, "values": [[t, str(v)] for t, v in points]}


def fake(result: list[dict[str, Any]], seen: list[httpx.Request] | None = None) -> httpx.Client:
    def answer(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "matrix", "result": result}})
    return httpx.Client(transport=httpx.MockTransport(answer))


# -- the math ---------------------------------------------------------------------------------------------------
def test_increase_counts_from_the_last_sample_at_or_before_the_start() -> None:
    points = [(T0 - 10, 5), (T0 - 5, 7), (T0 + 5, 9), (T0 + 10, 12)]
    assert increase(points, T0) == 5  # 12 - 7: what came before the window is not counted
    assert increase(points, T0 - 5) == 5 and increase(points, T0 - 6) == 7


def test_increase_through_a_restart_counts_what_came_after_it() -> None:
    # TorchServe restarted between T0+5 and T0+10: the counter began again from 0 and reached 3
    assert increase([(T0 - 5, 100), (T0 + 5, 110), (T0 + 10, 3), (T0 + 15, 4)], T0) == 10 + 3 + 1


def test_a_series_born_in_the_window_counts_from_zero() -> None:
    assert increase([(T0 + 5, 4), (T0 + 10, 6)], T0) == 6
    assert increase([], T0) == 0


def test_samples_from_buckets_put_each_request_in_its_bucket() -> None:
    got = samples_from_buckets({0.1: 1, 0.12: 3, 0.15: 3, 10_000.0: 3, float("inf"): 4})
    assert got == [0.05, pytest.approx(np.sqrt(0.1 * 0.12)), pytest.approx(np.sqrt(0.1 * 0.12)), 10_000.0]
    # the first bucket present starts at the bound before it (the recording rules make no series below it)
    assert samples_from_buckets({1.0: 2, 1.2: 5, 2.0: 6, float("inf"): 6}) == pytest.approx(
        [np.sqrt(0.9)] * 2 + [np.sqrt(1.2)] * 3 + [np.sqrt(2.4)])


def test_rebuilt_samples_are_within_the_bucket_error_of_the_true_ones() -> None:
    rng = np.random.default_rng(0)
    true = rng.lognormal(np.log(20), 0.6, 2000)
    bounds = [*prom.LATENCY_BUCKETS_MS, float("inf")]
    cumulative = {b: float(np.sum(true <= b)) for b in bounds}
    rebuilt = np.asarray(samples_from_buckets(cumulative))
    assert len(rebuilt) == len(true)
    for q in (50, 95, 99):  # neighbouring bounds are at most 25 % apart: the geometric middle is within 12 %
        assert abs(np.percentile(rebuilt, q) / np.percentile(true, q) - 1) < 0.12


def test_the_buckets_are_ordered_and_close_together() -> None:
    assert list(prom.LATENCY_BUCKETS_MS) == sorted(set(prom.LATENCY_BUCKETS_MS))
    ratios = np.diff(np.log(prom.LATENCY_BUCKETS_MS[1:]))
    assert float(np.exp(ratios.max())) <= 1.25 + 1e-9


# -- the source against a fake Prometheus -------------------------------------------------------------------------
def test_window_per_version_from_the_counters() -> None:
    start, end = T0, T0 + 60
    before, mid, last = start - 3, start + 30, end - 1
    result = [
        # v1: 10 requests before the window; in it 4 more at <= 1.2 ms (2 of them <= 1 ms) and 1 at <= 2 ms
        series(prom.BUCKET_METRIC, "1", [(before, 6), (mid, 8), (last, 8)], le="1"),
        series(prom.BUCKET_METRIC, "1", [(before, 9), (mid, 11), (last, 13)], le="1.2"),
        series(prom.BUCKET_METRIC, "1", [(before, 10), (mid, 12), (last, 15)], le="2"),
        series(prom.BUCKET_METRIC, "1", [(before, 10), (mid, 12), (last, 15)], le="+Inf"),
        series(prom.ERRORS_METRIC, "1", [(before, 1), (last, 2)]),
        series(prom.PREDICTIONS_METRIC, "1", [(before, 3), (last, 6)], **{"class": "0"}),
        series(prom.PREDICTIONS_METRIC, "1", [(before, 7), (last, 9)], **{"class": "1"}),
        # v2 appeared in the window: 3 requests, one over the largest bound
        series(prom.BUCKET_METRIC, "2", [(mid, 2), (last, 2)], le="500"),
        series(prom.BUCKET_METRIC, "2", [(mid, 2), (last, 2)], le="10000"),
        series(prom.BUCKET_METRIC, "2", [(mid, 2), (last, 3)], le="+Inf"),
        series(prom.PREDICTIONS_METRIC, "2", [(mid, 3)], **{"class": "1"}),
        # v3 served nothing in the window
        series(prom.BUCKET_METRIC, "3", [(before, 4), (last, 4)], le="+Inf"),
    ]
    seen: list[httpx.Request] = []
    win = PrometheusMetricsSource(URL, client=fake(result, seen)).window("iris", start, end)

    v1, v2 = win.get("1"), win.get("2")
    assert (v1.requests, v1.errors, v1.classes) == (5, 1, {"0": 3, "1": 2})
    assert sorted(v1.latencies_ms) == pytest.approx([0.9487, 0.9487, 1.0954, 1.0954, 1.5492], abs=1e-3)
    assert (v2.requests, v2.errors, v2.classes) == (3, 0, {"1": 3})
    assert sorted(v2.latencies_ms) == pytest.approx([np.sqrt(400 * 500)] * 2 + [10_000.0])
    assert "3" not in win.versions and win.get("3").requests == 0
    assert win.shadow_pairs == 0 and v1.scores == [] and v1.shadow_requests == 0
    [request] = seen
    assert request.url.path == "/api/v1/query" and request.url.params["time"] == f"{end:.3f}"
    query = request.url.params["query"]
    assert 'model_name="iris"' in query and query.endswith(f"[{int((60 + prom.LOOKBACK_S) * 1000)}ms]")
    assert all(name in query for name in (prom.BUCKET_METRIC, prom.ERRORS_METRIC, prom.PREDICTIONS_METRIC))


def test_window_adds_up_the_series_of_several_targets() -> None:
    result = [series(prom.BUCKET_METRIC, "1", [(T0 - 1, 0), (T0 + 9, n)], le="+Inf", instance=f"pod-{n}")
              for n in (2, 3)]
    assert PrometheusMetricsSource(URL, client=fake(result)).window("iris", T0, T0 + 10).get("1").requests == 5


def test_a_model_name_is_quoted_in_the_query() -> None:
    seen: list[httpx.Request] = []
    PrometheusMetricsSource(URL, client=fake([], seen)).window('we"ird\\', T0, T0 + 1)
    assert 'model_name="we\\"ird\\\\"' in seen[0].url.params["query"]


def test_unreachable_prometheus_is_a_metrics_source_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)
    client = httpx.Client(transport=httpx.MockTransport(refuse))
    with pytest.raises(MetricsSourceError, match="Prometheus unreachable at http://prometheus.test:9090"):
        PrometheusMetricsSource(URL, client=client).window("iris", T0, T0 + 10)


def test_a_real_unreachable_port_is_a_metrics_source_error() -> None:
    with pytest.raises(MetricsSourceError, match="unreachable"):
        PrometheusMetricsSource("http://127.0.0.1:9", timeout_s=2).window("iris", T0, T0 + 10)


@pytest.mark.parametrize(("status", "body", "why"), [
    (400, {"status": "error", "errorType": "bad_data", "error": "parse error at char 3"}, "parse error at char 3"),
    (503, {"status": "error", "errorType": "unavailable", "error": "not ready"}, "HTTP 503"),
    (502, None, "HTTP 502"),
    (200, {"status": "success", "data": {"resultType": "vector", "result": []}}, "not a matrix"),
])
def test_an_error_answer_is_a_metrics_source_error(status: int, body: dict | None, why: str) -> None:
    content = json.dumps(body).encode() if body is not None else b"<html>bad gateway</html>"
    client = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(status, content=content)))
    with pytest.raises(MetricsSourceError, match=why):
        PrometheusMetricsSource(URL, client=client).window("iris", T0, T0 + 10)


# -- what the handler emits ---------------------------------------------------------------------------------------
@pytest.fixture
def metric_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="ts.metrics.caching_metric")
    yield caplog
    gc.unfreeze()  # initialize() freezes the heap


def _emitted(caplog: pytest.LogCaptureFixture, handler: CanaryflowHandler) -> list[tuple[str, str, str]]:
    """(name, value, dims) of each [METRICS] line the handler wrote, as TorchServe's frontend parses them, once
    it flushed what it counted (LiveMetrics writes at most every second, and on a quiet second)."""
    handler.live_metrics.flush()
    out = []
    for record in caplog.records:
        text = record.getMessage()
        if text.startswith("[METRICS]canaryflow"):
            head, dims = text[len("[METRICS]"):].split("|#")[:2]
            name_unit, value = head.split(":")
            out.append((name_unit.rsplit(".", 1)[0], value, dims))
    caplog.clear()
    return out


def test_the_handler_reports_live_requests_only(tmp_path: Path, metric_log: pytest.LogCaptureFixture) -> None:
    bundle = make_bundle(tmp_path / "b", TinyModel().eval(), model_version="7")
    handler, context = load(bundle)
    rows = [[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0], [-3.0, 0.25, 0.0, 7.0]]
    [response] = predict(handler, context, wire(rows_body(rows)))
    got = _emitted(metric_log, handler)
    names = [name for name, _, _ in got]
    assert names[:2] == [prom.BIN_METRIC, prom.SUM_METRIC] and prom.ERRORS_METRIC not in names
    bin_dims = dict(kv.split(":") for kv in got[0][2].split(","))
    assert bin_dims["model_name"] == "iris" and bin_dims["model_version"] == "7"
    assert bin_dims["le"] in {prom.le_label(b) for b in [*prom.LATENCY_BUCKETS_MS, float("inf")]}
    assert float(got[1][1]) <= float(bin_dims["le"])
    classes = {dict(kv.split(":") for kv in dims.split(","))["class"]: float(v)
               for name, v, dims in got if name == prom.PREDICTIONS_METRIC}
    expected: dict[str, float] = {}
    for p in response["predictions"]:
        expected[str(p["class_index"])] = expected.get(str(p["class_index"]), 0) + 1
    assert classes == expected

    for header in (PINNED_HEADER, REPLAY_HEADER):  # the pipeline's own requests and the canary's replay
        predict(handler, context, wire(rows_body(rows)), headers={header: "1"})
        assert _emitted(metric_log, handler) == []
    with pytest.raises(PredictionException):  # a client's mistake: no evidence about the version
        predict(handler, context, wire(rows_body([[1, 2]])))
    assert _emitted(metric_log, handler) == []
    predict(handler, context, wire(b"{}"), headers={"describe": "True"})
    assert _emitted(metric_log, handler) == []


def test_the_handler_counts_a_server_side_failure(tmp_path: Path, metric_log: pytest.LogCaptureFixture) -> None:
    handler, context = load(make_bundle(tmp_path / "b", TinyModel().eval()))
    handler._predict = lambda x: (_ for _ in ()).throw(RuntimeError("boom"))  # the model itself fails
    with pytest.raises(RuntimeError):
        predict(handler, context, wire(rows_body([[1.0, 2.0, 3.0, 4.0]])))
    names = [name for name, _, _ in _emitted(metric_log, handler)]
    assert names == [prom.BIN_METRIC, prom.SUM_METRIC, prom.ERRORS_METRIC]


def test_a_chaos_500_is_counted_as_an_error(tmp_path: Path, metric_log: pytest.LogCaptureFixture) -> None:
    handler, context = load(make_bundle(tmp_path / "b", TinyModel().eval(), chaos={"error_ratio": 1.0}))
    predict(handler, context, wire(rows_body([[1.0, 2.0, 3.0, 4.0]])))
    names = [name for name, _, _ in _emitted(metric_log, handler)]
    assert names == [prom.BIN_METRIC, prom.SUM_METRIC, prom.ERRORS_METRIC]  # no classes: it answered none


def test_requests_are_summed_into_one_line_per_counter_until_the_flush(tmp_path: Path,
                                                                        metric_log: pytest.LogCaptureFixture) -> None:
    handler, context = load(make_bundle(tmp_path / "b", TinyModel().eval()))  # flushed by the test only (conftest)
    rows = [[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0], [-3.0, 0.25, 0.0, 7.0]]
    answers = [predict(handler, context, wire(rows_body(rows)))[0] for _ in range(5)]
    assert [r.getMessage() for r in metric_log.records if "[METRICS]canaryflow" in r.getMessage()] == []
    got = _emitted(metric_log, handler)
    bins = [(float(v), dims) for name, v, dims in got if name == prom.BIN_METRIC]
    assert sum(v for v, _ in bins) == 5 and len(bins) == len({dims for _, dims in bins})  # a line per bucket
    classes = {dict(kv.split(":") for kv in dims.split(","))["class"]: float(v)
               for name, v, dims in got if name == prom.PREDICTIONS_METRIC}
    expected: dict[str, float] = {}
    for response in answers:
        for p in response["predictions"]:
            expected[str(p["class_index"])] = expected.get(str(p["class_index"]), 0) + 1
    assert classes == expected and sum(classes.values()) == 15
    assert [name for name, _, _ in got].count(prom.SUM_METRIC) == 1
    assert _emitted(metric_log, handler) == []  # nothing counted since: nothing written


def test_a_quiet_second_is_written_by_the_flusher() -> None:
    metrics = LiveMetrics("iris", "7", flush_s=0.05)
    metrics._last = float("inf")  # the request itself never finds a flush due: only the thread can write
    writes: list[tuple[str, str]] = []
    wrote = threading.Event()

    def recorder(name: str) -> Any:
        def write(*args: Any, **kwargs: Any) -> None:
            writes.append((name, threading.current_thread().name))
            if name == "predictions":  # the flush's last line: every write is recorded, none reaches the log
                wrote.set()
        return write

    for name in ("bins", "sum", "errors", "predictions"):  # all of them: a write left to the real metric would
        getattr(metrics, name).add_or_update = recorder(name)  # log into whichever test runs next
    metrics.observe(1.2, False, Counter({1: 1}))
    assert wrote.wait(30), "the flusher thread never wrote the last request's counters"
    assert writes == [(name, "canaryflow-live-metrics") for name in ("bins", "sum", "predictions")]


def test_the_worker_logs_warnings_and_metrics_but_not_each_request(tmp_path: Path,
                                                                   metric_log: pytest.LogCaptureFixture) -> None:
    """TorchServe's worker would log "Backend received inference at" and two gauges for every request."""
    root = logging.getLogger()
    level = root.level
    try:
        handler, context = load(make_bundle(tmp_path / "b", TinyModel().eval()))
        assert root.level == logging.WARNING and logging.getLogger("ts.metrics").getEffectiveLevel() == logging.INFO
        metric_log.set_level(logging.INFO)  # capture everything the worker's loggers would let through
        root.setLevel(logging.WARNING)  # set_level lowered it again
        predict(handler, context, wire(rows_body([[1.0, 2.0, 3.0, 4.0]])))
        messages = [r.getMessage() for r in metric_log.records if r.levelno >= logging.getLogger(r.name).
                    getEffectiveLevel() and all(f(r) for f in logging.getLogger(r.name).filters)]
        assert not any(m.startswith(("[METRICS]HandlerTime", "[METRICS]PredictionTime")) for m in messages)
        assert [name for name, _, _ in _emitted(metric_log, handler)][:2] == [prom.BIN_METRIC, prom.SUM_METRIC]
    finally:
        root.setLevel(level)
    # TorchServe's Service.predict logs each PredictionException with its traceback: a client's 400 is dropped,
    # a 5xx kept
    service = logging.getLogger("ts.service")

    def logged(error: Exception) -> bool:
        try:
            raise error
        except Exception:
            record = service.makeRecord("ts.service", logging.ERROR, __file__, 1, "Prediction error", (),
                                        sys.exc_info())
        return all(f(record) for f in service.filters)

    assert not logged(PredictionException("row 0 has 2 values, expected 4", 400))
    assert logged(PredictionException("model failed", 503)) and logged(RuntimeError("boom"))
    # TorchServe's per-request gauges (Service.predict's PredictionTime) are dropped, the handler's counters kept
    caching = logging.getLogger("ts.metrics.caching_metric")

    def passes(line: str) -> bool:
        record = caching.makeRecord(caching.name, logging.INFO, __file__, 1, line, (), None)
        return all(f(record) for f in caching.filters)

    assert not passes("[METRICS]PredictionTime.Milliseconds:0.61|#ModelName:iris,Level:Model|#type:GAUGE|"
                      "#hostname:vm,1796620087,bc45f74b")
    assert passes(f"[METRICS]{prom.BIN_METRIC}.Milliseconds:1|#model_name:iris,model_version:7,le:1.5|"
                  "#type:COUNTER|#hostname:vm,1796620972")


# -- files and the local Prometheus -------------------------------------------------------------------------------
def test_the_recording_rules_cover_every_bucket_and_promtool_accepts_them(tmp_path: Path) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(prom.recording_rules())
    rules = yaml.safe_load(path.read_text())["groups"][0]["rules"]
    assert [r["labels"]["le"] for r in rules if "labels" in r] == [
        prom.le_label(b) for b in [*prom.LATENCY_BUCKETS_MS, float("inf")]]
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_torchserve_metrics_config_declares_the_handler_counters() -> None:
    spec = yaml.safe_load(prom.TORCHSERVE_METRICS_FILE.read_text())
    counters = {m["name"]: m["dimensions"] for m in spec["model_metrics"]["counter"]}
    assert counters == {prom.BIN_METRIC: ["model_name", "model_version", "le"],
                        prom.SUM_METRIC: ["model_name", "model_version"],
                        prom.ERRORS_METRIC: ["model_name", "model_version"],
                        prom.PREDICTIONS_METRIC: ["model_name", "model_version", "class"]}
    assert "ts_inference_requests_total" in {m["name"] for m in spec["ts_metrics"]["counter"]}


def test_local_prometheus_config(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state", metrics=MetricsSettings(source="prometheus",
                                                                            scrape_interval_s=2))
    paths = StatePaths(settings.state_dir).ensure()
    local_prometheus.write_config(settings, paths)
    config = yaml.safe_load(local_prometheus.config_file(paths).read_text())
    assert config["global"]["scrape_interval"] == "2000ms"
    [job] = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": [f"127.0.0.1:{settings.ports.torchserve_metrics}"]}]
    assert job["metric_relabel_configs"] == prom.METRIC_RELABEL_CONFIGS
    cmd = local_prometheus.command(settings, paths)
    assert f"--web.listen-address=127.0.0.1:{settings.ports.prometheus}" in cmd
    assert f"--storage.tsdb.path={paths.root / 'prometheus' / 'data'}" in cmd
    done = subprocess.run(["promtool", "check", "config", str(local_prometheus.config_file(paths))],
                          capture_output=True, text=True)  # make setup installs promtool (Debian prometheus)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_stack_runs_prometheus_only_for_the_prometheus_source(tmp_path: Path) -> None:
    from canaryflow.local.stack import LocalStack

    default = LocalStack(Settings(state_dir=tmp_path / "a"))
    assert "prometheus" not in {p.name for p in default.programs()} and "prometheus" not in default.health()
    local = LocalStack(Settings(state_dir=tmp_path / "b", metrics=MetricsSettings(source="prometheus")))
    assert "prometheus" in {p.name for p in local.programs()} and "prometheus" in local.health()
    theirs = LocalStack(Settings(state_dir=tmp_path / "c", metrics=MetricsSettings(
        source="prometheus", prometheus_url="http://prometheus.example:9090")))
    assert "prometheus" not in {p.name for p in theirs.programs()}


def test_torchserve_config_names_the_handler_metrics_config(tmp_path: Path) -> None:
    from canaryflow.core.settings import Settings
    from deployments import torchserve

    paths = StatePaths(tmp_path / "state").ensure()
    torchserve.write_config(Settings(state_dir=tmp_path / "state"), paths)
    target = paths.torchserve_dir / prom.TORCHSERVE_METRICS_FILE.name
    assert f"metrics_config={target}" in paths.torchserve_config.read_text().splitlines()
    assert target.read_text() == prom.TORCHSERVE_METRICS_FILE.read_text()
