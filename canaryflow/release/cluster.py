"""What ``canaryflow k8s render | apply | status`` do on the kubernetes platform (settings ``platform=kubernetes``):
the objects of a released version, serving it, and what the cluster serves now. The release flow itself needs none
of this: it drives the same backend and router through the Services interfaces."""

from __future__ import annotations

from typing import Any

from canaryflow.core import seal
from canaryflow.core.errors import ConfigError, ServingError
from canaryflow.core.state import Route
from canaryflow.release.converge import converge
from canaryflow.services import Services
from deployments.torchserve import archive_name


def _kubernetes(svc: Services) -> Any:
    if svc.settings.platform != "kubernetes":
        raise ConfigError("these commands act on a cluster: set CANARYFLOW_PLATFORM=kubernetes (and the "
                          "kubernetes.* settings: kubeconfig, namespace, gateway)")
    return svc.backend


def _released(svc: Services, model: str, version: str) -> Any:
    """The version's archive in the model store, when the pipeline released it with exactly that archive."""
    archive = svc.paths.model_store / archive_name(model, version)
    if not archive.is_file():
        raise ServingError(f"{model} v{version}: {archive.name} is not in the model store "
                           f"({svc.paths.model_store}); release the version first")
    refused = seal.released_archive(svc.registry, svc.paths, model, version, archive)
    if refused:
        raise ServingError(refused)
    return archive


def render(svc: Services, model: str, version: str) -> list[dict[str, Any]]:
    """The objects that serve ``version`` (ConfigMap, Service, Deployment, PDB, NetworkPolicy, HPA), as applied."""
    return _kubernetes(svc).objects(model, version, _released(svc, model, version))


def apply(svc: Services, model: str, version: str) -> list[str]:
    """Serve a released version as the model's only one: its objects applied and Available, all traffic routed to
    it, the previous versions left for the release flow's retirement. Returns a line per change."""
    _kubernetes(svc)
    _released(svc, model, version)
    return converge(svc, model, Route(version)) or [f"{model} v{version}: already served, nothing changed"]


def status(svc: Services) -> list[dict[str, Any]]:
    """Per routed model: its versions with their traffic weight and ready/desired replicas."""
    backend = _kubernetes(svc)
    out = []
    for model, route in sorted(svc.router.routes().items()):
        want = Route.of(route)
        weights: dict[str, float] = {}
        if want is not None:
            share = want.weight if want.canary and not want.shadow else 0.0  # shadow: copies, no live traffic
            weights[want.stable] = 100.0 - share
            if want.canary:
                weights[want.canary] = share
        versions = []
        for version in sorted(set(backend.versions(model)) | set(weights)):
            ready, desired = backend.replicas(model, version)
            versions.append({"version": version, "weight": weights.get(version, 0.0), "shadow": bool(
                want and want.shadow and want.canary == version), "ready": ready, "desired": desired})
        out.append({"model": model, "default": backend.default_version(model), "versions": versions})
    return out
