"""The platform behind the release's interfaces: which :class:`Registry`, :class:`ServingBackend`,
:class:`TrafficRouter`, :class:`MetricsSource`, :class:`Launcher` and model locks a stack uses, chosen from settings
(``platform``) and each built on first use. Callers see only the Protocols, so another platform is one more entry
in :data:`PLATFORMS`, with no caller touched; unit tests pass fakes (tests/unit/fakes.py) instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from canaryflow.core.errors import ConfigError
from canaryflow.core.locks import RELEASE_SLOT, STATE_LOCK, ModelLocks, file_locks
from canaryflow.core.paths import StatePaths
from canaryflow.core.registry import MlflowRegistry, Registry, Tag, sha256_of
from canaryflow.core.settings import Settings, get_settings
from canaryflow.intake.launcher import Launcher, prefect_launcher
from deployments import torchserve
from deployments.metrics import AccessLogMetrics, MetricsSource
from deployments.prometheus import PrometheusMetricsSource
from deployments.router import NginxRouter
from deployments.routes import TrafficRouter
from deployments.torchserve import ServingBackend

if TYPE_CHECKING:  # the kubernetes client takes a quarter second to import: only the kubernetes platform pays it
    from deployments.kubernetes.backend import KubernetesBackend
    from deployments.kubernetes.gateway import GatewayApiRouter

Factory = Callable[[Settings, StatePaths], Any]
LocksFactory = Callable[[Settings, StatePaths, str, float], ModelLocks]  # (settings, paths, kind, timeout_s)


@dataclass(frozen=True)
class Platform:
    """How one platform builds each interface from settings and the state paths."""

    registry: Factory
    backend: Factory
    router: Factory
    metrics: Factory
    launcher: Factory
    locks: LocksFactory = lambda s, p, kind, timeout_s: file_locks(p.root, kind, timeout_s)


def local_router(settings: Settings, paths: StatePaths) -> NginxRouter:
    """The nginx router in front of the local TorchServe, holding TorchServe's current inference key and routing
    the versions TorchServe serves with adaptive batching."""
    return NginxRouter(settings, paths, lambda: torchserve.read_keys(paths)["inference"],
                       batched_provider=lambda: torchserve.batched_twins(paths))


def local_backend(settings: Settings, paths: StatePaths) -> torchserve.TorchServeClient:
    """The local TorchServe; the router's table follows each batched twin it registers or removes."""
    return torchserve.TorchServeClient(settings, paths,
                                       on_batched_change=lambda: local_router(settings, paths).refresh())


def local_metrics(settings: Settings, paths: StatePaths) -> MetricsSource:
    """The router's access log, or Prometheus scraping TorchServe (``metrics.source=prometheus``)."""
    if settings.metrics.source == "prometheus":
        return PrometheusMetricsSource(settings.prometheus_url)
    return AccessLogMetrics(paths.router_access_log, paths.feedback_file)


def mlflow_archive_source(settings: Settings) -> Callable[[str, str, Path], tuple[str, str]]:
    """Where a cluster fetches a version's .mar: the release run's ``torchserve/`` artifact through the tracking
    server, with the sha256 of the archive the pipeline checked. The run comes from the version's release_run tag,
    which a registry user can write: a forged one fetches another file, whose sha256 the pod refuses."""
    registry = MlflowRegistry(settings.mlflow_uri)

    def source(model: str, version: str, archive: Path) -> tuple[str, str]:
        run_id = registry.get_version(model, version).tags.get(Tag.RELEASE_RUN)
        if not run_id:
            raise ConfigError(f"{model} v{version} has no release run: release it before serving it on a cluster")
        return registry.artifact_url(run_id, f"torchserve/{archive.name}"), sha256_of(archive)

    return source


def kubernetes_backend(settings: Settings, paths: StatePaths) -> KubernetesBackend:
    from deployments.kubernetes.backend import KubernetesBackend

    return KubernetesBackend(settings, archive_source=mlflow_archive_source(settings),
                             mlflow_auth_secret=settings.kubernetes.mlflow_auth_secret)


def kubernetes_router(settings: Settings, paths: StatePaths) -> GatewayApiRouter:
    """One HTTPRoute per model in front of the per-version Services."""
    from deployments.kubernetes.gateway import GatewayApiRouter

    return GatewayApiRouter.for_settings(settings)


_lease_locks: dict[tuple[Any, ...], ModelLocks] = {}


def kubernetes_locks(settings: Settings, paths: StatePaths, kind: str, timeout_s: float) -> ModelLocks:
    """Leases in the namespace (every flow run is a pod of its own: a file lock there excludes nothing); one
    instance per cluster, kind and timeout in a process, so a thread's re-entrant hold is seen across callers."""
    from deployments.kubernetes.apply import load_api_client
    from deployments.kubernetes.lease import LeaseLocks

    k = settings.kubernetes
    key = (k.kubeconfig, k.context, k.namespace, kind, float(timeout_s), k.lease_s)
    if key not in _lease_locks:
        _lease_locks[key] = LeaseLocks(load_api_client(k), k.namespace, kind, timeout_s, k.lease_s)
    return _lease_locks[key]


PLATFORMS: dict[str, Platform] = {
    "local": Platform(
        registry=lambda s, p: MlflowRegistry(s.mlflow_uri),
        backend=local_backend,
        router=local_router,
        metrics=local_metrics,
        launcher=lambda s, p: prefect_launcher(s),
    ),
    # TorchServe per version on a cluster, Gateway API HTTPRoutes, Prometheus (the gateway has no access log here)
    "kubernetes": Platform(
        registry=lambda s, p: MlflowRegistry(s.mlflow_uri),
        backend=kubernetes_backend,
        router=kubernetes_router,
        metrics=lambda s, p: PrometheusMetricsSource(s.prometheus_url),
        launcher=lambda s, p: prefect_launcher(s),
        locks=kubernetes_locks,
    ),
}


class Services:
    """Registry, serving backend, router, metrics source and launcher of one stack. Any of them can be given
    (tests, tools); the others come from the settings' platform."""

    def __init__(self, settings: Settings, *, registry: Registry | None = None,
                 backend: ServingBackend | None = None, router: TrafficRouter | None = None,
                 metrics: MetricsSource | None = None, launcher: Launcher | None = None) -> None:
        self.settings = settings
        given = {"registry": registry, "backend": backend, "router": router, "metrics": metrics,
                 "launcher": launcher}
        self.__dict__.update({name: impl for name, impl in given.items() if impl is not None})

    @cached_property
    def paths(self) -> StatePaths:
        return StatePaths.of(self.settings)

    @cached_property
    def platform(self) -> Platform:
        try:
            return PLATFORMS[self.settings.platform]
        except KeyError:
            raise ConfigError(f"platform {self.settings.platform!r} is not one of {sorted(PLATFORMS)}") from None

    @cached_property
    def registry(self) -> Registry:
        return self.platform.registry(self.settings, self.paths)

    @cached_property
    def backend(self) -> ServingBackend:
        return self.platform.backend(self.settings, self.paths)

    @cached_property
    def router(self) -> TrafficRouter:
        return self.platform.router(self.settings, self.paths)

    @cached_property
    def metrics(self) -> MetricsSource:
        return self.platform.metrics(self.settings, self.paths)

    @cached_property
    def launcher(self) -> Launcher:
        return self.platform.launcher(self.settings, self.paths)

    @cached_property
    def locks(self) -> ModelLocks:
        """Each model's state lock: the ramp, a rollback, reconcile's repairs and a retirement take turns."""
        return self.platform.locks(self.settings, self.paths, STATE_LOCK, self.settings.reconcile.lock_timeout_s)

    def release_slots(self, timeout_s: float) -> ModelLocks:
        """Each model's release slot (one release run at a time), waiting at most ``timeout_s``."""
        return self.platform.locks(self.settings, self.paths, RELEASE_SLOT, timeout_s)


def get_services(settings: Settings | None = None) -> Services:
    return Services(settings or get_settings())
