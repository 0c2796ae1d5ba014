"""Renewing TorchServe's keys before they expire: when (keys_due), how (TorchServeClient.renew_key against a fake
token API), what the listener does on a tick (canaryflow.local.keyrenew.tick with fakes), and its supervisord
protocol (the real listener process fed TICK_5 events)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import FakeRouter

from canaryflow.core.errors import ServingError
from canaryflow.core.paths import StatePaths
from canaryflow.core.settings import Settings
from canaryflow.local import keyrenew
from canaryflow.local.stack import LocalStack
from deployments import torchserve

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
LIFE = timedelta(minutes=2)
BOTH = {"inference": LIFE, "management": LIFE}


def ts_instant(when: datetime) -> str:
    """How TorchServe writes an expiry: Java's Instant.toString, nanoseconds and a Z."""
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


def write_keys(paths: StatePaths, keys: dict[str, str], expires: dict[str, datetime]) -> None:
    paths.torchserve_keys.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {kind: {"key": keys[kind], "expiration time": ts_instant(expires[kind])}
                            for kind in ("management", "inference")}
    data["API"] = {"key": keys["API"]}
    paths.torchserve_keys.write_text(json.dumps(data, indent=2))


# -- when ------------------------------------------------------------------------------------------------------
def test_a_key_is_due_once_less_than_the_fraction_of_its_lifetime_is_left() -> None:
    expiries = {"inference": T0 + timedelta(seconds=61), "management": T0 + timedelta(seconds=59)}
    assert torchserve.keys_due(expiries, BOTH, T0, 0.5) == ["management"]
    assert torchserve.keys_due(expiries, BOTH, T0 + timedelta(seconds=2), 0.5) == ["inference", "management"]
    assert torchserve.keys_due(expiries, BOTH, T0, 0.25) == []


def test_an_expired_key_is_due_and_a_fresh_one_is_not() -> None:
    expiries = {"inference": T0 - timedelta(hours=3), "management": T0 + LIFE}
    assert torchserve.keys_due(expiries, BOTH, T0, 0.5) == ["inference"]


def test_a_small_fraction_still_leaves_a_margin_of_several_ticks() -> None:
    expiries = {"inference": T0 + timedelta(seconds=14), "management": T0 + timedelta(seconds=16)}
    assert torchserve.keys_due(expiries, BOTH, T0, 0.01) == ["inference"]


def test_key_expiries_read_torchserves_instants(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path)
    write_keys(paths, {"inference": "i", "management": "m", "API": "a"},
               {"inference": T0, "management": T0 + LIFE})
    got = torchserve.key_expiries(paths)
    assert got == {"inference": T0, "management": T0 + LIFE}  # the nanoseconds past the microseconds are dropped
    assert all(when.tzinfo is not None for when in got.values())


@pytest.mark.parametrize("content", [None, "{not json", "[]", json.dumps({"inference": {"key": "i"},
                                                                          "management": {"key": "m"}}),
                                     json.dumps({"inference": {"key": "i", "expiration time": "soon"},
                                                 "management": {"key": "m", "expiration time": "soon"}})])
def test_an_unreadable_key_file_is_a_serving_error(tmp_path: Path, content: str | None) -> None:
    paths = StatePaths(tmp_path)
    if content is not None:
        paths.torchserve_keys.parent.mkdir(parents=True)
        paths.torchserve_keys.write_text(content)
    with pytest.raises(ServingError, match="key file"):
        torchserve.key_expiries(paths)


def test_a_key_file_caught_mid_rewrite_is_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TorchServe truncates and rewrites key_file.json at a renewal: a read that sees no JSON tries again."""
    paths = StatePaths(tmp_path)
    write_keys(paths, {"inference": "i", "management": "m", "API": "a"}, {"inference": T0, "management": T0})
    whole = paths.torchserve_keys.read_text()
    reads = iter(["", whole[:40], whole])
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: next(reads))
    monkeypatch.setattr(torchserve.time, "sleep", lambda s: None)
    assert torchserve.read_keys(paths) == {"inference": "i", "management": "m", "API": "a"}


def test_the_renew_fraction_is_a_share(tmp_path: Path) -> None:
    assert Settings().serving.key_renew_fraction == 0.5
    for bad in (0, 1, 1.5):
        with pytest.raises(ValueError):
            Settings(serving={"key_renew_fraction": bad})


# -- how: TorchServeClient against a fake token API ------------------------------------------------------------
class FakeTokenApi:
    """TorchServe's token auth as its frontend does it: one current key per kind, a 400 InvalidKeyException for
    any other, ``POST /token?type=`` with the API key on the management port swaps a key and rewrites the file."""

    def __init__(self, paths: StatePaths, settings: Settings, life: timedelta = LIFE) -> None:
        self.paths, self.settings, self.life = paths, settings, life
        self.keys = {"inference": "inf-0", "management": "man-0", "API": "api-0"}
        self.expires = {"inference": T0 + life, "management": T0 + life}
        self.calls: list[tuple[str, str, str, dict]] = []
        self.token_status = 200
        self.write_file = True
        self.renew_before_next_call: str | None = None  # a renewal by someone else, crossing the next call
        self.now = T0 + timedelta(seconds=70)
        write_keys(paths, self.keys, self.expires)

    def renew(self, kind: str) -> None:
        self.keys[kind] = f"{kind[:3]}-{int(self.keys[kind].split('-')[1]) + 1}"
        self.expires[kind] = self.now + self.life
        if self.write_file:
            write_keys(self.paths, self.keys, self.expires)

    def __call__(self, method: str, url: str, *, headers: dict[str, str], timeout: float,
                 params: dict | None = None, **kwargs: Any) -> httpx.Response:
        if self.renew_before_next_call:
            self.renew(self.renew_before_next_call)
            self.renew_before_next_call = None
        parsed = httpx.URL(url)
        token = headers["Authorization"].removeprefix("Bearer ")
        self.calls.append((method, parsed.path, token, dict(params or {})))
        management = parsed.port == self.settings.ports.torchserve_management
        if parsed.path == "/token":
            wanted = "API"
        else:
            wanted = "management" if management else "inference"
        if token != self.keys[wanted]:
            return httpx.Response(400, json={"code": 400, "type": "InvalidKeyException",
                                             "message": "Token Authorization failed."})
        if parsed.path == "/token":
            if self.token_status != 200:
                return httpx.Response(self.token_status, text="boom")
            self.renew((params or {})["type"])
            return httpx.Response(200, text="")
        return httpx.Response(200, json=[{"modelVersion": "1"}])


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[torchserve.TorchServeClient, FakeTokenApi]:
    settings = Settings(state_dir=tmp_path)
    paths = StatePaths(settings.state_dir)
    fake = FakeTokenApi(paths, settings)
    monkeypatch.setattr(torchserve.httpx, "request", fake)
    return torchserve.TorchServeClient(settings, paths), fake


def test_renew_key_uses_the_api_key_on_the_management_port(api) -> None:
    client, fake = api
    assert client.renew_key("inference") == fake.now + LIFE
    assert fake.calls == [("POST", "/token", "api-0", {"type": "inference"})]
    assert torchserve.read_keys(client.paths) == {"inference": "inf-1", "management": "man-0", "API": "api-0"}
    assert client.renew_key("management") == fake.now + LIFE
    assert client.versions("m") == ["1"]  # with the new management key
    assert fake.calls[-1][2] == "man-1"


def test_a_refused_renewal_is_a_serving_error_and_changes_nothing(api) -> None:
    client, fake = api
    fake.token_status = 500
    with pytest.raises(ServingError, match="renew its inference key: HTTP 500"):
        client.renew_key("inference")
    assert torchserve.read_keys(client.paths)["inference"] == "inf-0"
    with pytest.raises(ValueError, match="not one of"):
        client.renew_key("API")


def test_a_renewal_answered_without_a_new_key_file_is_a_serving_error(api) -> None:
    client, fake = api
    fake.write_file = False
    with pytest.raises(ServingError, match="still holds the old key"):
        client.renew_key("management")


def test_a_call_crossed_by_a_renewal_is_sent_once_more_with_the_new_key(api) -> None:
    client, fake = api
    fake.renew_before_next_call = "management"  # the key read from the file is refused by the time it arrives
    assert client.versions("m") == ["1"]
    assert [c[2] for c in fake.calls] == ["man-0", "man-1"]


def test_a_wrong_key_that_is_still_the_current_one_is_not_retried(api) -> None:
    client, fake = api
    fake.keys["management"] = "rotated-behind-our-back"  # TorchServe holds a key the file does not show
    with pytest.raises(ServingError, match="HTTP 400"):
        client.versions("m")
    assert len(fake.calls) == 1


# -- the listener's tick, with fakes -----------------------------------------------------------------------------
class FakeIssuer:
    """TorchServe's keys as the listener sees them: expiries, renewals (that can fail), an unreadable file."""

    def __init__(self, clock: list[datetime], life: timedelta = LIFE) -> None:
        self.clock, self.life = clock, life
        self.expires = {"inference": clock[0] + life, "management": clock[0] + life}
        self.renewed: list[str] = []
        self.fail: str | None = None
        self.unreadable = False
        self.up = True

    def healthy(self) -> bool:
        return self.up

    def key_expiries(self) -> dict[str, datetime]:
        if self.unreadable:
            raise ServingError("TorchServe key file key_file.json unreadable (No such file); is it running?")
        return dict(self.expires)

    def renew_key(self, kind: str) -> datetime:
        if self.fail:
            raise ServingError(self.fail)
        self.renewed.append(kind)
        self.expires[kind] = self.clock[0] + self.life
        return self.expires[kind]


class FailingRouter(FakeRouter):
    def __init__(self, fail: int) -> None:
        super().__init__()
        self.fail = fail

    def refresh(self) -> None:
        if self.fail:
            self.fail -= 1
            self.stale = True
            raise ServingError("nginx rejected the new router config, the old one stays live")
        super().refresh()


def run(issuer: FakeIssuer, router: FakeRouter, state: keyrenew.RenewalState, clock: list[datetime],
        at_s: float, configured: timedelta = LIFE) -> list[str]:
    clock[0] = T0 + timedelta(seconds=at_s)
    return keyrenew.tick(issuer, router, configured, 0.5, state, now=lambda: clock[0], clock=lambda: 0.0)


def test_nothing_is_renewed_while_both_keys_have_more_than_half_their_life() -> None:
    clock = [T0]
    issuer, router, state = FakeIssuer(clock), FakeRouter(), keyrenew.RenewalState()
    assert run(issuer, router, state, clock, 55) == []
    assert issuer.renewed == [] and router.refreshed == 0 and state.ok
    assert state.expires["inference"] == (T0 + LIFE).isoformat()


def test_both_keys_are_renewed_when_due_and_only_the_inference_key_refreshes_the_router() -> None:
    clock = [T0]
    issuer, router, state = FakeIssuer(clock), FakeRouter(), keyrenew.RenewalState()
    lines = run(issuer, router, state, clock, 61)
    assert issuer.renewed == ["inference", "management"] and router.refreshed == 1
    assert state.renewals == {"inference": 1, "management": 1} and state.ok
    assert "renewed the inference key 59 s before it expired" in lines[0] and "router live" in lines[0]
    assert [h["kind"] for h in state.history] == ["inference", "management"]
    assert state.history[0]["router_live_s"] == 0.0 and "router_live_s" not in state.history[1]
    # the new keys are good for another two minutes: the next renewals come a minute later
    assert run(issuer, router, state, clock, 100) == [] and issuer.renewed == ["inference", "management"]
    run(issuer, router, state, clock, 122)
    assert issuer.renewed == ["inference", "management"] * 2 and router.refreshed == 2


def test_only_the_due_key_is_renewed() -> None:
    clock = [T0]
    issuer, router, state = FakeIssuer(clock), FakeRouter(), keyrenew.RenewalState()
    issuer.expires["inference"] = T0 + timedelta(minutes=10)
    run(issuer, router, state, clock, 70)
    assert issuer.renewed == ["management"] and router.refreshed == 0


def test_an_unreadable_key_file_is_reported_and_nothing_is_tried() -> None:
    clock = [T0]
    issuer, router, state = FakeIssuer(clock), FakeRouter(stale=True), keyrenew.RenewalState()
    issuer.unreadable = True
    assert run(issuer, router, state, clock, 200) == []
    assert not state.ok and "cannot read TorchServe's key expiries" in state.problem
    assert issuer.renewed == [] and router.refreshed == 0
    issuer.unreadable = False
    run(issuer, router, state, clock, 205)  # TorchServe is back: both keys (expired) renewed, problem gone
    assert issuer.renewed == ["inference", "management"] and state.ok


def test_a_failed_renewal_is_reported_and_retried_on_the_next_tick() -> None:
    clock = [T0]
    issuer, router, state = FakeIssuer(clock), FakeRouter(), keyrenew.RenewalState()
    issuer.fail = "TorchServe management API unreachable at http://127.0.0.1:8081/token: connection refused"
    assert run(issuer, router, state, clock, 61) == []
    assert state.failures == 2 and state.renewals == {"inference": 0, "management": 0}
    assert "renewing the inference key failed" in state.problem and "renewing the management key" in state.problem
    assert router.refreshed == 0  # the router keeps the key TorchServe still accepts
    assert [h["ok"] for h in state.history] == [False, False]
    issuer.fail = None
    run(issuer, router, state, clock, 66)
    assert issuer.renewed == ["inference", "management"] and router.refreshed == 1 and state.ok


def test_a_failed_router_refresh_is_retried_while_the_router_is_stale() -> None:
    clock = [T0]
    issuer, router, state = FakeIssuer(clock), FailingRouter(fail=2), keyrenew.RenewalState()
    run(issuer, router, state, clock, 61)
    assert issuer.renewed == ["inference", "management"]
    assert "still holds the old inference key" in state.problem and "router_error" in state.history[0]
    run(issuer, router, state, clock, 66)  # not due again; the stale router is re-rendered (fails once more)
    assert issuer.renewed == ["inference", "management"] and "re-rendering the router" in state.problem
    lines = run(issuer, router, state, clock, 71)
    assert state.ok and router.refreshed == 1 and state.router_refreshes == 1 and "re-rendered" in lines[0]


def test_a_stale_router_is_re_rendered_without_a_renewal_once_torchserve_answers() -> None:
    clock = [T0]
    issuer, router, state = FakeIssuer(clock), FakeRouter(stale=True), keyrenew.RenewalState()
    issuer.up = False  # TorchServe restarting: its new key file proves nothing yet (keywatch is on it)
    run(issuer, router, state, clock, 10)
    assert router.refreshed == 0 and state.ok
    issuer.up = True
    run(issuer, router, state, clock, 15)
    assert issuer.renewed == [] and router.refreshed == 1 and state.router_refreshes == 1


def test_keys_that_live_shorter_than_configured_are_not_renewed_on_every_tick() -> None:
    """TorchServe started with 2-minute keys, the listener configured for a week: after one renewal it goes by the
    lifetime it saw."""
    clock = [T0]
    issuer, router, state = FakeIssuer(clock), FakeRouter(), keyrenew.RenewalState()
    run(issuer, router, state, clock, 5, configured=timedelta(days=7))
    assert issuer.renewed == ["inference", "management"]
    assert state.observed_lifetime_s == {"inference": 120.0, "management": 120.0}
    for at in range(10, 65, 5):
        run(issuer, router, state, clock, at, configured=timedelta(days=7))
    assert issuer.renewed == ["inference", "management"]
    run(issuer, router, state, clock, 70, configured=timedelta(days=7))
    assert issuer.renewed == ["inference", "management"] * 2


def test_the_state_file_round_trips(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path)
    assert keyrenew.read_state(paths) is None
    clock = [T0]
    state = keyrenew.RenewalState()
    run(FakeIssuer(clock), FakeRouter(), state, clock, 61)
    keyrenew.write_state(paths, state)
    shown = keyrenew.read_state(paths)
    assert shown["ok"] is True and shown["renewals"] == {"inference": 1, "management": 1}
    assert len(shown["history"]) == 2


def test_the_history_is_bounded() -> None:
    state = keyrenew.RenewalState()
    for i in range(keyrenew.HISTORY + 7):
        state.record({"i": i})
    assert len(state.history) == keyrenew.HISTORY and state.history[-1] == {"i": keyrenew.HISTORY + 6}


# -- wiring ------------------------------------------------------------------------------------------------------
def test_the_stack_runs_the_listener_on_tick_5(tmp_path: Path) -> None:
    programs = {p.name: p for p in LocalStack(Settings(state_dir=tmp_path)).programs()}
    renew = programs["keyrenew"]
    assert renew.events == "TICK_5" and renew.command[1:] == ["-m", "canaryflow.local.keyrenew"]


def _event(serial: int, name: str, payload: str) -> bytes:
    header = (f"ver:3.0 server:supervisor serial:{serial} pool:keyrenew poolserial:{serial} eventname:{name} "
              f"len:{len(payload.encode())}\n")
    return (header + payload).encode()


def test_the_listener_answers_every_event_and_survives_a_missing_torchserve(tmp_path: Path) -> None:
    """The real listener process, fed like supervisord feeds it: READY, then RESULT 2 OK for each event (ticks
    and anything else), a problem in keyrenew.json (no TorchServe here) and no crash."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANARYFLOW_")}
    env.update(CANARYFLOW_STATE_DIR=str(tmp_path), CANARYFLOW_SERVING__TOKEN_EXPIRATION_MIN="2")
    events = [_event(1, "TICK_5", "when:1765022400"), _event(2, "PROCESS_STATE_RUNNING",
                                                             "processname:x groupname:x from_state:STARTING pid:1"),
              _event(3, "TICK_5", "when:1765022405")]
    done = subprocess.run([sys.executable, "-m", "canaryflow.local.keyrenew"], input=b"".join(events),
                          capture_output=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=120)
    # (then stdin ends, which supervisord never does, and childutils fails reading: what matters is before that)
    assert done.stdout.decode() == "READY\n" + "RESULT 2\nOKREADY\n" * 3, done
    assert done.stderr.decode().count("cannot read TorchServe's key expiries") == 1, done.stderr.decode()
    shown = keyrenew.read_state(StatePaths(tmp_path))
    assert shown is not None and shown["ok"] is False and "unreadable" in shown["problem"]
