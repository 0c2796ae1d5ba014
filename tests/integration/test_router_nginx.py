"""The real nginx router, rendered by NginxRouter, in front of a recording stand-in for TorchServe.

The stand-in only observes what nginx sends upstream; the full-stack tests use real TorchServe. The canary tests
(test_router_canary.py) import the stand-in and helpers from here.
"""

from __future__ import annotations

import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from canaryflow.core.paths import StatePaths
from canaryflow.core.settings import Ports, Settings
from deployments.router import NginxRouter

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
]
TOKEN = "router-key-1"
TORCHSERVE_400 = {"code": 400, "type": "InvalidInput", "message": "expected 4 features, got 3"}
ROUTES = {"iris": {"stable": "1"}, "broken": {"stable": "1"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_prediction(version: str, body: bytes) -> str:
    return "0:0.900"


class Upstream(ThreadingHTTPServer):
    """Records every request; answers like TorchServe, with the version in X-Model-Version and a prediction
    summary in X-Prediction (``predict(version, body)``, settable by a test)."""

    daemon_threads = True
    # TorchServe's (Netty's) accept backlog is large; socketserver's default of 5 drops connection attempts under
    # a burst (each nginx reload opens new upstream connections), and a dropped SYN costs a 1 s retransmit.
    request_queue_size = 256

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[dict] = []
        self.lock = threading.Lock()
        self.predict: Callable[[str, bytes], str] = default_prediction


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # nginx keeps upstream connections alive
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stall

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        server: Upstream = self.server  # type: ignore[assignment]
        with server.lock:
            server.seen.append({"path": self.path, "headers": dict(self.headers.items()), "body": body})
        parts = self.path.strip("/").split("/")
        if parts[1] == "broken":
            self._send(400, TORCHSERVE_400, "1")
        else:
            prediction = server.predict(parts[2], body)
            answers = [0] * (300_000 if parts[2] == "big" else 1)  # version "big" answers ~900 KB
            self._send(200, {"model": parts[1], "version": parts[2], "predictions": answers}, parts[2], prediction)

    def _send(self, status: int, payload: dict, version: str, prediction: str = "") -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Model-Version", version)
        if prediction:
            self.send_header("X-Prediction", prediction)
        self.send_header("x-request-id", "torchserve-own-id")  # TorchServe sends one; the router's wins
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def request(router: NginxRouter, method: str, path: str, headers: dict[str, str] | None = None,
            body: bytes = b'{"inputs": [[1, 2, 3, 4]]}') -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", router.settings.ports.router, timeout=10)
    try:
        conn.request(method, path, body=body if method == "POST" else None, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def make_router(root: Path, inference_port: int) -> NginxRouter:
    settings = Settings(state_dir=root, ports=Ports(router=free_port(), torchserve_inference=inference_port))
    return NginxRouter(settings, StatePaths(root), lambda: TOKEN)


def log_records(router: NginxRouter, done: Callable[[list[dict]], bool], timeout_s: float = 5.0) -> list[dict]:
    """The access log's records once ``done(records)``; nginx writes its buffer every second."""
    deadline = time.monotonic() + timeout_s
    while True:
        path = router.paths.router_access_log
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if done(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


@contextmanager
def running_nginx(router: NginxRouter) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(router.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if request(router, "GET", "/ping")[0] == 200 and router.running_pid() == proc.pid:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"nginx did not start: {err}")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def router(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxRouter]:
    r = make_router(tmp_path_factory.mktemp("router-state"), upstream.server_address[1])
    r.apply(ROUTES)
    with running_nginx(r):
        yield r


@pytest.fixture
def seen(upstream: Upstream) -> list[dict]:
    with upstream.lock:
        upstream.seen.clear()
    return upstream.seen


def _status_field(pid: int, key: str) -> str:
    """A field of /proc/<pid>/status ("" for a process that is gone by now)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split()[1] for line in lines if line.startswith(key + ":")), "")


def test_workers_drop_root_and_large_bodies_never_touch_the_disk(router: NginxRouter, seen: list[dict]) -> None:
    """Started as root, the workers that talk to clients run as nobody (the master keeps root for the logs); they
    cannot reach the 0700 state dir, so request and response bodies of megabytes must stay in memory."""
    master = router.running_pid()
    workers = [int(p.name) for p in Path("/proc").iterdir()
               if p.name.isdigit() and _status_field(int(p.name), "PPid") == str(master)]
    assert workers and _status_field(master, "Uid") == str(os.geteuid())
    expected = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.getuid()
    assert {_status_field(w, "Uid") for w in workers} == {str(expected)}
    big = json.dumps({"inputs": [[1.5, 2.5, 3.5, 4.5]] * 150_000}).encode()  # 3.4 MB: above any memory buffer
    status, _, _ = request(router, "POST", "/predictions/iris", body=big)
    assert status == 200 and seen[-1]["body"] == big
    status, _, body = request(router, "POST", "/predictions/iris", pin(router, "big"))
    assert status == 200 and len(json.loads(body)["predictions"]) == 300_000


def test_ping_is_answered_by_the_router(router: NginxRouter, seen: list[dict]) -> None:
    status, headers, body = request(router, "GET", "/ping")
    assert status == 200 and json.loads(body)["status"] == "Healthy"
    assert headers["Content-Type"] == "application/json"
    assert seen == []


def test_prediction_goes_to_the_stable_version(router: NginxRouter, seen: list[dict]) -> None:
    status, headers, body = request(router, "POST", "/predictions/iris")
    assert status == 200, body
    assert json.loads(body)["version"] == "1" and headers["X-Model-Version"] == "1"
    assert [s["path"] for s in seen] == ["/predictions/iris/1"]
    assert seen[0]["body"] == b'{"inputs": [[1, 2, 3, 4]]}'


def pin(router: NginxRouter, version: str) -> dict[str, str]:
    """The headers of a pipeline request pinned to ``version``."""
    return {"X-Model-Version": version, **router.pin_credentials()}


def test_version_pin_header(router: NginxRouter, seen: list[dict]) -> None:
    status, headers, _ = request(router, "POST", "/predictions/iris", pin(router, "7"))
    assert status == 200 and headers["X-Model-Version"] == "7"
    assert [s["path"] for s in seen] == ["/predictions/iris/7"]
    assert "X-Model-Version" not in seen[0]["headers"] and "X-Canaryflow-Pin-Key" not in seen[0]["headers"]


@pytest.mark.parametrize("key", [None, "", "not-the-key"], ids=["no-key", "empty-key", "wrong-key"])
def test_a_pin_from_outside_the_pipeline_is_403(router: NginxRouter, seen: list[dict], key: str | None) -> None:
    """Only the pipeline pins: a client cannot reach a staged, never-promoted version (or the calibration
    model), nor mark its requests pinned so the canary analysis leaves them out."""
    headers = {"X-Model-Version": "7"} | ({} if key is None else {"X-Canaryflow-Pin-Key": key})
    for path in ("/predictions/iris", "/predictions/wine"):
        status, _, body = request(router, "POST", path, headers)
        assert status == 403 and json.loads(body)["type"] == "PinRefused", body
    assert seen == []
    status, _, _ = request(router, "POST", "/predictions/iris", {"X-Canaryflow-Pin-Key": "not-the-key"})
    assert status == 200 and seen[-1]["path"] == "/predictions/iris/1"  # unpinned: a key alone changes nothing


@pytest.mark.parametrize("pin", ["../models", "1;2", "a" * 33, "1 2"])
def test_invalid_pin_is_400(router: NginxRouter, seen: list[dict], pin: str) -> None:
    status, _, body = request(router, "POST", "/predictions/iris", {"X-Model-Version": pin})
    assert status == 400
    assert json.loads(body)["type"] == "InvalidModelVersion"
    assert seen == []


def test_unrouted_model_is_404(router: NginxRouter, seen: list[dict]) -> None:
    for path in ("/predictions/wine", "/predictions/IRIS"):
        status, _, body = request(router, "POST", path)
        assert status == 404
        err = json.loads(body)
        assert err["code"] == 404 and err["type"] == "ModelNotRouted" and "iris" not in err["message"]
    assert seen == []


def test_pin_reaches_a_version_of_an_unrouted_model(router: NginxRouter, seen: list[dict]) -> None:
    # A staged candidate is smoke-tested through the router before the model has any route.
    status, _, _ = request(router, "POST", "/predictions/wine", pin(router, "7"))
    assert status == 200
    assert seen[-1]["path"] == "/predictions/wine/7"


def test_other_methods_are_405(router: NginxRouter, seen: list[dict]) -> None:
    for method in ("GET", "PUT", "DELETE"):
        status, headers, body = request(router, method, "/predictions/iris")
        assert status == 405 and json.loads(body)["type"] == "MethodNotAllowed"
        assert headers["Allow"] == "POST" and headers["X-Request-ID"]
    assert seen == []


@pytest.mark.parametrize("method,path", [
    ("GET", "/models"), ("POST", "/models?url=x.mar"), ("DELETE", "/models/iris/1"),
    ("GET", "/api-description"),
    ("GET", "/api/v1/x"), ("GET", "/metrics"), ("POST", "/predictions/iris/1"), ("POST", "/predictions/"),
    ("POST", "/predictions/../models"), ("POST", "/explanations/iris"), ("GET", "/"),
])
def test_everything_else_is_404(router: NginxRouter, seen: list[dict], method: str, path: str) -> None:
    status, _, body = request(router, method, path)
    assert status == 404 and json.loads(body)["type"] == "NotFound"
    assert seen == []


def test_describe_and_explain_headers_never_reach_torchserve(router: NginxRouter, seen: list[dict]) -> None:
    """TorchServe would answer them with the model's description or an explanation, not a prediction."""
    status, _, _ = request(router, "POST", "/predictions/iris", {"describe": "True", "Explain": "True"})
    assert status == 200 and len(seen) == 1
    assert not {k.lower() for k in seen[0]["headers"]} & {"describe", "explain"}


def test_router_replaces_the_authorization_header(router: NginxRouter, seen: list[dict]) -> None:
    request(router, "POST", "/predictions/iris", {"Authorization": "Bearer client-held-key"})
    request(router, "POST", "/predictions/iris")
    assert [s["headers"]["Authorization"] for s in seen] == [f"Bearer {TOKEN}"] * 2
    assert all("client-held-key" not in json.dumps(s["headers"]) for s in seen)


def test_request_id_is_generated_or_kept(router: NginxRouter, seen: list[dict]) -> None:
    _, headers, _ = request(router, "POST", "/predictions/iris")
    generated = headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert headers.get_all("X-Request-ID") == [generated]  # TorchServe's own id is hidden
    _, headers, _ = request(router, "POST", "/predictions/iris", {"X-Request-ID": "client-id-42"})
    assert headers["X-Request-ID"] == "client-id-42"
    assert [s["headers"]["X-Request-ID"] for s in seen] == [generated, "client-id-42"]
    _, headers, _ = request(router, "GET", "/nowhere", {"X-Request-ID": "client-id-43"})
    assert headers["X-Request-ID"] == "client-id-43"


def test_prediction_summary_is_logged_not_sent_to_clients(router: NginxRouter) -> None:
    status, headers, _ = request(router, "POST", "/predictions/iris")
    assert status == 200 and "X-Prediction" not in headers


def test_the_shadow_location_is_not_reachable_from_outside(router: NginxRouter, seen: list[dict]) -> None:
    status, headers, body = request(router, "POST", "/_canaryflow/shadow")
    assert status == 404 and json.loads(body)["type"] == "NotFound"
    assert seen == []


def test_torchserve_errors_pass_through(router: NginxRouter) -> None:
    status, headers, body = request(router, "POST", "/predictions/broken")
    assert status == 400
    assert json.loads(body) == TORCHSERVE_400
    assert headers["X-Request-ID"]


def test_access_log_line_per_request(router: NginxRouter) -> None:
    ids = {"log-ok": ("POST", "/predictions/iris", {}),
           "log-pin": ("POST", "/predictions/iris", pin(router, "5")),
           "log-404": ("POST", "/predictions/wine", {}),
           "log-405": ("GET", "/predictions/iris", {})}
    for rid, (method, path, headers) in ids.items():
        request(router, method, path, {"X-Request-ID": rid, **headers})
    before = time.time()
    records = log_records(router, lambda recs: ids.keys() <= {r["request_id"] for r in recs})
    lines = {r["request_id"]: r for r in records if r["request_id"] in ids}
    assert set(lines) == set(ids)
    fields = {"ts", "time", "request_id", "model", "version", "upstream_version", "status", "request_time",
              "upstream_time", "upstream_status", "method", "uri", "request_bytes", "body_bytes", "prediction",
              "pinned", "shadow"}
    assert all(set(r) == fields for r in lines.values())
    ok = lines["log-ok"]
    assert (ok["model"], ok["version"], ok["upstream_version"], ok["status"], ok["upstream_status"]) == (
        "iris", "1", "1", 200, "200")
    assert ok["method"] == "POST" and ok["uri"] == "/predictions/iris" and ok["body_bytes"] > 0
    assert isinstance(ok["request_time"], float) and float(ok["upstream_time"]) >= 0
    assert isinstance(ok["ts"], float) and before - 10 < ok["ts"] <= time.time()
    assert (ok["prediction"], ok["pinned"], ok["shadow"]) == ("0:0.900", 0, 0)
    assert (lines["log-pin"]["version"], lines["log-pin"]["upstream_version"]) == ("5", "5")
    assert lines["log-pin"]["pinned"] == 1
    missing = lines["log-404"]
    assert (missing["status"], missing["model"], missing["version"]) == (404, "wine", "")
    assert missing["upstream_status"] == "" and missing["upstream_time"] == ""
    assert lines["log-405"]["status"] == 405


def test_upstream_down_is_502_json(tmp_path: Path) -> None:
    r = make_router(tmp_path / "state", free_port())  # nothing listens on the inference port
    r.apply({"iris": {"stable": "1"}})
    with running_nginx(r):
        status, headers, body = request(r, "POST", "/predictions/iris")
    assert status == 502 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["type"] == "UpstreamUnavailable"


def test_a_request_answered_by_an_error_page_is_counted_out(tmp_path: Path) -> None:
    """Adaptive batching counts a request in flight until its log phase; a 502 ends in the @upstream_unavailable
    location, so the count is undone there (the server-level log phase): the next lone request goes to the
    version's own registration again, not to the batched twin. nginx's error log names the upstream URL."""
    r = make_router(tmp_path / "state", free_port())  # nothing listens on the inference port
    r.batched_provider = lambda: [("iris", "1", "iris..batched")]
    r.apply({"iris": {"stable": "1"}})
    with running_nginx(r):
        assert [request(r, "POST", "/predictions/iris")[0] for _ in range(3)] == [502, 502, 502]
    tried = re.findall(r'upstream: "http://[^/]+(/predictions/[^"]+)"', r.error_log.read_text())
    assert tried == ["/predictions/iris/1"] * 3
    assert "uninitialized" not in r.error_log.read_text()


def test_refresh_picks_up_a_new_key(router: NginxRouter, seen: list[dict]) -> None:
    router.token_provider = lambda: "router-key-2"
    try:
        router.refresh()
        request(router, "POST", "/predictions/iris")
        assert seen[-1]["headers"]["Authorization"] == "Bearer router-key-2"
    finally:
        router.token_provider = lambda: TOKEN
        router.refresh()


def test_route_change_under_load_loses_nothing(router: NginxRouter, seen: list[dict]) -> None:
    results: list[tuple[float, int, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                status, headers, _ = request(router, "POST", "/predictions/iris")
                results.append((started, status, headers.get("X-Model-Version", "")))
            except Exception as exc:  # every failure counts, whatever its kind
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        for version in ("2", "1", "2"):  # three reloads under load
            router.apply({**ROUTES, "iris": {"stable": version}})
            time.sleep(0.2)
        applied = time.monotonic() - 0.2
        time.sleep(0.4)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        router.apply(ROUTES)
    assert errors == []
    assert len(results) > 20  # ~100 req/s against the stdlib stand-in on 2 shared cores
    assert {status for _, status, _ in results} == {200}
    assert {v for _, _, v in results} == {"1", "2"}
    after = [v for started, _, v in results if started >= applied]
    assert after and set(after) == {"2"}


def test_a_thousand_slow_sockets_do_not_stop_a_normal_request(router: NginxRouter, seen: list[dict]) -> None:
    """Slowloris: 1,100 clients that never finish their headers. A normal request is still answered, and nginx
    drops the slow ones after client_header_timeout instead of holding them for its default 60 s."""
    import resource
    import socket

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1400:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    slow = []
    try:
        for _ in range(1100):
            sock = socket.create_connection(("127.0.0.1", router.settings.ports.router), timeout=10)
            sock.sendall(b"POST /predictions/iris HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
            slow.append(sock)
        status, _, body = request(router, "POST", "/predictions/iris")
        assert status == 200, body
        deadline = time.monotonic() + 60
        closed = 0
        for sock in slow:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                closed += sock.recv(1024) == b""  # nginx closes a client that is too slow with its headers
            except (TimeoutError, OSError):
                pass
        assert closed == len(slow)
    finally:
        for sock in slow:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
