"""Reconcile: make the registry, Prefect, TorchServe and the router agree again after something was missed.

Run on an interval by the ``reconcile`` deployment (and by hand). For every registered model:

1. a version with no canaryflow status, older than ``missed_after_s``, and no release run waiting or running,
   missed its webhook: start its release run;
2. a version left ``releasing`` or ``canary`` with no release run alive (a killed worker, a crashed flow) is
   released again: the new run resumes a ramp from its persisted status (or re-runs the gates); past
   ``max_attempts`` runs, or past the ramp deadline, it is rolled back instead;
3. a model with no release run alive gets the routes its recorded state asks for: the champion, plus the split
   of a ramp in progress; missing TorchServe registrations are restored from the model store.

Idempotent: a second pass right after the first finds nothing to do. Starting runs goes through the same launcher
as the webhook bridge, keyed so two concurrent passes start one run.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from canaryflow.orchestrator import release_run_name
from canaryflow.ramp import load_status
from canaryflow.registry import STATUS_TAG, VersionInfo
from canaryflow.rollback import abort_release
from canaryflow.services import Services
from deployments.torchserve import archive_name

ALIVE = frozenset({"SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"})
UNFINISHED = ("releasing", "canary")


class Launcher(Protocol):
    def start_release(self, model_name: str, version: str, idempotency_key: str) -> str: ...
    def list_flow_runs(self, model_name: str | None = None, version: str | None = None) -> list[dict[str, Any]]: ...


def reconcile(svc: Services, launcher: Launcher, now: float | None = None) -> list[str]:
    """One pass over every registered model; returns what was done, one line per action."""
    now = time.time() if now is None else now
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in launcher.list_flow_runs():
        p = r.get("parameters") or {}
        runs.setdefault((str(p.get("model_name")), str(p.get("version"))), []).append(r)
    actions: list[str] = []
    for model in svc.registry.list_models():
        versions = svc.registry.list_versions(model)
        busy = any(_alive(runs.get((model, v.version), [])) for v in versions)
        if not busy:
            actions += repair_routes(svc, model, versions)
        for v in versions:
            key = (model, v.version)
            if _alive(runs.get(key, [])):
                continue
            line = _version(svc, launcher, v, runs.get(key, []), now)
            if line:
                actions.append(line)
    return actions


def _alive(runs: list[dict[str, Any]]) -> bool:
    return any(r.get("state_type") in ALIVE for r in runs)


def _version(svc: Services, launcher: Launcher, v: VersionInfo, runs: list[dict[str, Any]], now: float) -> str:
    status = v.tags.get(STATUS_TAG)
    cfg = svc.settings.reconcile
    name = f"{v.name} v{v.version}"
    if status is None:
        if now - v.created_ms / 1000 < cfg.missed_after_s:
            return ""  # its webhook delivery may still be on the way
        if len(runs) >= cfg.max_attempts:
            return ""  # runs exist but never tagged it: their failures are in Prefect, do not loop
        launcher.start_release(v.name, v.version, f"reconcile-{v.name}-v{v.version}-{len(runs)}")
        run = release_run_name(v.name, v.version)
        return f"{name}: no release status and no run alive (missed webhook); started {run}"
    if status not in UNFINISHED:
        return ""
    canary = load_status(svc, v.name, v.version)
    too_old = canary is not None and now - canary.started_at > svc.settings.canary.deadline_s
    if len(runs) >= cfg.max_attempts or too_old:
        why = "ramp deadline passed" if too_old else f"{len(runs)} release runs did not finish it"
        return abort_release(svc, v.name, v.version, f"release interrupted ({why}); rolled back by reconcile",
                             status="failed")
    launcher.start_release(v.name, v.version, f"reconcile-{v.name}-v{v.version}-{len(runs)}")
    where = f"canary at {canary.weight:g}%" if canary and not canary.done else status
    return f"{name}: release left half-way ({where}) with no run alive; started a run to resume it"


def desired_route(svc: Services, model: str, versions: list[VersionInfo]) -> dict[str, Any] | None:
    """What the router should serve for ``model`` according to the registry, or None for nothing known."""
    champion = svc.registry.alias_version(model, svc.settings.release.champion_alias)
    if champion is None:
        return None
    route: dict[str, Any] = {"stable": champion}
    for v in versions:
        if v.tags.get(STATUS_TAG) != "canary":
            continue
        canary = load_status(svc, model, v.version)
        if canary is not None and not canary.done and canary.champion == champion:
            route.update(canary=v.version, weight=100.0 if canary.shadow else canary.weight, shadow=canary.shadow)
    return route


def repair_routes(svc: Services, model: str, versions: list[VersionInfo]) -> list[str]:
    """Router and TorchServe back to the recorded state of ``model``; lines for what changed."""
    want = desired_route(svc, model, versions)
    if want is None:
        return []
    have = svc.router.routes().get(model, {})
    actions = []
    registered = set(svc.backend.versions(model))
    for version in filter(None, (want["stable"], want.get("canary"))):
        if version not in registered:
            archive = svc.paths.model_store / archive_name(model, version)
            if archive.exists():
                svc.backend.register(model, version, archive)
                actions.append(f"{model} v{version}: re-registered on TorchServe from {archive.name}")
    if _route_key(have) != _route_key(want):
        if want.get("canary"):
            svc.router.set_split(model, want["stable"], want["canary"], want["weight"], shadow=want["shadow"])
        else:
            svc.router.set_route(model, want["stable"])
        svc.backend.set_default(model, want["stable"])
        actions.append(f"{model}: router had {_route_key(have)}, recorded state is {_route_key(want)}; repaired")
    return actions


def _route_key(route: dict[str, Any]) -> str:
    if not route:
        return "no route"
    if route.get("canary"):
        mode = "shadow" if route.get("shadow") else f"{float(route.get('weight', 0)):g}%"
        return f"v{route['stable']} + v{route['canary']} at {mode}"
    return f"v{route.get('stable')} alone"
