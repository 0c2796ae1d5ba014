"""The local stack (`canaryflow up | down | status`): every service on loopback under supervisord."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from cryptography.fernet import Fernet

from canaryflow.core.errors import StackError
from canaryflow.core.paths import StatePaths
from canaryflow.core.settings import Settings
from canaryflow.local import prometheus as local_prometheus
from canaryflow.local.demo import mlflow_ui_url
from canaryflow.local.supervisor import Program, Supervisor, render_config
from canaryflow.services import local_router
from deployments import torchserve

PROJECT_DIR = Path(__file__).resolve().parents[2]
WEBHOOK_EVENTS = ["model_version.created"]
Progress = Callable[[str], None]


@dataclass
class ServiceStatus:
    """One row of `canaryflow status`."""

    name: str
    url: str
    state: str
    pid: int | None
    healthy: bool


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _secret_file(path: Path, make: Callable[[], str]) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(make())
    return path.read_text().strip()


def child_env(settings: Settings, paths: StatePaths) -> dict[str, str]:
    """Environment shared by every service and flow run: settings, MLflow and Prefect addresses."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "CANARYFLOW_STATE_DIR": str(paths.root), "CANARYFLOW_HOST": settings.host,
        "CANARYFLOW_PROJECT_DIR": str(PROJECT_DIR),
        "MLFLOW_TRACKING_URI": settings.mlflow_uri, "PREFECT_API_URL": settings.prefect_api_url,
        "PREFECT_HOME": str(paths.prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": str(settings.prefect.poll_frequency_s),
        "PREFECT_RUNNER_POLL_FREQUENCY": str(settings.prefect.poll_frequency_s),
        # A release queued behind another (deployment concurrency 1) is retried after this, not the default 30 s.
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": str(settings.prefect.poll_frequency_s),
        "DO_NOT_TRACK": "1", "MLFLOW_ENABLE_TELEMETRY": "false", "PYTHONUNBUFFERED": "1",
    })
    env.update({f"CANARYFLOW_PORTS__{k.upper()}": str(v) for k, v in settings.ports.model_dump().items()})
    # The whole tree, not only what came from the environment: a stack built from a Settings object (the benches)
    # runs its flows with the same policy.
    for section in ("serving", "release", "gates", "optimization", "loadtest", "canary", "reconcile", "batch",
                    "router", "metrics", "kubernetes", "external"):
        for key, value in getattr(settings, section).model_dump(mode="json").items():
            if value is not None:
                env[f"CANARYFLOW_{section.upper()}__{key.upper()}"] = value if isinstance(value, str) else \
                    json.dumps(value)
    return env


class LocalStack:
    """Builds, starts, checks and stops the local stack for one settings tree."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.paths = StatePaths.of(settings)
        self.supervisor = Supervisor(self.paths)
        self.router = local_router(settings, self.paths)
        self.torchserve = torchserve.TorchServeClient(settings, self.paths)

    def programs(self) -> list[Program]:
        s, p = self.settings, self.paths
        mlflow_env = {
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",  # loopback-only local mode
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": _secret_file(p.fernet_key, lambda: Fernet.generate_key().decode()),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            # loopback is allowed above for the bridge only: every other webhook URL is refused (mlflow_app.py)
            "CANARYFLOW_MLFLOW_WEBHOOK_URLS": s.url("bridge", "/webhooks/mlflow"),
        }
        programs = [
            Program("mlflow", [_bin("mlflow"), "server", "--app-name", "canaryflow", "--host", s.host,
                               "--port", str(s.ports.mlflow), "--workers", "1", "--backend-store-uri", f"sqlite:///{p.mlflow_db}",
                               "--artifacts-destination", str(p.mlflow_artifacts)], p.mlflow_dir, mlflow_env),
            Program("prefect-server", [_bin("prefect"), "server", "start", "--host", s.host,
                                       "--port", str(s.ports.prefect)], p.prefect_home),
            Program("torchserve", torchserve.command(p), p.torchserve_dir, torchserve.environment(p)),
            Program("router", self.router.command(), p.router_dir, autostart=False),
            Program("prefect-worker", [_bin("prefect"), "worker", "start", "--pool", s.prefect.work_pool,
                                       "--type", "process"], PROJECT_DIR, autostart=False, stopwaitsecs=30),
            # Re-renders the router with TorchServe's new key whenever supervisord (re)starts TorchServe.
            Program("keywatch", [sys.executable, "-m", "canaryflow.local.keywatch"], PROJECT_DIR,
                    events="PROCESS_STATE_RUNNING", startsecs=1),
            # Renews TorchServe's keys before they expire (serving.token_expiration_min) and the router's copy.
            Program("keyrenew", [sys.executable, "-m", "canaryflow.local.keyrenew"], PROJECT_DIR, events="TICK_5",
                    startsecs=1),
            # Every minute: rotates the router's access and error logs once over router.access_log_max_mb.
            Program("logrotate", [sys.executable, "-m", "canaryflow.local.logrotate"], PROJECT_DIR,
                    events="TICK_60", startsecs=1),
            Program("bridge", [_bin("uvicorn"), "canaryflow.intake.bridge:create_app", "--factory", "--host", s.host,
                               "--port", str(s.ports.bridge), "--no-access-log"], PROJECT_DIR, autostart=False),
        ]
        if local_prometheus.wanted(s):  # metrics.source=prometheus without a Prometheus of the team's
            programs.append(local_prometheus.program(s, p))
        # a team's own MLflow / Prefect server (settings external.*) is used, not started
        return [prog for prog in programs if prog.name not in self.external_services()]

    def external_services(self) -> set[str]:
        """The services of :meth:`health` that run elsewhere (settings ``external.*``)."""
        s = self.settings
        return {name for name, service in (("mlflow", "mlflow"), ("prefect-server", "prefect"))
                if not s.embedded(service)}

    def health(self) -> dict[str, tuple[str, Callable[[], bool]]]:
        s = self.settings
        return {
            "mlflow": (s.mlflow_uri, lambda: _http_ok(f"{s.mlflow_uri}/health")),
            "prefect-server": (s.prefect_api_url.removesuffix("/api"),
                               lambda: _http_ok(f"{s.prefect_api_url}/health")),
            "torchserve": (s.url("torchserve_inference"), self.torchserve.healthy),
            "router": (s.router_url, lambda: _http_ok(s.url("router", "/ping"))),
            "prefect-worker": (f"work pool {s.prefect.work_pool}", self._pool_ready),
            "bridge": (s.url("bridge", "/webhooks/mlflow"), lambda: _http_ok(s.url("bridge", "/health"))),
        } | ({"prometheus": (s.prometheus_url, lambda: local_prometheus.ready(s.prometheus_url))}
             if local_prometheus.wanted(s) else {})

    def _pool_ready(self) -> bool:
        try:
            resp = httpx.get(f"{self.settings.prefect_api_url}/work_pools/{self.settings.prefect.work_pool}", timeout=2)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200 and resp.json().get("status") == "READY"

    def wait_healthy(self, names: list[str], timeout_s: float = 180.0) -> None:
        checks = self.health()
        pending = list(names)
        deadline = time.monotonic() + timeout_s
        while pending:
            pending = [n for n in pending if not checks[n][1]()]
            if pending and time.monotonic() > deadline:
                raise StackError(f"not healthy after {timeout_s:.0f} s: {', '.join(pending)}; "
                                 f"see logs in {self.paths.logs}")
            if pending:
                time.sleep(0.5)

    def up(self, progress: Progress = print) -> None:
        """Start (or complete) the stack and wait until every service is healthy. Idempotent."""
        from canaryflow.intake.webhook import ensure_mlflow_webhook, load_or_create_secret

        self.paths.ensure()
        env = child_env(self.settings, self.paths)
        torchserve.write_config(self.settings, self.paths)
        first = ["mlflow", "prefect-server", "torchserve"]
        if local_prometheus.wanted(self.settings):
            local_prometheus.write_config(self.settings, self.paths)
            first.append("prometheus")
        progress(f"starting supervisord: {', '.join(first)}")
        self.supervisor.start(render_config(self.paths, self.programs()), env)
        self.wait_healthy(first)  # external ones: reachable
        torchserve.key_file_mode_private(self.paths)
        # The router holds TorchServe's inference key, which is new at every TorchServe start.
        self.router.write_initial_config()
        self.supervisor.start_program("router")
        progress("applying prefect.yaml deployments")
        self._deploy(env)
        for name in ("prefect-worker", "bridge"):
            self.supervisor.start_program(name)
        self.wait_healthy(["router", "prefect-worker", "bridge"])
        if not self.settings.embedded("mlflow"):
            # A team's MLflow is theirs to configure: its webhook to this bridge is set up by its admins (README);
            # reconcile finds versions without a release either way (reconcile.missed_after_s).
            progress(f"using the MLflow server at {self.settings.mlflow_uri}: no webhook registered")
            progress("stack is up")
            return
        secret = load_or_create_secret(self.paths, self.settings)
        ensure_mlflow_webhook(self.settings.mlflow_uri, self.settings.webhook.name,
                              self.settings.url("bridge", "/webhooks/mlflow"), secret, WEBHOOK_EVENTS)
        progress("stack is up")

    def _deploy(self, env: dict[str, str]) -> None:
        pool = self.settings.prefect.work_pool
        steps = [[_bin("prefect"), "work-pool", "create", pool, "--type", "process", "--overwrite"],
                 [_bin("prefect"), "--no-prompt", "deploy", "--all"]]
        for cmd in steps:
            done = subprocess.run(cmd, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=180)
            if done.returncode != 0:
                raise StackError(f"{' '.join(cmd[1:4])} failed ({done.returncode}): "
                                 f"{(done.stdout + done.stderr)[-1500:]}")

    def down(self) -> list[int]:
        """Stop every process of the stack; returns pids that had to be killed after the grace period."""
        return self.supervisor.shutdown()

    def status(self) -> list[ServiceStatus]:
        """Every service with its endpoint, supervisor state, pid and health."""
        procs = {p["name"]: p for p in self.supervisor.processes()}
        out = []
        for name, (url, check) in self.health().items():
            info = procs.get(name, {})
            state = "EXTERNAL" if name in self.external_services() else info.get("statename", "STOPPED")
            out.append(ServiceStatus(name, url, state, info.get("pid") or None,
                                     state in {"RUNNING", "EXTERNAL"} and check()))
        return out

    def status_dict(self) -> dict[str, object]:
        from canaryflow.local.keyrenew import read_state
        from canaryflow.local.keywatch import read_result

        rows = self.status()
        # the classic-view link asks MLflow for the experiment: only when it answers (MLflow's client retries a
        # stopped server for minutes)
        mlflow_up = any(r.name == "mlflow" and r.healthy for r in rows)
        return {"state_dir": str(self.paths.root), "healthy": all(r.healthy for r in rows),
                "ui": {"prefect": self.settings.prefect_api_url.removesuffix("/api"),
                       "mlflow": mlflow_ui_url(self.settings) if mlflow_up else self.settings.mlflow_uri},
                "services": [asdict(r) for r in rows],
                # the last recovery after a TorchServe restart: versions it could not serve again (a missing .mar)
                "keywatch": read_result(self.paths),
                # TorchServe key renewal: when each key expires, renewals so far, the current problem if any
                "key_renewal": read_state(self.paths)}


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
