"""PrefectLauncher against a real `prefect server start` on loopback (SQLite under a temp dir)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from canaryflow.core.errors import OrchestrationError
from canaryflow.intake.launcher import PrefectLauncher, release_run_name

pytestmark = pytest.mark.integration

PREFECT = Path(sys.executable).with_name("prefect")
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and anything it spawned (its own process group, created by us)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[str]:
    home = Path(tempfile.mkdtemp(prefix="canaryflow-prefect-", dir="/tmp"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
    )
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-services"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                tail = (home / "server.log").read_text()[-2000:]
                pytest.fail(f"prefect server exited {proc.returncode}: {tail}")
            try:
                if httpx.get(f"{api}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after {START_TIMEOUT_S} s")
            time.sleep(0.3)
        yield api
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def deployment(prefect_api: str) -> str:
    """A fresh flow + deployment shaped like the release flow (parameter schema enforced, no worker)."""
    flow_name = f"release-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=prefect_api, timeout=10) as client:
        flow = client.post("/flows/", json={"name": flow_name})
        flow.raise_for_status()
        created = client.post("/deployments/", json={
            "name": "release",
            "flow_id": flow.json()["id"],
            "enforce_parameter_schema": True,
            "parameter_openapi_schema": {
                "type": "object", "title": "Parameters",
                "properties": {"model_name": {"type": "string"}, "version": {"type": "string"}},
                "required": ["model_name", "version"],
            },
        })
        created.raise_for_status()
    return f"{flow_name}/release"


def test_same_key_twice_gives_one_run(prefect_api: str, deployment: str) -> None:
    launcher = PrefectLauncher(prefect_api, deployment=deployment)
    first = launcher.start_release("iris", "3", idempotency_key="mlflow-webhook:d-1")
    second = launcher.start_release("iris", "3", idempotency_key="mlflow-webhook:d-1")
    assert first == second
    runs = launcher.list_flow_runs("iris", "3")
    assert [r["id"] for r in runs] == [first]
    assert runs[0]["name"] == release_run_name("iris", "3")
    assert runs[0]["parameters"] == {"model_name": "iris", "version": "3"}
    assert runs[0]["idempotency_key"] == "mlflow-webhook:d-1"
    assert runs[0]["state_type"] == "SCHEDULED"


def test_concurrent_same_key_gives_one_run(prefect_api: str, deployment: str) -> None:
    launcher = PrefectLauncher(prefect_api, deployment=deployment)
    with ThreadPoolExecutor(6) as pool:
        ids = set(pool.map(lambda _: launcher.start_release("iris", "4", "mlflow-webhook:d-par"), range(6)))
    assert len(ids) == 1
    assert launcher.count_runs("iris", "4") == 1


def test_other_key_gives_another_run(prefect_api: str, deployment: str) -> None:
    launcher = PrefectLauncher(prefect_api, deployment=deployment)
    a = launcher.start_release("iris", "5", idempotency_key="k-a")
    b = launcher.start_release("iris", "5", idempotency_key="k-b")
    launcher.start_release("iris", "6", idempotency_key="k-c")
    assert a != b
    assert launcher.count_runs("iris", "5") == 2
    assert launcher.count_runs("iris", "6") == 1
    assert launcher.count_runs("other", "5") == 0


def test_unknown_deployment(prefect_api: str) -> None:
    launcher = PrefectLauncher(prefect_api, deployment="no-such-flow/release")
    with pytest.raises(OrchestrationError, match="not found") as err:
        launcher.start_release("iris", "1", idempotency_key="k")
    assert err.value.status_code == 404


def test_healthy(prefect_api: str) -> None:
    assert PrefectLauncher(prefect_api).healthy()
    assert not PrefectLauncher(f"http://127.0.0.1:{free_port()}/api").healthy()


def test_server_down() -> None:
    launcher = PrefectLauncher(f"http://127.0.0.1:{free_port()}/api", timeout_s=2)
    started = time.monotonic()
    with pytest.raises(OrchestrationError, match="cannot reach") as err:
        launcher.start_release("iris", "1", idempotency_key="k")
    assert err.value.status_code is None
    assert time.monotonic() - started < 2


def test_server_that_never_answers_times_out() -> None:
    with socket.socket() as sock:  # accepts connections (backlog) but never replies
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        launcher = PrefectLauncher(f"http://127.0.0.1:{sock.getsockname()[1]}/api", timeout_s=0.5)
        with pytest.raises(OrchestrationError, match="within 0.5 s"):
            launcher.start_release("iris", "1", idempotency_key="k")

