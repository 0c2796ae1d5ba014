"""Router log rotation on the real nginx under steady client traffic: no request line lost or doubled, the files
stay owner-only, and the readers (metrics windows, the feedback endpoint's answer index) see every request across
the rotated files.

The recording stand-in for TorchServe and the helpers come from test_router_nginx.py. The state dir is made like
the stack's (0700 directories); as root, nginx's workers run as nobody and cannot open anything in it.
"""

from __future__ import annotations

import itertools
import json
import os
import pwd
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_router_nginx import Upstream, make_router, request, running_nginx
from test_router_nginx import upstream as upstream  # noqa: PLC0414 - the module's stand-in fixture, reused

from deployments import access_log
from deployments.feedback import AnswerIndex
from deployments.metrics import FLUSH_DELAY_S, AccessLogMetrics
from deployments.router import NginxRouter, _children

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(90),
]


@pytest.fixture
def router(upstream: Upstream, tmp_path: Path) -> Iterator[NginxRouter]:
    r = make_router(tmp_path / "state", upstream.server_address[1])
    r.paths.ensure()  # 0700, as `canaryflow up` makes it
    r.apply({"iris": {"stable": "1"}})
    with running_nginx(r):
        yield r


def chain(router: NginxRouter) -> list[Path]:
    """access.log and its rotated files, newest first."""
    log = router.paths.router_access_log
    return [access_log.rotated_path(log, i) for i in [0, *access_log.rotated_indices(log)]]


def logged_ids(router: NginxRouter) -> Counter[str]:
    """Request ids over the whole chain, with how often each was logged."""
    found: Counter[str] = Counter()
    for path in chain(router):
        found.update(json.loads(line)["request_id"] for line in path.read_text().splitlines() if line)
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_rotation_under_traffic_loses_and_doubles_no_line(router: NginxRouter) -> None:
    answered: list[str] = []
    failures: list[str] = []
    stop = threading.Event()
    counter = itertools.count()
    index = AnswerIndex(router.paths.router_access_log)

    def client(name: int) -> None:
        while not stop.is_set():
            rid = f"rot-{name}-{next(counter)}"
            try:
                status, headers, _ = request(router, "POST", "/predictions/iris", {"X-Request-ID": rid})
            except Exception as exc:  # every failure counts, whatever its kind
                failures.append(f"{rid}: {exc!r}")
                continue
            if status == 200 and headers["X-Request-ID"] == rid:
                answered.append(rid)
            else:
                failures.append(f"{rid}: {status}")

    # Something in the error log too, so that it is rotated alongside (nginx only writes warnings there).
    with open(router.error_log, "a") as fh:
        fh.write("2027/01/15 08:00:00 [warn] 1#1: written by the test before the rotation\n")
    dirs = {p: mode(p) for p in (router.paths.root, router.paths.router_dir)}
    started = time.time()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    rotations, rotated_at = [], []
    try:
        time.sleep(1.0)
        for _ in range(2):  # two rotations under traffic: the second shifts .1 (maybe still written) to .2
            index.refresh()
            rotated_at.append(time.time())
            rotations.append(router.rotate_logs(0, 3))
            time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    ended = time.time()
    assert rotations == [True, True] and failures == []
    assert len(answered) > 50, len(answered)  # the stdlib stand-in on 2 shared cores: ~100 req/s

    # nginx writes its buffers every second; the old workers of each reload flush theirs when they exit.
    deadline = time.monotonic() + 15
    while not set(answered) <= set(logged_ids(router)) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(max(0.0, ended + FLUSH_DELAY_S - time.time()))
    logged = logged_ids(router)
    per_file = {p.name: len(p.read_text().splitlines()) for p in chain(router)}
    lost = [rid for rid in answered if rid not in logged]
    doubled = {rid: n for rid, n in logged.items() if n > 1}
    # lines the old workers of a reload wrote into the renamed file after the rename (in-flight requests)
    late = [sum(json.loads(x)["ts"] > at for x in path.read_text().splitlines())
            for path, at in zip(chain(router)[:0:-1], rotated_at, strict=True)]
    print(f"\nrotation under traffic: {len(answered)} answered, {len(lost)} lost, {len(doubled)} doubled, "
          f"lines per file {per_file}, lines logged to the renamed file after each rename {late}")
    assert lost == [] and doubled == {} and set(logged) == set(answered)
    assert set(per_file) == {"access.log", "access.log.1", "access.log.2"}
    assert all(n > 0 for n in per_file.values()), per_file  # traffic landed in each generation

    # Owner-only files, owned by the stack's user (not chowned to the workers' user), the state dir untouched;
    # the workers (nobody when root) still write to the new files through what the master opened.
    rotated_error = access_log.rotated_path(router.error_log, 1)  # once: empty since, not rotated again
    assert not access_log.rotated_path(router.error_log, 2).exists()
    for path in [*chain(router), router.error_log, rotated_error]:
        assert mode(path) == 0o600, path
        assert path.stat().st_uid == os.geteuid(), path
    assert {p: mode(p) for p in dirs} == dirs
    assert "written by the test" in rotated_error.read_text()
    nginx_errors = (router.error_log.read_text() + rotated_error.read_text()).replace("written by the test", "")
    assert "[emerg]" not in nginx_errors and "[alert]" not in nginx_errors and "[crit]" not in nginx_errors
    expected_uid = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.getuid()
    workers = _children(router.running_pid())
    assert workers and all(os.stat(f"/proc/{w}").st_uid == expected_uid for w in workers)

    # The readers: a window spanning both rotations counts every request once; the answer index knows them all.
    win = AccessLogMetrics(router.paths.router_access_log).window("iris", started - 1, ended + 1)
    assert (win.get("1").requests, win.lines, win.bad_lines) == (len(answered), len(answered), 0)
    index.refresh()
    assert [rid for rid in answered if index.get(rid) is None] == []


def test_a_rotation_waits_for_a_route_change_and_the_router_keeps_serving(router: NginxRouter) -> None:
    """rotate_logs and apply share the router's lock: a rotation asked for during a route change's reload runs
    before or after it, never inside it; both take effect."""
    request(router, "POST", "/predictions/iris", {"X-Request-ID": "before"})
    deadline = time.monotonic() + 5
    while "before" not in logged_ids(router) and time.monotonic() < deadline:
        time.sleep(0.2)
    done: list[bool] = []
    change = threading.Thread(target=router.set_route, args=("iris", "2"))
    change.start()
    rotate = threading.Thread(target=lambda: done.append(router.rotate_logs(0, 3)))
    rotate.start()
    change.join(30)
    rotate.join(30)
    assert done == [True]
    # For ~100 ms after a reload its old workers may still accept a request and log it to the renamed file.
    time.sleep(0.5)
    status, headers, _ = request(router, "POST", "/predictions/iris", {"X-Request-ID": "after"})
    assert status == 200 and headers["X-Model-Version"] == "2"
    deadline = time.monotonic() + 5
    while "after" not in logged_ids(router) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert logged_ids(router) == Counter({"before": 1, "after": 1})
    assert "after" in router.paths.router_access_log.read_text()
