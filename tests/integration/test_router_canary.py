"""Canary routing on the real nginx: weighted split, sticky users, shadow copies, pins, route changes under load.

The recording stand-in for TorchServe and the helpers come from test_router_nginx.py. Tolerances are statistical
(binomial, 4 sigma), never timing-based: the suite shares 2 cores.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_router_nginx import (
    Upstream,
    default_prediction,
    log_records,
    make_router,
    pin,
    request,
    running_nginx,
)

from canaryflow.core.errors import ServingError
from deployments.metrics import AccessLogMetrics
from deployments.router import SHADOW_TIMEOUT_S, SHADOW_URI, NginxRouter

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
]
STABLE, CANARY = "1", "2"


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
    r = make_router(tmp_path_factory.mktemp("canary-router"), upstream.server_address[1])
    r.apply({"iris": {"stable": STABLE}})
    with running_nginx(r):
        yield r


@pytest.fixture
def seen(upstream: Upstream) -> Iterator[list[dict]]:
    with upstream.lock:
        upstream.seen.clear()
    upstream.predict = default_prediction
    yield upstream.seen
    upstream.predict = default_prediction


def version_of(router: NginxRouter, headers: dict[str, str] | None = None, model: str = "iris",
               body: bytes = b'{"inputs": [[1, 2, 3, 4]]}') -> str:
    status, resp_headers, payload = request(router, "POST", f"/predictions/{model}", headers, body)
    assert status == 200, payload
    return resp_headers["X-Model-Version"]


def within_binomial(hits: int, n: int, percent: float, sigmas: float = 4.0) -> bool:
    p = percent / 100
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_every_kind_of_route_is_taken_by_nginx_and_routed(upstream: Upstream, tmp_path: Path) -> None:
    r = make_router(tmp_path / "state", upstream.server_address[1])
    routes = {"iris": {"stable": "1", "canary": "2", "weight": 0.01}, "wine.v2": {"stable": "a.1", "canary": "b-2",
              "weight": 99.99}, "full": {"stable": "1", "canary": "2", "weight": 100},
              "shadow_a": {"stable": "1", "canary": "2", "shadow": True},
              "shadow.b": {"stable": "3", "canary": "4", "weight": 10, "shadow": True}, "plain": {"stable": "7"}}
    r.apply({"plain": {"stable": "7"}})  # real `nginx -t` accepted the config
    with running_nginx(r):
        r.apply(routes)  # the admin socket's Lua parser took the table
        assert r.live_table() == r.table_file.read_text() and not r.credentials_stale()
        assert version_of(r, model="full") == "2" and version_of(r, model="plain") == "7"
        assert version_of(r, model="shadow_a") == "1" and version_of(r, model="shadow.b") == "3"
    with running_nginx(r):  # a restarted nginx routes from the file
        assert r.live_table() == r.table_file.read_text()
        assert version_of(r, model="full") == "2"


def test_the_admin_socket_refuses_a_broken_table_and_keeps_the_live_one(router: NginxRouter) -> None:
    live = router.live_table()
    for text in ["", "gen 0123\nroute iris 1 - 20000 0\n", "gen 0123\nroute ../x 1 - 0 0\n",
                 "gen 0123\nauth a b\n", "route iris 1 - 0 0\n"]:
        with pytest.raises(ServingError, match="refused the route table"):
            router.admin.put(text)
    assert router.live_table() == live
    assert version_of(router) == STABLE


@pytest.mark.parametrize("weight", [5, 25, 50])
def test_observed_split_matches_the_weight(router: NginxRouter, seen: list[dict], weight: float) -> None:
    router.set_split("iris", STABLE, CANARY, weight)
    n = 3000
    started = math.floor(time.time() * 1000) / 1000  # the log's ts is nginx's $msec: a first request in this ms
    counts = Counter(version_of(router) for _ in range(n))
    assert set(counts) <= {STABLE, CANARY}
    assert within_binomial(counts[CANARY], n, weight), f"{counts[CANARY]} of {n} on the canary at {weight} %"
    # The access log tells the same story, per version, for the canary analysis.
    source = AccessLogMetrics(router.paths.router_access_log)
    deadline = time.monotonic() + 5
    while (win := source.window("iris", started, time.time() + 1)).get(STABLE).requests + win.get(
            CANARY).requests < n and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (win.get(STABLE).requests, win.get(CANARY).requests) == (counts[STABLE], counts[CANARY])
    assert win.get(CANARY).classes == {"0": counts[CANARY]} and win.get(CANARY).errors == 0
    assert win.get(CANARY).shadow_requests == win.get(STABLE).shadow_requests == 0  # no copies without shadow


def test_sticky_users_keep_their_version_across_requests_reloads_and_a_growing_weight(
        router: NginxRouter, seen: list[dict]) -> None:
    users = [f"user-{i}" for i in range(200)]

    def assignment(rounds: int) -> dict[str, str]:
        found: dict[str, set[str]] = {u: set() for u in users}
        for _ in range(rounds):
            for u in users:
                found[u].add(version_of(router, {"X-User-Id": u}))
        switched = {u: v for u, v in found.items() if len(v) > 1}
        assert not switched, f"users switched version: {switched}"
        return {u: v.pop() for u, v in found.items()}

    router.set_split("iris", STABLE, CANARY, 25)
    at_25 = assignment(rounds=3)
    assert within_binomial(sum(v == CANARY for v in at_25.values()), len(users), 25)
    router.set_route("other", "9")  # another route change at the same weight
    assert assignment(rounds=1) == at_25
    os.kill(router.running_pid(), signal.SIGHUP)  # and a reload: nginx loads the same table from its file
    assert assignment(rounds=1) == at_25
    router.set_split("iris", STABLE, CANARY, 50)
    at_50 = assignment(rounds=2)
    moved = Counter((at_25[u], at_50[u]) for u in users)
    assert moved[(CANARY, STABLE)] == 0, "a growing weight moved users from the canary back to stable"
    assert moved[(STABLE, CANARY)] > 0 and within_binomial(sum(v == CANARY for v in at_50.values()), len(users), 50)
    # The same user id on another model is assigned independently (the key is "<model>:<user>").
    router.set_split("wine", STABLE, CANARY, 50)
    on_wine = {u: version_of(router, {"X-User-Id": u}, model="wine") for u in users}
    assert on_wine != at_50
    router.remove_route("wine")
    router.remove_route("other")


def test_a_candidate_too_slow_for_its_copies_never_stalls_a_client(router: NginxRouter, upstream: Upstream,
                                                                   seen: list[dict]) -> None:
    """nginx keeps a client's request open until its shadow copy is answered: a candidate that hangs gets
    SHADOW_TIMEOUT_S, then its copy is a 504 shadow line (a shadow error), and the clients were answered at once."""
    router.set_split("iris", STABLE, CANARY, 0, shadow=True)
    upstream.predict = lambda version, body: time.sleep(SHADOW_TIMEOUT_S + 3) or "0:0.900" if version == CANARY \
        else "0:0.900"
    rid = f"slow-shadow-{time.time()}"
    started = time.monotonic()
    assert version_of(router, {"X-Request-ID": rid}) == STABLE
    assert time.monotonic() - started < SHADOW_TIMEOUT_S  # answered by the champion, not held for the copy
    records = log_records(router, lambda recs: any(r["request_id"] == rid and r["shadow"] for r in recs),
                          timeout_s=SHADOW_TIMEOUT_S + 10)
    [copy] = [r for r in records if r["request_id"] == rid and r["shadow"] == 1]
    assert (copy["status"], copy["version"]) == (504, CANARY), copy
    assert SHADOW_TIMEOUT_S <= copy["request_time"] < SHADOW_TIMEOUT_S + 3


def test_shadow_copies_reach_the_canary_and_pair_in_the_log(router: NginxRouter, upstream: Upstream,
                                                            seen: list[dict]) -> None:
    router.set_split("iris", STABLE, CANARY, 0, shadow=True)
    # The canary disagrees on every fourth request.
    upstream.predict = lambda version, body: (
        "1:0.700" if version == CANARY and json.loads(body)["inputs"][0][0] % 4 == 0 else "0:0.900")
    started = time.time()
    n = 40
    ids = [f"shadow-{started}-{i}" for i in range(n)]
    for i, rid in enumerate(ids):
        body = json.dumps({"inputs": [[i, 2, 3, 4]]}).encode()
        assert version_of(router, {"X-Request-ID": rid, "X-User-Id": f"u{i}"}, body=body) == STABLE
    records = log_records(router, lambda recs: sum(r["request_id"] in ids for r in recs) >= 2 * n)
    deadline = time.monotonic() + 5  # the background copies may still be on their way
    while len(seen) < 2 * n and time.monotonic() < deadline:
        time.sleep(0.05)
    with_copy = {s["headers"]["X-Request-ID"]: s for s in seen if s["path"] == f"/predictions/iris/{CANARY}"}
    client = {s["headers"]["X-Request-ID"]: s for s in seen if s["path"] == f"/predictions/iris/{STABLE}"}
    assert set(with_copy) == set(client) == set(ids)
    for rid in ids:  # the same request, body and id; a copy is live traffic, not pinned
        assert with_copy[rid]["body"] == client[rid]["body"]
        assert "X-Canaryflow-Pinned" not in with_copy[rid]["headers"]
        assert with_copy[rid]["headers"]["Authorization"] == client[rid]["headers"]["Authorization"]

    mine = [r for r in records if r["request_id"] in ids]
    shadow_lines = [r for r in mine if r["shadow"] == 1]
    client_lines = [r for r in mine if r["shadow"] == 0]
    assert len(shadow_lines) == len(client_lines) == n
    assert {(r["version"], r["upstream_version"], r["uri"], r["pinned"]) for r in shadow_lines} == {
        (CANARY, CANARY, SHADOW_URI, 0)}
    assert {(r["version"], r["uri"], r["model"]) for r in client_lines} == {(STABLE, "/predictions/iris", "iris")}
    assert {r["prediction"] for r in shadow_lines} == {"0:0.900", "1:0.700"}

    # from this test's start (to the ms: the log's ts is nginx's $msec), not a second before: the previous test's
    # requests to "iris" end just before it
    win = AccessLogMetrics(router.paths.router_access_log).window("iris", math.floor(started * 1000) / 1000,
                                                                  time.time() + 1)
    disagree = sum(i % 4 == 0 for i in range(n))
    assert (win.shadow_pairs, win.shadow_agreements) == (n, n - disagree)
    assert win.get(CANARY).shadow_requests == n and win.get(CANARY).requests == 0
    assert win.get(CANARY).classes == {"0": n - disagree, "1": disagree}
    router.clear_canary("iris")


def test_pin_beats_split_and_shadow(router: NginxRouter, upstream: Upstream, seen: list[dict]) -> None:
    router.set_split("iris", STABLE, CANARY, 100)
    started = time.time()
    assert {version_of(router) for _ in range(5)} == {CANARY}
    assert version_of(router, pin(router, STABLE)) == STABLE
    assert version_of(router, {**pin(router, "7"), "X-User-Id": "u1"}) == "7"
    router.set_split("iris", STABLE, CANARY, 0, shadow=True)
    with upstream.lock:
        seen.clear()
    rid = f"pinned-{started}"
    assert version_of(router, {**pin(router, "7"), "X-Request-ID": rid}) == "7"
    assert version_of(router, pin(router, CANARY)) == CANARY
    time.sleep(0.3)  # a copy, if one were made, is a background subrequest
    assert [s["path"] for s in seen] == ["/predictions/iris/7", f"/predictions/iris/{CANARY}"]
    assert all(s["headers"]["X-Canaryflow-Pinned"] == "1" for s in seen)
    records = log_records(router, lambda recs: any(r["request_id"] == rid for r in recs))
    assert [(r["version"], r["pinned"], r["shadow"]) for r in records if r["request_id"] == rid] == [("7", 1, 0)]
    # from this test's start (to the ms: the log's ts is nginx's $msec), not a second before: the previous test's
    # requests to "iris" end just before it
    win = AccessLogMetrics(router.paths.router_access_log).window("iris", math.floor(started * 1000) / 1000,
                                                                  time.time() + 1)
    # Pinned lines are the pipeline's own tests, not canary evidence: only the 5 unpinned requests count.
    assert {v: w.requests for v, w in win.versions.items()} == {CANARY: 5}
    router.clear_canary("iris")


def test_weight_changes_under_load_lose_no_request(router: NginxRouter, seen: list[dict]) -> None:
    results: list[tuple[int, str]] = []
    failures: list[str] = []
    sockets: set[int] = set()
    stop = threading.Event()

    def client(k: int) -> None:
        # One keep-alive connection per client, as real clients pool them. A reload would reset requests sent on
        # idle keep-alive connections (FACTS.md) and this test would fail: route changes are reload-free.
        conn = http.client.HTTPConnection("127.0.0.1", router.settings.ports.router, timeout=10)
        i = 0
        while not stop.is_set():
            headers = {"X-User-Id": f"load-{k}-{i % 50}"} if k % 2 else {}
            i += 1
            try:
                conn.request("POST", "/predictions/iris", body=b'{"inputs": [[1, 2, 3, 4]]}', headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except Exception as exc:  # every failure counts, whatever its kind
                failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                continue
            if resp.status != 200:
                failures.append(f"HTTP {resp.status}: {body[:200]!r}")
            results.append((resp.status, resp.headers.get("X-Model-Version", "")))
            sockets.add(id(conn.sock))  # None after "Connection: close": keep-alive would be off
        conn.close()

    weights = [5, 25, 50, 75, 10, 0.5, 99.5, 33.33, 60, 15] * 2 + [40, 20]
    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        started = time.monotonic()
        for step, weight in enumerate(weights):
            if step == 10:
                router.set_split("iris", STABLE, CANARY, weight, shadow=True)  # shadow on and off under load too
            else:
                router.set_split("iris", STABLE, CANARY, weight)
        while time.monotonic() - started < 10:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        router.clear_canary("iris")
    assert failures == []
    assert len(sockets) == len(threads) and id(None) not in sockets  # each client kept its one connection
    assert len(weights) >= 20 and len(results) > 200
    assert {v for _, v in results} == {STABLE, CANARY}


def test_a_version_with_a_batched_twin_gets_it_only_while_another_request_is_in_flight(
        router: NginxRouter, upstream: Upstream, seen: list[dict]) -> None:
    """Adaptive batching (route table `batched` lines): a lone request goes to the version's own registration, one
    that arrives while another request for the version is in flight to the batched twin; every request is counted
    out when it ends, a refused one included, so a lone request after them goes to the version again. The access
    log keeps the model and version (the twin is TorchServe's business). Deterministic: the first request is held
    in the stand-in until the second was answered."""
    release = threading.Event()

    def predict(version: str, body: bytes) -> str:
        if b'"hold"' in body:
            release.wait(20)
        return default_prediction(version, body)

    router.batched_provider = lambda: [("iris", STABLE, "iris..batched")]
    router.apply({"iris": {"stable": STABLE}})
    upstream.predict = predict
    held = threading.Thread(target=version_of, args=(router,),
                            kwargs={"body": b'{"inputs": [[1, 2, 3, 4]], "hold": 1}'})
    try:
        assert version_of(router) == STABLE
        held.start()
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:  # the held request reached the stand-in
            time.sleep(0.01)
        assert len(seen) == 2
        rid = f"overlapping-{time.time()}"
        assert version_of(router, {"X-Request-ID": rid}) == STABLE
        assert version_of(router, pin(router, STABLE)) == STABLE  # pinned requests too: the load test measures it
        assert request(router, "POST", "/predictions/iris", {"X-Model-Version": STABLE})[0] == 403  # no pin key
        release.set()
        held.join(10)
        assert version_of(router) == STABLE
        assert version_of(router, pin(router, STABLE)) == STABLE
    finally:
        release.set()
        router.batched_provider = lambda: ()
        router.apply({"iris": {"stable": STABLE}})
    assert [s["path"] for s in seen] == ["/predictions/iris/1", "/predictions/iris/1", "/predictions/iris..batched/1",
                                         "/predictions/iris..batched/1", "/predictions/iris/1",
                                         "/predictions/iris/1"]
    records = log_records(router, lambda recs: any(r["request_id"] == rid for r in recs))
    assert [(r["model"], r["version"], r["status"]) for r in records if r["request_id"] == rid] == [
        ("iris", STABLE, 200)]
    assert version_of(router) == STABLE and seen[-1]["path"] == "/predictions/iris/1"  # no twin: as before


def test_shadow_copies_go_to_the_canarys_batched_twin_while_another_copy_is_in_flight(
        router: NginxRouter, upstream: Upstream, seen: list[dict]) -> None:
    """In shadow mode the canary gets a copy of every request: copies are routed adaptively too, counted under
    their own variable (a copy is a subrequest sharing its request's variables), and counted out when answered."""
    release = threading.Event()

    def predict(version: str, body: bytes) -> str:
        if version == CANARY and b'"hold"' in body:
            release.wait(20)
        return default_prediction(version, body)

    def wait_seen(n: int) -> None:
        deadline = time.monotonic() + 10
        while len(seen) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(seen) >= n, seen

    def copies_logged(*rids: str) -> None:
        """Each request's copy has had its log phase (which counts it out): its access-log line is written then."""
        records = log_records(router, lambda recs: {r["request_id"] for r in recs if r["shadow"] == 1} >= set(rids))
        assert {r["request_id"] for r in records if r["shadow"] == 1} >= set(rids)

    router.batched_provider = lambda: [("iris", CANARY, "iris..batched")]
    router.set_split("iris", STABLE, CANARY, 0, shadow=True)
    upstream.predict = predict
    started = time.time()
    rid_a, rid_b = f"copy-a-{started}", f"copy-b-{started}"
    held = threading.Thread(target=version_of, args=(router, {"X-Request-ID": rid_a}),
                            kwargs={"body": b'{"inputs": [[1, 2, 3, 4]], "hold": 1}'})
    try:
        held.start()
        wait_seen(2)  # the request, answered by stable, and its copy, held by the canary
        assert version_of(router, {"X-Request-ID": rid_b}) == STABLE
        wait_seen(4)
        release.set()
        held.join(10)
        # a copy ends after its request was answered: wait for both copies' log phase, not for the clients
        copies_logged(rid_a, rid_b)
        assert version_of(router) == STABLE
        wait_seen(6)
    finally:
        release.set()
        router.batched_provider = lambda: ()
        router.apply({"iris": {"stable": STABLE}})
    copies = [s["path"] for s in seen if s["path"].endswith(f"/{CANARY}")]
    assert copies == ["/predictions/iris/2", "/predictions/iris..batched/2", "/predictions/iris/2"]
    assert [s["path"] for s in seen if s["path"].endswith(f"/{STABLE}")] == ["/predictions/iris/1"] * 3
