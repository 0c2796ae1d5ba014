"""Manual rollback, and aborting a ramp: traffic, TorchServe default and aliases back to a released version.

``rollback(model, to=None)`` restores the ``previous`` alias (or the named version, which must have been released),
records who and why (version tags, a registered-model tag with the last rollback, an MLflow run) and is safe to
run twice: when the target already serves alone, it changes nothing. A ramp in progress is aborted first: its
persisted status becomes ``rolled_back``, which the release flow reads at its next analysis and stops.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

from canaryflow.core import locks, seal
from canaryflow.core.errors import RegistryError, ServingError
from canaryflow.core.state import ReleaseStatus, Route, Tag
from canaryflow.release.converge import DELETE, KEEP, converge
from canaryflow.release.narrate import describe_update
from canaryflow.release.ramp import load_status, save_status
from canaryflow.services import Services
from deployments.canary import Phase
from deployments.torchserve import archive_name


def abort_release(svc: Services, model: str, version: str, reason: str,
                  status: ReleaseStatus = ReleaseStatus.ROLLED_BACK) -> str:
    """Take a candidate off the router and TorchServe, end its ramp, tag it; the champion keeps serving.

    Under the model's state lock: a ramp analysis cannot re-apply its split in between."""
    with locks.hold(svc, model, f"abort the release of v{version}"):
        return _abort(svc, model, version, reason, status)


def _abort(svc: Services, model: str, version: str, reason: str, status: str) -> str:
    canary = load_status(svc, model, version)
    route = svc.router.route(model)
    champion = seal.trusted_champion(svc.registry, svc.paths, model)
    if route is not None and (route.canary == version or (route.stable == version and champion != version)):
        converge(svc, model, Route(champion) if champion else None)
    if canary is not None and not canary.done:
        save_status(svc, model, replace(canary, phase=Phase.ROLLED_BACK, weight=0.0, reasons=[reason]))
    if version != champion:
        svc.backend.unregister(model, version)
    svc.registry.set_tags(model, version, {Tag.STATUS: status, Tag.REASON: reason})
    describe_update(svc, model, version, f"{status}: {reason}" + (f"; v{champion} serves" if champion else ""))
    return f"{model} v{version} {status}: {reason}"


def rollback(svc: Services, model: str, to: str | None, reason: str, actor: str) -> dict[str, str]:
    """Serve ``to`` (default: the ``previous`` alias) as champion again; returns what was done.

    Under the model's state lock, so a ramp in progress sees ROLLED_BACK at its next analysis and stops."""
    with locks.hold(svc, model, "roll back"):
        return _rollback(svc, model, to, reason, actor)


def _rollback(svc: Services, model: str, to: str | None, reason: str, actor: str) -> dict[str, str]:
    cfg = svc.settings.release
    champion = seal.trusted_champion(svc.registry, svc.paths, model)
    last = json.loads(svc.registry.model_tags(model).get(Tag.LAST_ROLLBACK) or "{}")
    target = to or svc.registry.alias_version(model, cfg.previous_alias)
    if target is None:
        if last.get("to") == champion and champion is not None:
            return _same(champion, f"already rolled back to v{champion} by {last.get('by')}")
        raise RegistryError(f"{model} has no {cfg.previous_alias!r} alias to roll back to; name a version with --to")
    info = svc.registry.get_version(model, target)
    if info.tags.get(Tag.STATUS) != ReleaseStatus.RELEASED:
        raise RegistryError(f"v{target} of {model} was never released (status {info.tags.get(Tag.STATUS)!r}); "
                            "roll back only to a version that passed its release")
    unsealed = seal.released_archive(svc.registry, svc.paths, model, target,
                                     svc.paths.model_store / archive_name(model, target))
    if unsealed:  # the status tag and the previous alias are editable by any registry user; the seal is not
        raise RegistryError(unsealed)
    route = svc.router.route(model)
    for version in _ramping(svc, model):
        abort_release(svc, model, version, f"ramp aborted by a manual rollback ({actor}: {reason})")
    if champion == target and route == Route(target):
        return _same(target, f"v{target} is already the champion and serves alone")
    replaced = champion is not None and champion != target
    converge(svc, model, Route(target), champion=target, previous=DELETE if replaced else KEEP)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    note = f"manual rollback to v{target} by {actor} at {when}: {reason}"
    if replaced:
        svc.registry.set_tags(model, champion, {Tag.STATUS: ReleaseStatus.ROLLED_BACK, Tag.REASON: note,
                                                Tag.ROLLBACK_BY: actor})
        describe_update(svc, model, str(champion), f"rolled back: {note}; v{target} serves as champion again")
        try:
            svc.backend.unregister(model, champion)
        except ServingError:
            pass  # it no longer gets traffic; a leftover registration is harmless
    again = f"serving as champion again after a {note}"
    svc.registry.set_tags(model, target, {Tag.RESTORED: note, Tag.REASON: again})  # not the stale "replaced by"
    describe_update(svc, model, target, again)
    record = {"from": champion, "to": target, "by": actor, "reason": reason, "at": when}
    svc.registry.set_model_tag(model, Tag.LAST_ROLLBACK, json.dumps(record))
    _log_run(svc, model, record)
    return {"changed": "true", "champion": target, "from": champion or "", "reason": note}


def _same(version: str, why: str) -> dict[str, str]:
    return {"changed": "false", "champion": version, "from": version, "reason": why}


def _ramping(svc: Services, model: str) -> list[str]:
    """Versions with a ramp in progress (persisted status not finished)."""
    out = []
    for v in svc.registry.list_versions(model):
        if v.tags.get(Tag.STATUS) == ReleaseStatus.CANARY and v.tags.get(Tag.CANARY):
            status = load_status(svc, model, v.version)
            if status is not None and not status.done:
                out.append(v.version)
    return out


def _log_run(svc: Services, model: str, record: dict[str, str | None]) -> None:
    """An MLflow run in the release experiment, so rollbacks show next to releases in the UI."""
    svc.registry.record_run(svc.settings.release.experiment, f"rollback v{record['from']} → v{record['to']} of {model}",
                            {Tag.MODEL: model, Tag.KIND: "rollback"},
                            {k: v or "none" for k, v in record.items()})
