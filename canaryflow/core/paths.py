"""Where every file of the local stack lives under the state directory."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    """``data`` as JSON at ``path``, replaced atomically (a reader sees the old file or the new one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=indent))
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    """What :func:`write_json` wrote, or None when the file is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def model_file_name(model: str, suffix: str) -> str:
    """A file name for ``model`` (untrusted: any text MLflow accepts) that cannot escape its directory or collide
    with another model's: a readable slug plus a hash of the whole name."""
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", model)[:40].lstrip(".") or "model"
    return f"{slug}-{hashlib.sha256(model.encode('utf-8')).hexdigest()[:32]}{suffix}"


@dataclass(frozen=True)
class StatePaths:
    """File layout of one local stack; pure, creates nothing until :meth:`ensure` is called."""

    root: Path
    seal_key_file: Path | None = None  # settings.seal_key_file: the seal key from a mounted Secret, not the state dir

    @classmethod
    def of(cls, settings: Any) -> StatePaths:
        """The layout a :class:`~canaryflow.core.settings.Settings` names (state dir, seal key file)."""
        return cls(settings.state_dir, getattr(settings, "seal_key_file", None))

    # MLflow
    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_db(self) -> Path:
        return self.mlflow_dir / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def fernet_key(self) -> Path:
        return self.root / "secrets" / "mlflow_webhook_fernet.key"

    @property
    def webhook_secret(self) -> Path:
        return self.root / "secrets" / "webhook_secret"

    @property
    def seal_key(self) -> Path:
        """HMAC key of the serving state only the pipeline writes (canaryflow.core.seal): ``seal_key_file`` when
        configured (read only, never created), else a stack secret created on first use."""
        return self.seal_key_file or self.root / "secrets" / "state_seal_key"

    @property
    def pin_key(self) -> Path:
        """What a request must carry (X-Canaryflow-Pin-Key) for the router to honour its X-Model-Version pin."""
        return self.root / "secrets" / "pin_key"

    @property
    def feedback_token(self) -> Path:
        """Bearer token of the bridge's feedback endpoint (labels change canary verdicts: not for everyone)."""
        return self.root / "secrets" / "feedback_token"

    # Prefect
    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    # TorchServe
    @property
    def torchserve_dir(self) -> Path:
        return self.root / "torchserve"

    @property
    def torchserve_config(self) -> Path:
        return self.torchserve_dir / "config.properties"

    @property
    def torchserve_log4j(self) -> Path:
        return self.torchserve_dir / "log4j2.xml"

    @property
    def torchserve_keys(self) -> Path:
        """Written by TorchServe itself into the working directory of ``torchserve --start``."""
        return self.torchserve_dir / "key_file.json"

    @property
    def model_store(self) -> Path:
        return self.torchserve_dir / "model-store"

    @property
    def torchserve_tmp(self) -> Path:
        return self.torchserve_dir / "tmp"

    # Router
    @property
    def router_dir(self) -> Path:
        return self.root / "router"

    @property
    def router_conf(self) -> Path:
        return self.router_dir / "nginx.conf"

    @property
    def router_state(self) -> Path:
        """What the router is told to serve: {model: version}, the source the config is rendered from."""
        return self.router_dir / "routes.json"

    @property
    def router_access_log(self) -> Path:
        return self.router_dir / "access.log"

    # Releases
    @property
    def work_dir(self) -> Path:
        return self.root / "work"

    @property
    def traffic_dir(self) -> Path:
        """Samples of served rows per model, written by the handler (see deployments.handler.TrafficSample)."""
        return self.root / "traffic"

    @property
    def feedback_dir(self) -> Path:
        """Live labels per model (``<model file name>.jsonl``), appended by the bridge's feedback endpoint."""
        return self.root / "feedback"

    def feedback_file(self, model: str) -> Path:
        return self.feedback_dir / model_file_name(model, ".jsonl")

    # Supervisor
    @property
    def supervisor_dir(self) -> Path:
        return self.root / "supervisor"

    @property
    def supervisor_conf(self) -> Path:
        return self.supervisor_dir / "supervisord.conf"

    @property
    def supervisor_sock(self) -> Path:
        return self.supervisor_dir / "supervisor.sock"

    @property
    def supervisor_pid(self) -> Path:
        return self.supervisor_dir / "supervisord.pid"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def ensure(self) -> StatePaths:
        """Create the directories; the state root is the owner's only (0700): it holds the registry database,
        the keys and secrets, the models, the access log and batch outputs."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        for d in (self.mlflow_artifacts, self.prefect_home, self.model_store, self.torchserve_tmp,
                  self.router_dir, self.work_dir, self.traffic_dir, self.supervisor_dir, self.logs):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.fernet_key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self
