"""Shared helpers of the release drills (tests/drills/test_release_drills.py): the invariant checker, waits that
poll with deadlines, killing a flow run, pausing a Prefect deployment's schedule."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import psutil

from canaryflow.core.state import FINAL, Tag
from canaryflow.intake.launcher import PrefectLauncher
from canaryflow.release.ramp import load_status
from canaryflow.release.reconcile import ALIVE
from canaryflow.services import Services
from deployments.canary import CanaryStatus
from deployments.torchserve import archive_name
from deployments.traffic import LiveTraffic
from tests.e2e.test_canary import _flow_run_process

POLL_S = 0.5


def launcher_of(svc: Services) -> PrefectLauncher:
    return PrefectLauncher(svc.settings.prefect_api_url, svc.settings.prefect.release_deployment)


def poll(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = POLL_S) -> Any:
    """``check()`` until it returns something truthy (returned); fails with ``what`` past the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not reached within {timeout_s:.0f} s"
        time.sleep(every_s)


def ramp_status(svc: Services, model: str, version: str) -> dict[str, Any] | None:
    raw = svc.registry.get_version(model, version).tags.get(Tag.CANARY)
    return json.loads(raw) if raw else None


def status_tag(svc: Services, model: str, version: str) -> str | None:
    return svc.registry.get_version(model, version).tags.get(Tag.STATUS)


def alive_runs(launcher: PrefectLauncher, model: str, version: str) -> list[dict[str, Any]]:
    return [r for r in launcher.list_flow_runs(model, version) if r.get("state_type") in ALIVE]


def kill_flow_run(run_id: str) -> int:
    """SIGKILL a flow run's process: its whole process group when it leads one (nothing else is in it), else the
    process and its children. Returns the pid."""
    proc = poll("the flow run's process", lambda: _flow_run_process(run_id), 30)
    pgid = os.getpgid(proc.pid)
    if pgid == proc.pid and pgid != os.getpgid(0):
        os.killpg(pgid, signal.SIGKILL)
    else:
        for p in [*proc.children(recursive=True), proc]:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
    return proc.pid


def kill_running_release(launcher: PrefectLauncher, model: str, version: str) -> str:
    """Kill the RUNNING release run of a version and wait until Prefect reports it CRASHED; returns its id."""
    run = poll("a RUNNING release run", lambda: next((r for r in launcher.list_flow_runs(model, version)
                                                      if r["state_type"] == "RUNNING"), None), 60)
    kill_flow_run(run["id"])
    state = poll("Prefect noticing the killed run", lambda: next(
        (r["state_type"] for r in launcher.list_flow_runs(model, version)
         if r["id"] == run["id"] and r["state_type"] != "RUNNING"), None), 120)
    assert state == "CRASHED", state
    return run["id"]


def stage(svc: Services, model: str, version: str) -> None:
    """(Re-)register a version on TorchServe from its archive in the model store."""
    svc.backend.register(model, version, svc.paths.model_store / archive_name(model, version))
    assert version in svc.backend.versions(model)


def settle(svc: Services, model: str, version: str, timeout_s: float = 400,
           reconcile_with: Services | None = None) -> str:
    """Wait until the release of ``version`` ends; a ramp left non-terminal with no run alive is handed to
    reconcile (as the scheduled pass would). Returns the final canaryflow.status."""
    from canaryflow.release.reconcile import reconcile

    launcher = launcher_of(svc)
    deadline = time.monotonic() + timeout_s
    while True:
        status = status_tag(svc, model, version)
        if status in FINAL and not alive_runs(launcher, model, version):
            return status
        if status not in FINAL and not alive_runs(launcher, model, version):
            reconcile(reconcile_with or svc, launcher)
        elif reconcile_with is not None:
            reconcile(reconcile_with, launcher)  # marks a silent run crashed once its heartbeat is stale
        assert time.monotonic() < deadline, f"{model} v{version} still {status} after {timeout_s:.0f} s"
        time.sleep(2)


def outage(stack: Any, program: str, until: Callable[[], Any], what: str, healthy: list[str],
           timeout_s: float = 300) -> None:
    """Stop a supervised program until ``until()`` holds (the outage's effect, not a span of time), then start it
    and wait until ``healthy`` answer again."""
    stack.supervisor.stop_program(program)
    try:
        poll(what, until, timeout_s)
    finally:
        stack.supervisor.start_program(program)
        stack.wait_healthy(healthy)


def set_schedule_paused(svc: Services, flow: str, deployment: str, paused: bool) -> None:
    """Pause or resume a Prefect deployment's schedule through the REST API (with the launcher's retries: Prefect
    answers 503 while its SQLite is busy, e.g. just after a drill restarted it)."""
    launcher = launcher_of(svc)
    dep = launcher._request("GET", f"/deployments/name/{flow}/{deployment}").json()
    launcher._request("PATCH", f"/deployments/{dep['id']}", {"paused": paused})


def allowed_versions(svc: Services, model: str) -> set[str]:
    """Versions a live answer may come from: released ones (now or before a rollback) and ramp candidates."""
    out = set()
    for v in svc.registry.list_versions(model):
        if v.tags.get(Tag.STATUS) == "released" or v.tags.get(Tag.CANARY) or "canaryflow.restored" in v.tags:
            out.add(v.version)
    for alias in ("champion", "previous"):
        version = svc.registry.alias_version(model, alias)
        if version:
            out.add(version)
    return out


def assert_consistent(svc: Services, model: str, live: LiveTraffic | None, all_ok: bool = True) -> None:
    """The serving invariants after a drill:
    1. the router's stable route, TorchServe's default version and the ``champion`` alias agree;
    2. every live answer came from a released version or from a ramp's candidate (and, with ``all_ok``, every
       request was answered 200);
    3. no ramp is left non-terminal with no release run alive (and a split on the router belongs to one)."""
    champion = svc.registry.alias_version(model, "champion")
    route = svc.router.routes().get(model, {})
    assert champion is not None
    assert route.get("stable") == champion == svc.backend.default_version(model), \
        f"route {route}, TorchServe default {svc.backend.default_version(model)}, champion alias {champion}"
    if live is not None:
        allowed = allowed_versions(svc, model)
        with live._lock:
            answers = list(live.answers)
        served = {a.version for a in answers if a.status == 200}
        assert served <= allowed, f"answers from {served - allowed}; allowed {allowed}"
        if all_ok:
            bad = [(a.status, a.version) for a in answers if a.status != 200]
            assert not bad, f"{len(bad)} of {len(answers)} live requests failed: {bad[:5]}; {live.errors[:3]}"
    launcher = launcher_of(svc)
    for v in svc.registry.list_versions(model):
        raw = v.tags.get(Tag.CANARY)
        if raw and not CanaryStatus.from_json(raw).done:
            assert alive_runs(launcher, model, v.version), \
                f"{model} v{v.version}: ramp left {CanaryStatus.from_json(raw).phase.value} with no run alive"
    if route.get("canary"):
        status = load_status(svc, model, str(route["canary"]))
        assert status is not None and not status.done, f"router splits to v{route['canary']} with no ramp live"
