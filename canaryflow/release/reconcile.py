"""Reconcile: make the registry, Prefect, TorchServe and the router agree again after something was missed.

Run on an interval by the ``reconcile`` deployment (and by hand). For every registered model, under the model's
state lock (canaryflow/core/locks.py) and from a fresh read of its versions and runs:

1. a RUNNING or PENDING release run whose heartbeat (``canaryflow.heartbeat``, the ramp status) is older than
   ``stale_after_s`` died without reporting: it is marked CRASHED in Prefect and handled as a dead run below;
2. versions newest first: one with no canaryflow status, older than ``missed_after_s``, and no release run alive,
   missed its webhook: its release run is started, unless it is older than the champion (never a downgrade: it
   is tagged ``skipped``; a person releases it with ``canaryflow release MODEL V --allow-older``);
3. a version left ``releasing`` or ``canary`` with no release run alive (a killed worker, a crashed flow) is
   released again: the new run resumes a ramp from its persisted status (or re-runs the gates); past
   ``max_attempts`` runs, or past the ramp deadline, it is rolled back instead;
4. a model with no release run alive gets the routes its recorded state asks for: the champion, plus the split
   of a ramp in progress; missing TorchServe registrations are restored from the model store;
5. a router holding a stale TorchServe inference key (TorchServe restarted, key watch failed) is re-rendered.

Idempotent: a second pass right after the first finds nothing to do. Starting runs goes through the same launcher
as the webhook bridge, keyed so two concurrent passes start one run.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from canaryflow.core import locks, seal
from canaryflow.core.errors import CanaryflowError, ServingError
from canaryflow.core.locks import LockTimeout
from canaryflow.core.names import name_problem
from canaryflow.core.registry import VersionInfo
from canaryflow.core.state import UNFINISHED, ReleaseStatus, Route, Tag
from canaryflow.intake.launcher import Launcher, release_run_name
from canaryflow.release.converge import converge
from canaryflow.release.ramp import last_heartbeat, load_status
from canaryflow.release.rollback import abort_release
from canaryflow.release.steps import downgrade_reason, version_number
from canaryflow.services import Services

ALIVE = frozenset({"SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"})
EXECUTING = frozenset({"PENDING", "RUNNING"})  # states in which a release flow process should be beating
_CLOCK_SKEW_S = 60.0


def reconcile(svc: Services, launcher: Launcher, now: float | None = None) -> list[str]:
    """One pass over every registered model; returns what was done, one line per action."""
    now = time.time() if now is None else now
    actions: list[str] = []
    for model in svc.registry.list_models():
        try:
            problem = name_problem(model)
            if problem:
                actions += refuse_versions(svc, model, problem)
                continue
            with locks.hold(svc, model, "reconcile"):
                actions += reconcile_model(svc, launcher, model, now)
        except LockTimeout as exc:
            actions.append(f"{model}: skipped this pass: {exc}")
        except Exception as exc:  # noqa: BLE001 - one model's trouble must not stop the others
            actions.append(f"{model[:80]!r}: reconcile failed this pass: {type(exc).__name__}: {exc}")
    return actions + refresh_stale_key(svc)


def refuse_versions(svc: Services, model: str, problem: str) -> list[str]:
    """A model whose name breaks the name rule is never served: its versions without a status are tagged
    ``rejected`` with the reason (once), and nothing else is touched."""
    actions = []
    for v in svc.registry.list_versions(model):
        if v.tags.get(Tag.STATUS) is None:
            svc.registry.set_tags(model, v.version, {Tag.STATUS: ReleaseStatus.REJECTED, Tag.REASON: problem})
            actions.append(f"{model[:80]!r} v{v.version}: rejected: {problem}")
    return actions


def reconcile_model(svc: Services, launcher: Launcher, model: str, now: float) -> list[str]:
    """One model, read fresh (call it under the model's state lock): stale runs, versions newest first, routes."""
    versions = newest_first(svc.registry.list_versions(model))
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in launcher.list_flow_runs(model):
        runs.setdefault(str((r.get("parameters") or {}).get("version")), []).append(r)
    actions = [line for v in versions for line in _crashed(svc, launcher, v, runs.get(v.version, []), now)]
    if not any(_alive(runs.get(v.version, [])) for v in versions):
        actions += repair_routes(svc, model, versions)
    champion = seal.trusted_champion(svc.registry, svc.paths, model)
    for v in versions:
        if _alive(runs.get(v.version, [])):
            continue
        line = _version(svc, launcher, v, runs.get(v.version, []), now, champion)
        if line:
            actions.append(line)
    return actions


def newest_first(versions: list[VersionInfo]) -> list[VersionInfo]:
    return sorted(versions, key=lambda v: version_number(v.version), reverse=True)


def _alive(runs: list[dict[str, Any]]) -> bool:
    return any(r.get("state_type") in ALIVE for r in runs)


def _crashed(svc: Services, launcher: Launcher, v: VersionInfo, runs: list[dict[str, Any]], now: float) -> list[str]:
    """Mark RUNNING/PENDING runs of ``v`` with no heartbeat for ``stale_after_s`` CRASHED (in place, too)."""
    limit = svc.settings.reconcile.stale_after_s
    out = []
    for r in runs:
        if r.get("state_type") not in EXECUTING:
            continue
        beat = last_heartbeat(v.tags)
        beat = beat if beat <= now + _CLOCK_SKEW_S else 0.0  # a tag is user-writable: a future beat proves nothing
        seen = max(beat, _epoch(r.get("start_time")), _epoch((r.get("state") or {}).get("timestamp")))
        if not seen or now - seen <= limit:
            continue  # no timestamp at all: nothing to judge by
        message = (f"no heartbeat from the release of {v.name} v{v.version} for {now - seen:.0f} s "
                   f"(limit {limit:g} s): "
                   "the flow died without reporting; marked crashed by reconcile")
        launcher.mark_crashed(str(r.get("id")), message)
        out.append(f"{v.name} v{v.version}: run {r.get('name') or r.get('id')} was {r.get('state_type')} with "
                   f"{message}")
        r["state_type"] = "CRASHED"
    return out


def _epoch(value: Any) -> float:
    """Prefect's ISO timestamps (or epoch numbers) as epoch seconds; 0.0 when absent or unreadable."""
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str) or not value:
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _version(svc: Services, launcher: Launcher, v: VersionInfo, runs: list[dict[str, Any]], now: float,
             champion: str | None) -> str:
    status = v.tags.get(Tag.STATUS)
    cfg = svc.settings.reconcile
    name = f"{v.name} v{v.version}"
    if status is None:
        if now - v.created_ms / 1000 < cfg.missed_after_s:
            return ""  # its webhook delivery may still be on the way
        if len(runs) >= cfg.max_attempts:
            return ""  # runs exist but never tagged it: their failures are in Prefect, do not loop
        older = downgrade_reason(v.name, v.version, champion)
        if older:
            svc.registry.set_tags(v.name, v.version, {Tag.STATUS: ReleaseStatus.SKIPPED, Tag.REASON: older})
            return f"{name}: no release status, not released: {older}"
        launcher.start_release(v.name, v.version, f"reconcile-{v.name}-v{v.version}-{len(runs)}")
        run = release_run_name(v.name, v.version)
        return f"{name}: no release status and no run alive (missed webhook); started {run}"
    if status not in UNFINISHED:
        return ""
    canary = load_status(svc, v.name, v.version)
    if canary is None and v.tags.get(Tag.CANARY):
        return f"{name}: its ramp status does not carry the pipeline's seal (forged or edited): not acted on"
    too_old = canary is not None and now - canary.started_at > svc.settings.canary.deadline_s
    if len(runs) >= cfg.max_attempts or too_old:
        why = "ramp deadline passed" if too_old else f"{len(runs)} release runs did not finish it"
        return abort_release(svc, v.name, v.version, f"release interrupted ({why}); rolled back by reconcile",
                             status=ReleaseStatus.FAILED)
    launcher.start_release(v.name, v.version, f"reconcile-{v.name}-v{v.version}-{len(runs)}")
    where = f"canary at {canary.weight:g}%" if canary and not canary.done else status
    return f"{name}: release left half-way ({where}) with no run alive; started a run to resume it"


def desired_route(svc: Services, model: str, versions: list[VersionInfo], champion: str | None | bool = True
                  ) -> Route | None:
    """What the router should serve for ``model`` according to the pipeline's sealed state (the champion it set,
    the ramp it persisted), or None for nothing known. ``champion``: the sealed champion if the caller read it
    already (True: read it here)."""
    if champion is True:
        champion = seal.trusted_champion(svc.registry, svc.paths, model)
    if not isinstance(champion, str):
        return None
    route = Route(champion)
    for v in versions:
        if v.tags.get(Tag.STATUS) != ReleaseStatus.CANARY:
            continue
        canary = load_status(svc, model, v.version)
        if canary is not None and not canary.done and canary.champion == champion:
            route = Route(champion, v.version, 100.0 if canary.shadow else canary.weight, canary.shadow)
    return route


def repair_routes(svc: Services, model: str, versions: list[VersionInfo] | None = None) -> list[str]:
    """Router and TorchServe back to the recorded state of ``model``; lines for what changed.

    Under the model's state lock, from ``versions`` read under it (default: read now): a split applied by a
    ramp just before its status was written is never reverted from an older snapshot."""
    with locks.hold(svc, model, "repair its routes"):
        return _repair(svc, model, versions if versions is not None else svc.registry.list_versions(model))


def _repair(svc: Services, model: str, versions: list[VersionInfo]) -> list[str]:
    champion = seal.trusted_champion(svc.registry, svc.paths, model)
    forged = seal.alias_forged(svc.registry, model, svc.settings.release.champion_alias, champion)
    noted = [forged] if forged else []  # a forged alias is reported, and serving follows the sealed state
    want = desired_route(svc, model, versions, champion)
    if want is None:
        return noted
    try:
        return noted + [f"{change} (recorded state; repaired)" for change in converge(svc, model, want)]
    except ServingError as exc:  # nothing moved: the router keeps serving what it served
        return [*noted, f"{model}: cannot serve the recorded state ({want.describe()}): {exc}"]


def refresh_stale_key(svc: Services) -> list[str]:
    """Re-render a router whose TorchServe key is not TorchServe's current inference key (a TorchServe restart
    the key watch could not finish: every model would answer 401 while the routes look right)."""
    try:
        if not svc.router.credentials_stale():
            return []
    except ServingError:
        return []  # no key file to compare with: TorchServe is down, and the key watch is on it
    if not svc.backend.healthy():
        return []  # the key file of a TorchServe that is not answering proves nothing; the key watch is on it
    try:
        svc.router.refresh()
    except CanaryflowError as exc:
        return [f"router: holds a stale TorchServe inference key; re-rendering failed: {exc}"]
    return ["router: held a stale TorchServe inference key (TorchServe restarted); re-rendered with the current one"]
