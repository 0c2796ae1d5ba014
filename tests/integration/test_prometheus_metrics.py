"""PrometheusMetricsSource for real: a real Prometheus (Debian's, configured by canaryflow/local/prometheus.py)
scrapes the shared stack's real TorchServe while real traffic goes through the router to two versions; the
window it gives matches the router's access log (AccessLogMetrics) over the same time range.

The two versions are tiny exported models archived with our handler and registered straight on TorchServe (no
release: this tests the measurements, tests/e2e the ramp). No sleeps: every wait is a condition with a deadline.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from canaryflow.core.paths import StatePaths
from canaryflow.core.serving_contract import META_FILE, VERSION_HEADER, ServingMeta
from canaryflow.core.settings import MetricsSettings
from canaryflow.local import prometheus as local_prometheus
from canaryflow.services import Services
from deployments import prometheus as prom
from deployments.archive import build_mar
from deployments.metrics import AccessLogMetrics
from deployments.prometheus import PrometheusMetricsSource
from deployments.torchserve import archive_name
from tests.conftest import free_ports

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
MODEL = "prom-it-model"
VERSIONS = ("1", "2")
REQUESTS = 160
SCRAPE_S = 1.0


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"not {what} after {timeout_s:.0f} s"
        time.sleep(0.2)
    return result


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus of this module's own (the shared stack runs the access-log source) scraping the stack's
    TorchServe every second; its URL."""
    [port] = free_ports(1)
    settings = stack.settings.model_copy(update={
        "metrics": MetricsSettings(source="prometheus", scrape_interval_s=SCRAPE_S),
        "ports": stack.settings.ports.model_copy(update={"prometheus": port})})
    paths = StatePaths(tmp_path_factory.mktemp("prometheus"))
    local_prometheus.write_config(settings, paths)
    log = (paths.root / "prometheus.log").open("w")
    proc = subprocess.Popen(local_prometheus.command(settings, paths), cwd=local_prometheus.prometheus_dir(paths),
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{settings.host}:{port}"
    try:
        wait_for("ready", lambda: proc.poll() is None and local_prometheus.ready(url))
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _archive(stack, root: Path, version: str) -> Path:
    """A tiny exported model (4 features, 3 classes; the seed is the version) archived with our handler."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(int(version))
    model = torch.nn.Linear(4, 3).eval()
    program = torch.export.export(model, (torch.randn(2, 4),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    torch.export.save(program, root / "model.pt2")
    ServingMeta(model_name=MODEL, model_version=version, format="torch_export", model_file="model.pt2",
                n_features=4).save(root / META_FILE)
    return build_mar(root / "model.pt2", [root / META_FILE], model=MODEL, version=version,
                     model_store=stack.paths.model_store).path


@pytest.fixture(scope="module")
def served(stack, tmp_path_factory: pytest.TempPathFactory) -> Services:
    """Both versions on TorchServe, split 50/50 by the router."""
    svc = Services(stack.settings)
    for version in VERSIONS:
        if not (stack.paths.model_store / archive_name(MODEL, version)).exists():
            _archive(stack, tmp_path_factory.mktemp(f"bundle{version}"), version)
        svc.backend.register(MODEL, version, stack.paths.model_store / archive_name(MODEL, version))
    svc.router.set_split(MODEL, VERSIONS[0], VERSIONS[1], 50)
    return svc


def _query(url: str, promql: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_window_matches_the_access_log(stack, served: Services, prometheus: str) -> None:
    rng = np.random.default_rng(0)
    start = time.time() - 1.0  # no request of MODEL before: its series are born inside the window
    answered: Counter[str] = Counter()
    with httpx.Client(base_url=stack.settings.router_url, timeout=30) as client:
        for _ in range(REQUESTS):  # 1 to 3 rows: all of them in the access log's prediction summary
            rows = rng.normal(0, 2, size=(int(rng.integers(1, 4)), 4)).round(3).tolist()
            resp = client.post(f"/predictions/{MODEL}", json={"inputs": rows})
            assert resp.status_code == 200, resp.text
            answered[resp.headers[VERSION_HEADER]] += 1
        pinned = {**served.router.pin_credentials(), VERSION_HEADER: VERSIONS[0]}
        for _ in range(5):  # the pipeline's own requests: in TorchServe's counter only
            assert client.post(f"/predictions/{MODEL}", json={"inputs": [[1, 2, 3, 4]]},
                               headers=pinned).status_code == 200
    served.backend.replay(MODEL, VERSIONS[1], [[1.0, 2.0, 3.0, 4.0]])  # the canary's replay: not counted either
    assert set(answered) == set(VERSIONS), answered

    source = PrometheusMetricsSource(prometheus)

    def scraped() -> bool:
        win = source.window(MODEL, start, time.time())
        return all(win.get(v).requests == answered[v] for v in VERSIONS)

    wait_for("scraped and recorded", scraped, timeout_s=20 * SCRAPE_S)
    end = time.time()  # after every request, and Prometheus has them all: no request straddles an edge
    log = AccessLogMetrics(stack.paths.router_access_log)
    wait_for("in the access log", lambda: all(
        log.window(MODEL, start, end).get(v).requests == answered[v] for v in VERSIONS))
    by_log, by_prometheus = log.window(MODEL, start, end), source.window(MODEL, start, end)

    for v in VERSIONS:
        lw, pw = by_log.get(v), by_prometheus.get(v)
        assert (pw.requests, pw.errors) == (lw.requests, lw.errors) == (answered[v], 0)
        assert pw.classes == lw.classes and sum(pw.classes.values()) >= answered[v]
        assert len(pw.latencies_ms) == len(lw.latencies_ms)
        # The handler's time is part of nginx's upstream time (ms resolution); a rebuilt sample is within 12 %
        # of its true value: each percentile is at most the router's, give or take those.
        for q in (50, 95):
            p_prom, p_log = np.percentile(pw.latencies_ms, q), np.percentile(lw.latencies_ms, q)
            assert 0 < p_prom <= (p_log + 1.0) * 1.12, (v, q, p_prom, p_log)

    # The contract's series, with exactly its labels (plus the scrape's instance and job)
    for name, extra in ((prom.BUCKET_METRIC, {"le"}), (prom.COUNT_METRIC, set()), (prom.SUM_METRIC, set()),
                        (prom.PREDICTIONS_METRIC, {"class"}), (prom.REQUESTS_METRIC, set())):
        found = _query(prometheus, f'{name}{{model_name="{MODEL}"}}')
        assert found, name
        assert {frozenset(s["metric"]) for s in found} == {
            frozenset({"__name__", "model_name", "model_version", "instance", "job"} | extra)}, name
    counts = {s["metric"]["model_version"]: float(s["value"][1])
              for s in _query(prometheus, f'{prom.COUNT_METRIC}{{model_name="{MODEL}"}}')}
    assert counts == {v: float(answered[v]) for v in VERSIONS}
    # TorchServe's own counter has the pinned and replayed requests too
    total = {s["metric"]["model_version"]: float(s["value"][1])
             for s in _query(prometheus, f'{prom.REQUESTS_METRIC}{{model_name="{MODEL}"}}')}
    assert total == {VERSIONS[0]: answered[VERSIONS[0]] + 5.0, VERSIONS[1]: answered[VERSIONS[1]] + 1.0}
    # what a dashboard does with the buckets (over all time here: a rate would need two scrapes of the traffic)
    quantile = _query(prometheus, "histogram_quantile(0.95, sum by (le, model_version) "
                                  f'({prom.BUCKET_METRIC}{{model_name="{MODEL}"}}))')
    p95 = {s["metric"]["model_version"]: float(s["value"][1]) for s in quantile}
    assert set(p95) == set(VERSIONS) and all(0 < value < 10_000 for value in p95.values()), p95
