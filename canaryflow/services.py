"""The platform behind the release's interfaces: which :class:`Registry`, :class:`ServingBackend`,
:class:`TrafficRouter`, :class:`MetricsSource` and :class:`Launcher` a stack uses, chosen from settings
(``platform``) and each built on first use. Callers see only the Protocols, so another platform is one more entry
in :data:`PLATFORMS`, with no caller touched; unit tests pass fakes (tests/unit/fakes.py) instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from canaryflow.core.errors import ConfigError
from canaryflow.core.paths import StatePaths
from canaryflow.core.registry import MlflowRegistry, Registry
from canaryflow.core.settings import Settings, get_settings
from canaryflow.intake.launcher import Launcher, PrefectLauncher
from deployments import torchserve
from deployments.metrics import AccessLogMetrics, MetricsSource
from deployments.router import NginxRouter
from deployments.routes import TrafficRouter
from deployments.torchserve import ServingBackend

Factory = Callable[[Settings, StatePaths], Any]


@dataclass(frozen=True)
class Platform:
    """How one platform builds each interface from settings and the state paths."""

    registry: Factory
    backend: Factory
    router: Factory
    metrics: Factory
    launcher: Factory


def local_router(settings: Settings, paths: StatePaths) -> NginxRouter:
    """The nginx router in front of the local TorchServe, holding TorchServe's current inference key."""
    return NginxRouter(settings, paths, lambda: torchserve.read_keys(paths)["inference"])


PLATFORMS: dict[str, Platform] = {
    "local": Platform(
        registry=lambda s, p: MlflowRegistry(s.mlflow_uri),
        backend=lambda s, p: torchserve.TorchServeClient(s, p),
        router=local_router,
        metrics=lambda s, p: AccessLogMetrics(p.router_access_log, p.feedback_file),
        launcher=lambda s, p: PrefectLauncher(s.prefect_api_url, s.prefect.release_deployment),
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
        return StatePaths(self.settings.state_dir)

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


def get_services(settings: Settings | None = None) -> Services:
    return Services(settings or get_settings())
