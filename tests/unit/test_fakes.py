"""The shared fakes stand in for the real interfaces: every method of each Protocol, with the same parameters."""

from __future__ import annotations

import inspect

import pytest
from fakes import FakeBackend, FakeLauncher, FakeRegistry, FakeRouter

from canaryflow.core.registry import MlflowRegistry, Registry
from canaryflow.intake.launcher import Launcher, PrefectLauncher
from deployments.router import NginxRouter
from deployments.routes import TrafficRouter
from deployments.torchserve import ServingBackend, TorchServeClient


def _methods(protocol: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(protocol).items()
            if callable(fn) and not name.startswith("_")}


@pytest.mark.parametrize(("protocol", "impls"), [
    (Registry, [FakeRegistry, MlflowRegistry]),
    (ServingBackend, [FakeBackend, TorchServeClient]),
    (TrafficRouter, [FakeRouter, NginxRouter]),
    (Launcher, [FakeLauncher, PrefectLauncher]),
])
def test_fakes_and_real_implementations_have_every_protocol_method(protocol: type, impls: list[type]) -> None:
    wanted = _methods(protocol)
    assert wanted, protocol
    for impl in impls:
        for name, signature in wanted.items():
            assert hasattr(impl, name), f"{impl.__name__} lacks {protocol.__name__}.{name}"
            have = inspect.signature(getattr(impl, name))
            assert list(have.parameters) == list(signature.parameters), (impl.__name__, name, have, signature)
