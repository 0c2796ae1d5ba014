"""Make serving match a desired state: the one place that changes what TorchServe, the router and the registry
aliases serve. Promotion, stopping a release, every ramp step, the bake and its undo, aborting a release, a manual
rollback and reconcile's repair all call :func:`converge`; the key watch re-registers through
:func:`register_from_store`.

The order is the safe one: every version the route names is registered first (re-registered from the model store
when TorchServe lost it), then the router moves traffic, then TorchServe's default follows the stable version,
and the aliases move last, so no step sends a request to a version that cannot answer it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from canaryflow.core import seal
from canaryflow.core.errors import ServingError
from canaryflow.core.state import Route
from canaryflow.services import Services
from deployments.archive import is_chaos_build
from deployments.torchserve import ServingBackend, archive_name


class ArchiveMissing(ServingError):
    """A version's .mar is gone from the model store: it cannot be served until it is released again."""


class ChaosBuild(ServingError):
    """A chaos build (fault injection in its handler) would become stable or champion: never, unless the operator
    runs a drill that allows it (``canary.chaos_may_promote``)."""


def refuses_promotion(svc: Services, model: str, version: str) -> bool:
    """Whether ``version`` must never serve as stable or champion: its archive in the model store is a chaos build
    and the operator has not allowed chaos builds to be promoted."""
    if svc.settings.canary.chaos_may_promote:
        return False
    return is_chaos_build(svc.paths.model_store / archive_name(model, version))


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep()  # leave an alias as it is
DELETE: Final = None  # remove an alias


def register_from_store(backend: ServingBackend, model_store: Path, model: str, version: str) -> bool:
    """Register ``version`` from its archive in the model store unless TorchServe has it; True when registered
    now. Raises ServingError when the archive is gone (it cannot serve until it is released again)."""
    if version in backend.versions(model):
        return False
    archive = model_store / archive_name(model, version)
    if not archive.exists():
        raise ArchiveMissing(f"{model} v{version}: {archive.name} is missing from the model store; it cannot be "
                           "served until it is released again")
    return backend.register(model, version, archive)


def follow_share(backend: ServingBackend, model: str, want: Route) -> None:
    """On a backend that scales each version (Kubernetes: ``scale_for_share``), the canary's replicas follow its
    traffic share (all of it in shadow: it gets a copy of every request); stable keeps its full bounds, so it can
    take all the traffic back at a rollback without waiting for pods."""
    scale = getattr(backend, "scale_for_share", None)
    if scale is None:
        return
    scale(model, want.stable, 100.0)
    if want.canary:
        scale(model, want.canary, 100.0 if want.shadow else want.weight)


def converge(svc: Services, model: str, want: Route | None, *, champion: str | None | _Keep = KEEP,
             previous: str | None | _Keep = KEEP) -> list[str]:
    """Make serving match ``want`` (None: stop routing ``model``) and, when given, the ``champion`` and
    ``previous`` aliases (a version, :data:`DELETE` or :data:`KEEP`); returns a line per change made.

    Idempotent: what already matches is not touched, so callers need not check first. Raises ServingError before
    moving any traffic when a version of ``want`` cannot be registered, and :class:`ChaosBuild` when a chaos build
    would become stable or champion."""
    for version in {want.stable if want else None, champion if isinstance(champion, str) else None} - {None}:
        if refuses_promotion(svc, model, version):
            raise ChaosBuild(f"{model} v{version} is a chaos build (fault injection): it is never made stable or "
                             "champion (canary.chaos_may_promote is off)")
    if isinstance(champion, str) and not (svc.paths.model_store / archive_name(model, champion)).is_file():
        raise ArchiveMissing(f"{model} v{champion}: {archive_name(model, champion)} is missing from the model "
                             "store; it cannot be made champion (its seal records that archive's sha256)")
    changes = []
    if want is None:
        if svc.router.route(model) is not None:
            svc.router.remove_route(model)
            changes.append(f"{model}: no longer routed")
    else:
        for version in want.versions:
            if register_from_store(svc.backend, svc.paths.model_store, model, version):
                changes.append(f"{model} v{version}: re-registered on TorchServe from {archive_name(model, version)}")
        have = svc.router.route(model)
        if have != want:
            if want.canary:
                svc.router.set_split(model, want.stable, want.canary, want.weight, shadow=want.shadow)
            else:
                svc.router.set_route(model, want.stable)
            changes.append(f"{model}: route {have.describe() if have else 'none'} -> {want.describe()}")
        follow_share(svc.backend, model, want)
        svc.backend.set_default(model, want.stable)
    cfg = svc.settings.release
    for alias, value in ((cfg.previous_alias, previous), (cfg.champion_alias, champion)):
        if isinstance(value, _Keep):
            continue
        if alias == cfg.champion_alias:  # the sealed record first: the alias is only a view of it
            archive = svc.paths.model_store / archive_name(model, value) if value else None
            seal.seal_champion(svc.registry, svc.paths, model, value, archive)
        if value is None:
            svc.registry.delete_alias(model, alias)
        else:
            svc.registry.set_alias(model, alias, value)
        changes.append(f"{model}: alias {alias} -> {f'v{value}' if value else 'removed'}")
    return changes
