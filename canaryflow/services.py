"""The real implementations behind the release's interfaces, built from settings on first use."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from canaryflow.core.paths import StatePaths
from canaryflow.core.registry import MlflowRegistry
from canaryflow.core.settings import Settings, get_settings
from deployments import torchserve
from deployments.router import NginxRouter


@dataclass
class Services:
    """Registry, serving backend and router of one stack."""

    settings: Settings

    @cached_property
    def paths(self) -> StatePaths:
        return StatePaths(self.settings.state_dir)

    @cached_property
    def registry(self) -> MlflowRegistry:
        return MlflowRegistry(self.settings.mlflow_uri)

    @cached_property
    def backend(self) -> torchserve.TorchServeClient:
        return torchserve.TorchServeClient(self.settings, self.paths)

    @cached_property
    def router(self) -> NginxRouter:
        return local_router(self.settings, self.paths)


def local_router(settings: Settings, paths: StatePaths) -> NginxRouter:
    """The nginx router in front of the local TorchServe, holding TorchServe's current inference key."""
    return NginxRouter(settings, paths, lambda: torchserve.read_keys(paths)["inference"])


def get_services(settings: Settings | None = None) -> Services:
    return Services(settings or get_settings())
