"""Shared fixtures: a real local stack on free loopback ports, started once per session."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PORT_NAMES = ["router", "mlflow", "prefect", "torchserve_inference", "torchserve_management",
              "torchserve_metrics", "torchserve_grpc_inference", "torchserve_grpc_management", "bridge"]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (held open together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stack_env(state_dir: Path) -> dict[str, str]:
    """CANARYFLOW_* variables for a stack of our own: its state dir and free ports."""
    # Short load tests keep each release of the suite at a few seconds of locust.
    # A lighter offered load: the suite's own processes share the 2 cores with the servers under test.
    env = {"CANARYFLOW_STATE_DIR": str(state_dir), "CANARYFLOW_LOADTEST__DURATION_S": "4",
           "CANARYFLOW_LOADTEST__TARGET_RPS": "40", "CANARYFLOW_LOADTEST__MIN_RPS": "20",
           # A short ramp with fault injection allowed (tests/e2e/test_canary.py); the defaults are 5/25/50/100 %
           # every 30 s with 50 requests per version.
           "CANARYFLOW_CANARY__STEPS": "[20, 50, 100]", "CANARYFLOW_CANARY__INTERVAL_S": "3",
           "CANARYFLOW_CANARY__MIN_REQUESTS": "25", "CANARYFLOW_CANARY__STEP_DEADLINE_S": "90",
           "CANARYFLOW_CANARY__RETIRE_GRACE_S": "2", "CANARYFLOW_CANARY__BAKE_S": "4",
           "CANARYFLOW_CANARY__ALLOW_CHAOS": "true",
           # the bake-watch test promotes a chaos build armed after promotion; tests/unit/test_ramp_ops.py proves
           # that by default a chaos build is rolled back where it would be promoted
           "CANARYFLOW_CANARY__CHAOS_MAY_PROMOTE": "true",
           "CANARYFLOW_RECONCILE__MISSED_AFTER_S": "15", "CANARYFLOW_LOADTEST__RETRY_PAUSE_S": "1",
           # serving settings are tried on a staged candidate in tests/integration/test_loadtest_router.py only
           # (each setting is a re-registration and a burst: seconds per release)
           "CANARYFLOW_LOADTEST__TUNE": "[]",
           # the suite's own models loosen bars on purpose (a busy machine's load test, replay off, no canary);
           # tests/unit/test_registry_input_unit.py proves the default refuses that
           "CANARYFLOW_RELEASE__ALLOW_POLICY_LOOSENING": "true"}
    for name, port in zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True):
        env[f"CANARYFLOW_PORTS__{name.upper()}"] = str(port)
    # Python worker ports of TorchServe: a block unlikely to be in use by another stack.
    env["CANARYFLOW_PORTS__TORCHSERVE_WORKER_BASE"] = str(20000 + (os.getpid() % 400) * 20)
    return env


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that do not use the shared stack run before it starts (the demo starts a whole stack of its own and
    load-tests on it: the shared one idling beside it costs it its p95); tests that stop the shared stack run
    last. The key-renewal check sorts with the stack's tests: its soak runs beside the stack
    (tests/key_renewal_soak.py)."""
    items.sort(key=lambda item: (item.get_closest_marker("stops_stack") is not None,
                                 bool({"stack", "key_renewal_soak"} & set(getattr(item, "fixturenames", ())))))


@pytest.fixture
def default_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Default settings, whatever the session's stack put in the environment (CANARYFLOW_* unset)."""
    from canaryflow.core.settings import reset_settings

    for key in list(os.environ):
        if key.startswith("CANARYFLOW_"):
            monkeypatch.delenv(key)
    reset_settings()
    yield
    reset_settings()


@pytest.fixture(scope="session")
def kube_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real kube-apiserver (+ etcd) on loopback with the Gateway API CRDs, for the session (tests/kubeapi.py);
    ``.kubeconfig`` is its admin kubeconfig. No kubelet: Pods never run."""
    from tests.kubeapi import KubeApiServer

    server = KubeApiServer(tmp_path_factory.mktemp("kubeapi")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[object]:
    """The real local stack (MLflow, Prefect server + worker, TorchServe, nginx, bridge) for this session."""
    from canaryflow.core.settings import Settings, reset_settings
    from canaryflow.local.stack import LocalStack
    from tests.key_renewal_soak import start_soak

    env = stack_env(tmp_path_factory.mktemp("stack") / ".canaryflow")
    start_soak(request.session, tmp_path_factory, beside=env)  # only when its test is selected; 3 min in background
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_settings()
    local = LocalStack(Settings())
    try:
        local.up(progress=lambda msg: None)
        yield local
    finally:
        local.down()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_settings()


# -- Prefect servers nobody asked for ---------------------------------------------------------------------------
# A Prefect client used without PREFECT_API_URL starts a temporary server of its own (ephemeral mode) that runs to
# the end of the session and is stopped at interpreter exit, when pytest's streams are closed (a page of "I/O
# operation on closed file" at the end of the log). Each such server is attributed to the test after which it
# first ran, named in the terminal summary, and stopped here. A prefect_test_harness server is stopped by its
# fixture before the session ends, so it is never reported.
_first_seen: dict[int, str] = {}


def _running_prefect_servers() -> dict[int, object]:
    server = sys.modules.get("prefect.server.api.server")
    if server is None:
        return {}
    instances = list(getattr(server.SubprocessASGIServer, "_instances", {}).values())
    return {id(s): s for s in instances if getattr(s, "server_process", None) is not None}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    yield
    for key in _running_prefect_servers():
        _first_seen.setdefault(key, item.nodeid)


def pytest_terminal_summary(terminalreporter: object, exitstatus: int) -> None:
    for key, server in _running_prefect_servers().items():
        where = _first_seen.get(key, "before any test ended")
        terminalreporter.write_line(  # type: ignore[attr-defined]
            f"a temporary Prefect server ({getattr(server, 'address', '?')}) was still running at the end; it first "
            f"ran after {where} (a Prefect client without PREFECT_API_URL); stopping it")
        server.stop()  # type: ignore[attr-defined]
