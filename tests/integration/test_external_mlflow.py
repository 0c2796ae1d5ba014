"""A release against an MLflow server that `canaryflow up` did not start: a separately started
``mlflow server --app-name basic-auth`` on another port, reached with basic auth read from a 0600 file. The
release runs on the shared stack's real Prefect worker, TorchServe and router; only MLflow is the team's."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from canaryflow.core.errors import RegistryError
from canaryflow.core.registry import MlflowRegistry
from canaryflow.core.settings import Settings, reset_settings
from canaryflow.local.demo import register_model, wait_for_release
from tests.conftest import free_ports

pytestmark = pytest.mark.integration
MODEL = "external-mlflow-model"
USER = "canaryflow-ci"


class ExternalMlflow:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_password = secrets.token_urlsafe(18)
        self.password = secrets.token_urlsafe(18)
        self.password_file = root / "mlflow-password"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        ini = self.root / "basic_auth.ini"
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = sqlite:///{self.root / 'auth.db'}\n"
                       f"admin_username = admin\nadmin_password = {self.admin_password}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CANARYFLOW_"))}
        env.update({"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
                    "MLFLOW_ENABLE_TELEMETRY": "false"})
        log = (self.root / "mlflow.log").open("ab")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "mlflow.log").read_text()[-2000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError("the external MLflow server did not become healthy")
        # a user of its own (not the admin), with the right to create models and experiments
        resp = httpx.post(f"{self.url}/api/2.0/mlflow/users/create", auth=("admin", self.admin_password),
                          json={"username": USER, "password": self.password}, timeout=30)
        assert resp.status_code == 200, resp.text
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


@pytest.fixture(scope="module")
def external_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExternalMlflow]:
    server = ExternalMlflow(tmp_path_factory.mktemp("external-mlflow"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _external_env(server: ExternalMlflow, password_file: Path | None = None) -> dict[str, str]:
    env = {"CANARYFLOW_EXTERNAL__MLFLOW_TRACKING_URI": server.url}
    if password_file is not None:
        env.update({"CANARYFLOW_EXTERNAL__MLFLOW_USERNAME": USER,
                    "CANARYFLOW_EXTERNAL__MLFLOW_PASSWORD_FILE": str(password_file)})
    return env


def test_without_credentials_the_team_mlflow_refuses_and_says_so(stack, external_mlflow, monkeypatch) -> None:
    for key, value in _external_env(external_mlflow).items():
        monkeypatch.setenv(key, value)
    reset_settings()
    try:
        with pytest.raises(RegistryError, match="(?i)401|unauthori|credential"):
            MlflowRegistry(Settings().mlflow_uri).alias_version("anything", "champion")
    finally:
        monkeypatch.undo()
        reset_settings()


def test_a_release_runs_against_an_mlflow_server_canaryflow_did_not_start(stack, external_mlflow,
                                                                          monkeypatch) -> None:
    env = _external_env(external_mlflow, external_mlflow.password_file)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    try:
        from canaryflow.core.settings import get_settings
        from canaryflow.intake.launcher import prefect_launcher

        settings = get_settings()  # exports the basic-auth credentials for this process' MLflow client
        assert settings.mlflow_uri == external_mlflow.url
        version, rows, _ = register_model(settings.mlflow_uri, name=MODEL, seed=3)
        # the shared stack's worker runs it; the run's own environment names the team's MLflow and the password
        # FILE (its content never travels through Prefect)
        launcher = prefect_launcher(stack.settings)
        resp = httpx.post(f"{stack.settings.prefect_api_url}/deployments/{launcher.deployment_id()}/create_flow_run",
                          json={"parameters": {"model_name": MODEL, "version": version},
                                "job_variables": {"env": env}}, timeout=30)
        assert resp.status_code in (200, 201), resp.text
        run_id = resp.json()["id"]
        outcome = wait_for_release(settings.mlflow_uri, MODEL, version, timeout_s=300)
        assert outcome.status == "released", outcome.reason
        # served by the local TorchServe behind the router, from the archive logged to the team's artifact store
        answer = httpx.post(f"{stack.settings.router_url}/predictions/{MODEL}", json={"inputs": rows[:3].tolist()},
                            timeout=30)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["predictions"]) == 3
        assert MlflowRegistry(settings.mlflow_uri).alias_version(MODEL, "champion") == version
        # the password is in no log line of the run and nowhere in the stack's state dir
        logs = httpx.post(f"{stack.settings.prefect_api_url}/logs/filter",
                          json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}, timeout=30).json()
        assert logs, "the release run logged nothing"
        assert not any(external_mlflow.password in entry["message"] for entry in logs)
        needle = external_mlflow.password.encode()
        leaked = [p for p in Path(stack.paths.root).rglob("*")
                  if p.is_file() and p.stat().st_size < 50_000_000 and needle in p.read_bytes()]
        assert leaked == []
    finally:
        monkeypatch.undo()
        reset_settings()
        from canaryflow.core.credentials import export_credentials

        export_credentials(Settings())  # the embedded MLflow again for the rest of the session
