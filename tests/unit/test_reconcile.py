"""Reconcile's liveness (stale heartbeats), newest-first without downgrades, the stale router key; the key watch's
recovery after a TorchServe restart. The shared fakes (tests/unit/fakes.py); no servers, no sleeps."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from fakes import FakeBackend, FakeLauncher, FakeRouter
from test_ramp_ops import NOW, info, released, services

from canaryflow.core.paths import StatePaths
from canaryflow.core.settings import CanarySettings, ReconcileSettings
from canaryflow.core.state import Tag
from canaryflow.local import keywatch
from canaryflow.release import ramp, reconcile, steps
from deployments.canary import start


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


def running(version: str, started: float, run_id: str = "run-a") -> dict:
    return {"id": run_id, "name": f"release-m-v{version}", "state_type": "RUNNING", "start_time": iso(started),
            "parameters": {"model_name": "m", "version": version}}


def half_way(tmp_path: Path, beat: float):  # noqa: ANN201 - svc with v2 at 25 % whose flow last beat at ``beat``
    svc = services(tmp_path, {"1": released("1"), "2": info("2", **{Tag.STATUS: "canary"})},
                   route={"stable": "1", "canary": "2", "weight": 25.0}, champion="1")
    svc.settings = svc.settings.model_copy(update={"reconcile": ReconcileSettings(stale_after_s=60)})
    ramp.save_status(svc, "m", replace(start("1", "2", CanarySettings(), NOW - 600), weight=25.0, heartbeat_at=beat))
    return svc


def test_a_run_with_a_fresh_heartbeat_is_left_alone(tmp_path: Path) -> None:
    svc = half_way(tmp_path, beat=NOW - 10)
    launcher = FakeLauncher(runs=[running("2", NOW - 600)])
    assert reconcile.reconcile(svc, launcher, now=NOW) == [] and launcher.crashed == [] == launcher.started


def test_a_silent_running_run_is_marked_crashed_and_resumed(tmp_path: Path) -> None:
    svc = half_way(tmp_path, beat=NOW - 120)
    launcher = FakeLauncher(runs=[running("2", NOW - 600)])
    actions = reconcile.reconcile(svc, launcher, now=NOW)
    assert [c[0] for c in launcher.crashed] == ["run-a"] and "no heartbeat" in launcher.crashed[0][1]
    assert "for 120 s (limit 60 s)" in launcher.crashed[0][1]
    assert [s[:2] for s in launcher.started] == [("m", "2")] and "canary at 25%" in actions[-1]
    assert svc.router.table["m"]["weight"] == 25.0  # the recorded split stays for the resumed run
    assert reconcile.reconcile(svc, launcher, now=NOW) == []  # the resumed run is alive


def test_a_silent_run_past_its_attempts_is_rolled_back(tmp_path: Path) -> None:
    svc = half_way(tmp_path, beat=0.0)
    svc.registry.set_tags("m", "2", {Tag.HEARTBEAT: f"{NOW - 90:.3f}"})  # the tag beats too: latest wins
    runs = [running("2", NOW - 900, "run-a")] + [dict(running("2", NOW - 900, f"run-{i}"), state_type="CRASHED")
                                                 for i in range(2)]
    launcher = FakeLauncher(runs=runs)
    actions = reconcile.reconcile(svc, launcher, now=NOW)
    assert [c[0] for c in launcher.crashed] == ["run-a"] and "for 90 s" in launcher.crashed[0][1]
    assert launcher.started == [] and "rolled back by reconcile" in actions[-1]
    assert svc.router.table["m"] == {"stable": "1"} and svc.registry.versions["2"].tags[Tag.STATUS] == "failed"


def test_a_heartbeat_from_the_future_proves_nothing(tmp_path: Path) -> None:
    svc = half_way(tmp_path, beat=NOW + 10**6)  # the tag is user-writable
    launcher = FakeLauncher(runs=[running("2", NOW - 600)])
    reconcile.reconcile(svc, launcher, now=NOW)
    assert [c[0] for c in launcher.crashed] == ["run-a"]


def test_versions_are_released_newest_first_and_never_below_the_champion(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": info("1"), "2": info("2"), "3": released("3"), "4": info("4"),
                              "10": info("10")}, route={"stable": "3"}, champion="3")
    launcher = FakeLauncher()
    actions = reconcile.reconcile(svc, launcher, now=NOW)
    assert [s[1] for s in launcher.started] == ["10", "4"]  # by number, not as text
    for v in ("2", "1"):
        tags = svc.registry.versions[v].tags
        assert tags[Tag.STATUS] == "skipped"
        assert tags[Tag.REASON] == f"older than champion v3; release it with canaryflow release m {v} --allow-older"
    assert [a.split(":")[0] for a in actions] == ["m v10", "m v4", "m v2", "m v1"]
    assert reconcile.reconcile(svc, launcher, now=NOW) == []
    assert steps.downgrade_reason("m", "3", "3") is None and steps.downgrade_reason("m", "2", None) is None


def test_a_router_holding_a_stale_key_is_re_rendered(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": released("1")}, champion="1")
    svc.backend.healthy = lambda: False
    svc.router.stale = True
    assert reconcile.reconcile(svc, FakeLauncher(), now=NOW) == [] and svc.router.refreshed == 0  # down: wait
    svc.backend.healthy = lambda: True
    actions = reconcile.reconcile(svc, FakeLauncher(), now=NOW)
    assert svc.router.refreshed == 1 and any("stale TorchServe inference key" in a for a in actions)
    assert reconcile.reconcile(svc, FakeLauncher(), now=NOW) == [] and svc.router.refreshed == 1


class Clock:
    """Fake monotonic clock advanced by the fake sleep."""

    def __init__(self) -> None:
        self.t, self.sleeps = 0.0, []

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


ROUTES = {"a": {"stable": "1"}, "b": {"stable": "2", "canary": "3", "weight": 20.0}, "c": {"stable": "5"}}


def store(tmp_path: Path, *names: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in names:
        (tmp_path / name).write_bytes(b"mar")
    return tmp_path


def test_keywatch_with_a_missing_mar_still_re_renders_the_router_and_reports_it(tmp_path: Path) -> None:
    ts, router, clock = FakeBackend(broken={"c v5"}), FakeRouter(dict(ROUTES)), Clock()  # just restarted: empty
    model_store = store(tmp_path / "store", "a_v1.mar", "b_v2.mar", "c_v5.mar")  # b_v3.mar is gone
    result = keywatch.recover(ts, router, model_store, sleep=clock.sleep, clock=clock.now)
    assert router.refreshed == 1 and result.router_rendered and result.healthy
    assert result.restored == ["a v1", "b v2"] and ts.defaults == {"a": "1", "b": "2"}
    assert [(m, v) for m, v, _ in ts.log] == [("a", "1"), ("b", "2"), ("c", "5")]  # c v5 tried, refused
    assert result.missing_archives == ["b v3"] and not result.ok
    assert any("b_v3.mar is missing" in p for p in result.problems)
    assert any("c v5: re-registering failed: " in p and "HTTP 507" in p for p in result.problems)
    assert any("c: making v5 the default failed" in p for p in result.problems)
    paths = StatePaths(tmp_path / "state")
    paths.root.mkdir()
    assert keywatch.read_result(paths) is None
    keywatch.write_result(paths, result)
    shown = keywatch.read_result(paths)
    assert shown["ok"] is False and shown["missing_archives"] == ["b v3"] and "b_v3.mar" in shown["summary"]


def test_keywatch_waits_for_a_slow_torchserve_with_bounded_backoff(tmp_path: Path) -> None:
    ts, router, clock = FakeBackend(slow_pings=6), FakeRouter({"a": {"stable": "1"}}), Clock()
    result = keywatch.recover(ts, router, store(tmp_path, "a_v1.mar"), timeout_s=600, sleep=clock.sleep,
                              clock=clock.now)
    assert clock.sleeps == [0.5, 1, 2, 4, 8, 8] and result.waited_s == 23.5
    assert result.ok and router.refreshed == 1 and ts.versions("a") == ["1"]


def test_keywatch_gives_up_after_its_bound_and_says_so(tmp_path: Path) -> None:
    ts, router, clock = FakeBackend(slow_pings=10**6), FakeRouter({"a": {"stable": "1"}}), Clock()
    result = keywatch.recover(ts, router, store(tmp_path, "a_v1.mar"), timeout_s=60, sleep=clock.sleep,
                              clock=clock.now)
    assert sum(clock.sleeps) == 60 and max(clock.sleeps) == 8
    assert not result.healthy and router.refreshed == 0 and ts.log == []
    assert "did not answer /ping within 60 s" in result.summary()
