"""supervisord event listener: renew TorchServe's inference and management keys before they expire.

TorchServe's keys expire ``serving.token_expiration_min`` after they were issued (at its start, or by a renewal); an
expired key is refused (400 InvalidKeyException), so a stack that runs longer would answer nothing through the
router and could not manage models. On every ``TICK_5`` this listener reads the expiry times in ``key_file.json``
and renews each key with less than ``serving.key_renew_fraction`` of its lifetime left (at least 15 s) over
TorchServe's token API, with the API key, which never expires (so an already expired key is renewed too).

- A new inference key goes into the router at once (``NginxRouter.refresh``: render, ``nginx -t``, reload). From
  TorchServe's swap until nginx's new workers take over, requests through the router are refused with TorchServe's
  400: the renewal gap, within ``router_live_s`` recorded per renewal (POST sent -> router live with the new key;
  ``post_s``: until TorchServe answered the POST).
- A new management key needs nothing more: ``TorchServeClient`` reads ``key_file.json`` on every call, and sends a
  call once more with the current key when a renewal crossed it.
- A router whose key is stale (a refresh that failed, a TorchServe restart) is re-rendered on the next tick once
  TorchServe answers.

The lifetime used is ``serving.token_expiration_min``, or the one seen at this listener's last renewal of that key
when shorter (a TorchServe started with another setting than this listener's is not renewed on every tick).
The outcome goes to ``<state>/keyrenew.json`` (:func:`read_state`). Problems go to stderr, once each, and never stop
the listener. A listener of its own rather than a ``TICK_5`` subscription of keywatch: keywatch imports the release
code (and torch, ~265 MB), and ticks queued behind one of its long recoveries would overflow supervisord's event
buffer, which drops the oldest event, possibly a queued TorchServe restart.
Run by supervisord as ``python -m canaryflow.local.keyrenew``; stdout is supervisord's protocol.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from canaryflow.core.paths import StatePaths, read_json, write_json
from deployments.routes import TrafficRouter
from deployments.torchserve import RENEWABLE_KEYS, keys_due

STATE_FILE = "keyrenew.json"
HISTORY = 50  # renewals kept in keyrenew.json


class KeyIssuer(Protocol):
    """What renewal needs from the model server (TorchServeClient)."""

    def healthy(self) -> bool: ...
    def key_expiries(self) -> dict[str, datetime]: ...
    def renew_key(self, kind: str) -> datetime: ...


@dataclass
class RenewalState:
    """What the listener knows between ticks; written to ``keyrenew.json``."""

    checked_at: float = 0.0
    expires: dict[str, str] = field(default_factory=dict)
    renewals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RENEWABLE_KEYS, 0))
    failures: int = 0
    router_refreshes: int = 0  # stale router re-rendered outside a renewal
    observed_lifetime_s: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def record(self, entry: dict[str, Any]) -> None:
        self.history = [*self.history, entry][-HISTORY:]


def lifetimes(configured: timedelta, state: RenewalState) -> dict[str, timedelta]:
    """Each key's lifetime: the configured one, or the one seen at its last renewal when that is shorter."""
    out = {}
    for kind in RENEWABLE_KEYS:
        seen = state.observed_lifetime_s.get(kind)
        out[kind] = min(configured, timedelta(seconds=seen)) if seen else configured
    return out


def tick(issuer: KeyIssuer, router: TrafficRouter, configured: timedelta, fraction: float, state: RenewalState,
         now: Callable[[], datetime] = lambda: datetime.now(UTC),
         clock: Callable[[], float] = time.monotonic) -> list[str]:
    """Renew the keys that are due (and refresh the router after a new inference key), re-render a stale router;
    update ``state``. Returns what happened worth a log line. Never raises for TorchServe's or the router's
    failures: they are in ``state.problem`` and retried on the next tick."""
    problems: list[str] = []
    done: list[str] = []
    router_failed = False
    state.checked_at = now().timestamp()
    try:
        expiries = issuer.key_expiries()
    except Exception as exc:  # noqa: BLE001 - TorchServe not started yet, a key file being rewritten: next tick
        state.problem = f"cannot read TorchServe's key expiries: {exc}"
        return done
    for kind in keys_due(expiries, lifetimes(configured, state), now(), fraction):
        sent_at, started = now(), clock()
        entry: dict[str, Any] = {"kind": kind, "at": sent_at.timestamp(),
                                 "left_s": round((expiries[kind] - sent_at).total_seconds(), 1)}
        try:
            expiries[kind] = issuer.renew_key(kind)
        except Exception as exc:  # noqa: BLE001
            state.failures += 1
            problems.append(f"renewing the {kind} key failed: {exc}")
            state.record({**entry, "ok": False, "error": str(exc)[:300]})
            continue
        entry["post_s"] = round(clock() - started, 3)
        state.renewals[kind] = state.renewals.get(kind, 0) + 1
        lifetime = (expiries[kind] - sent_at).total_seconds()
        if lifetime > 0:
            state.observed_lifetime_s[kind] = round(lifetime, 3)
        entry.update(ok=True, expires=expiries[kind].isoformat())
        if kind == "inference":
            try:
                router.refresh()
                entry["router_live_s"] = round(clock() - started, 3)
            except Exception as exc:  # noqa: BLE001 - the stale check below retries it on every tick
                entry["router_error"], router_failed = str(exc)[:300], True
                problems.append(f"the router still holds the old inference key (every routed request is refused "
                                f"until it is re-rendered): {exc}")
        state.record(entry)
        live = f", router live with it after {entry['router_live_s']:.2f} s" if "router_live_s" in entry else ""
        left = entry["left_s"]
        when = f"{left:.0f} s before it expired" if left >= 0 else f"{-left:.0f} s after it expired"
        done.append(f"renewed the {kind} key {when}; the new one expires "
                    f"{expiries[kind].isoformat(timespec='seconds')}{live}")
    if not router_failed:
        try:
            # (the key file of a TorchServe that does not answer yet proves nothing: keywatch is on a restart)
            if router.credentials_stale() and issuer.healthy():
                router.refresh()
                state.router_refreshes += 1
                done.append("re-rendered the router: it held another inference key than TorchServe's")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"re-rendering the router with TorchServe's current inference key failed: {exc}")
    state.expires = {kind: when.isoformat() for kind, when in expiries.items()}
    state.problem = "; ".join(problems) or None
    return done


def state_path(paths: StatePaths) -> Path:
    return paths.root / STATE_FILE


def write_state(paths: StatePaths, state: RenewalState) -> None:
    """``keyrenew.json`` in the state dir, replaced atomically."""
    write_json(state_path(paths), {**asdict(state), "ok": state.ok})


def read_state(paths: StatePaths) -> dict[str, Any] | None:
    """The listener's last tick: expiries, renewals per key, the last renewals, the current problem (None: none)."""
    return read_json(state_path(paths))


def _log(message: str) -> None:
    print(f"keyrenew: {message}", file=sys.stderr, flush=True)


def main() -> None:
    from supervisor import childutils

    state = RenewalState()
    job: tuple[Any, ...] | None = None
    logged: str | None = None
    while True:
        headers, _ = childutils.listener.wait(sys.stdin, sys.stdout)
        if headers.get("eventname", "").startswith("TICK_"):
            try:
                if job is None:
                    from canaryflow.core.settings import get_settings
                    from canaryflow.services import local_router
                    from deployments.torchserve import TorchServeClient

                    settings = get_settings()
                    paths = StatePaths.of(settings)
                    job = (TorchServeClient(settings, paths), local_router(settings, paths),
                           timedelta(minutes=settings.serving.token_expiration_min),
                           settings.serving.key_renew_fraction, paths)
                issuer, router, configured, fraction, paths = job
                for line in tick(issuer, router, configured, fraction, state):
                    _log(line)
                if state.problem != logged:
                    _log(state.problem or "problem gone: keys and router current")
                    logged = state.problem
                write_state(paths, state)
            except Exception as exc:  # keep listening: one bad tick must not kill the listener
                if str(exc) != logged:
                    _log(f"tick failed: {exc}")
                    logged = str(exc)
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    main()
