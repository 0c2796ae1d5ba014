"""Existing services (settings ``external.*``): URLs checked, credentials only from owner-only files, handed to the
MLflow and Prefect clients the way they read them, and never part of a URL."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from canaryflow.core.credentials import credential_env, export_credentials
from canaryflow.core.errors import ConfigError
from canaryflow.core.settings import Settings
from canaryflow.intake.launcher import prefect_launcher


def _secret(tmp_path: Path, name: str, value: str, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(value + "\n")
    path.chmod(mode)
    return path


def test_embedded_services_by_default(default_settings) -> None:
    s = Settings()
    assert s.embedded("mlflow") and s.embedded("prefect")
    assert s.mlflow_uri == f"http://127.0.0.1:{s.ports.mlflow}"
    assert credential_env(s) == {}


def test_an_external_mlflow_and_prefect_replace_the_embedded_urls(default_settings) -> None:
    s = Settings(external={"mlflow_tracking_uri": "https://mlflow.example.com/", "prefect_api_url":
                           "https://prefect.example.com/api"})
    assert s.mlflow_uri == "https://mlflow.example.com"
    assert s.prefect_api_url == "https://prefect.example.com/api"
    assert not s.embedded("mlflow") and not s.embedded("prefect")
    # the loopback rule still holds for what `canaryflow up` starts itself
    with pytest.raises(ValidationError, match="loopback"):
        Settings(host="0.0.0.0")


@pytest.mark.parametrize("url, why", [("https://admin:pw@mlflow.example.com", "credentials in a service URL"),
                                      ("ftp://mlflow.example.com", "not an http"),
                                      ("https://mlflow.example.com/?token=x", "no query")])
def test_service_urls_are_plain_http_urls(default_settings, url: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        Settings(external={"mlflow_tracking_uri": url})


def test_basic_auth_and_api_key_come_from_owner_only_files(default_settings, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PREFECT_API_KEY",
                "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    s = Settings(external={"mlflow_tracking_uri": "http://127.0.0.1:5999", "mlflow_username": "ci",
                           "mlflow_password_file": str(_secret(tmp_path, "pw", "s3cret")),
                           "prefect_api_url": "http://127.0.0.1:4999/api",
                           "prefect_api_key_file": str(_secret(tmp_path, "key", "pnu_abc"))})
    env = credential_env(s)
    assert env == {"MLFLOW_TRACKING_USERNAME": "ci", "MLFLOW_TRACKING_PASSWORD": "s3cret", "PREFECT_API_KEY": "pnu_abc"}
    export_credentials(s)
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
    launcher = prefect_launcher(s)
    assert launcher._headers == {"Authorization": "Bearer pnu_abc"}
    assert "pnu_abc" not in repr(launcher)
    # back on the embedded MLflow, a parent's credentials are not sent to it
    export_credentials(Settings())
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ


def test_a_secret_file_others_can_read_is_refused(default_settings, tmp_path: Path) -> None:
    s = Settings(external={"mlflow_tracking_uri": "http://127.0.0.1:5999",
                           "mlflow_token_file": str(_secret(tmp_path, "token", "t0k", mode=0o644))})
    with pytest.raises(ConfigError, match="readable by others"):
        credential_env(s)


def test_half_configured_basic_auth_is_refused(default_settings, tmp_path: Path) -> None:
    s = Settings(external={"mlflow_tracking_uri": "http://127.0.0.1:5999", "mlflow_username": "ci"})
    with pytest.raises(ConfigError, match="needs both"):
        credential_env(s)
    both = Settings(external={"mlflow_tracking_uri": "http://127.0.0.1:5999", "mlflow_username": "ci",
                              "mlflow_password_file": str(_secret(tmp_path, "pw", "x")),
                              "mlflow_token_file": str(_secret(tmp_path, "tok", "y"))})
    with pytest.raises(ConfigError, match="exclusive"):
        credential_env(both)
