"""Credentials of the external services (settings ``external.*``), read from secret files and handed to the MLflow
and Prefect clients the way they look for them: ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` or
``MLFLOW_TRACKING_TOKEN`` (MLflow's REST client reads them on every request) and ``PREFECT_API_KEY``.

Why files: a secret in a URL or a settings value ends up in process listings, Prefect job variables, the stack's
supervisord config and logs. A file that others can read is refused, so a leaked secret is not silently used.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from canaryflow.core.errors import ConfigError
from canaryflow.core.settings import Settings

MLFLOW_USERNAME = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
MLFLOW_TOKEN = "MLFLOW_TRACKING_TOKEN"
PREFECT_KEY = "PREFECT_API_KEY"


def read_secret(path: Path, what: str) -> str:
    """The first line of a secret file that only its owner can read."""
    try:
        info = path.stat()
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{what}: {path} is readable by others (mode {stat.S_IMODE(info.st_mode):o}); "
                          f"chmod 600 it")
    if not value:
        raise ConfigError(f"{what}: {path} is empty")
    return value.splitlines()[0]


def credential_env(settings: Settings) -> dict[str, str]:
    """The client variables the external services' settings call for (empty for the embedded services)."""
    ext, env = settings.external, {}
    if ext.mlflow_tracking_uri:
        if ext.mlflow_token_file and (ext.mlflow_username or ext.mlflow_password_file):
            raise ConfigError("external.mlflow_token_file and basic auth (mlflow_username/password_file) are "
                              "exclusive: set one")
        if ext.mlflow_token_file:
            env[MLFLOW_TOKEN] = read_secret(ext.mlflow_token_file, "external.mlflow_token_file")
        elif ext.mlflow_username or ext.mlflow_password_file:
            if not (ext.mlflow_username and ext.mlflow_password_file):
                raise ConfigError("MLflow basic auth needs both external.mlflow_username and "
                                  "external.mlflow_password_file")
            env[MLFLOW_USERNAME] = ext.mlflow_username
            env[MLFLOW_PASSWORD] = read_secret(ext.mlflow_password_file, "external.mlflow_password_file")
    if ext.prefect_api_url and ext.prefect_api_key_file:
        env[PREFECT_KEY] = read_secret(ext.prefect_api_key_file, "external.prefect_api_key_file")
    return env


def export_credentials(settings: Settings) -> None:
    """Put :func:`credential_env` and the MLflow address into this process' environment, and drop MLflow
    credentials a parent left there for the embedded server (which takes none): one process talks to one MLflow,
    also where code uses MLflow's default tracking URI."""
    env = {**credential_env(settings), "MLFLOW_TRACKING_URI": settings.mlflow_uri}
    if settings.embedded("mlflow"):
        for key in (MLFLOW_USERNAME, MLFLOW_PASSWORD, MLFLOW_TOKEN):
            os.environ.pop(key, None)
    os.environ.update(env)
