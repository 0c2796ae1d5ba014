"""Settings: defaults, env overrides (nested), loopback-only host, laziness."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from canaryflow.core.settings import Settings, get_settings, reset_settings


def test_defaults_match_the_documented_ports() -> None:
    s = Settings()
    assert (s.ports.router, s.ports.mlflow, s.ports.prefect, s.ports.bridge) == (8000, 5000, 4200, 8090)
    assert (s.ports.torchserve_inference, s.ports.torchserve_management, s.ports.torchserve_metrics) == (
        8080, 8081, 8082)
    assert s.host == "127.0.0.1"
    assert s.state_dir == Path(".canaryflow").resolve()
    assert s.mlflow_uri == "http://127.0.0.1:5000"
    assert s.prefect_api_url == "http://127.0.0.1:4200/api"


def test_env_overrides_nested_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CANARYFLOW_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CANARYFLOW_PORTS__ROUTER", "18000")
    monkeypatch.setenv("CANARYFLOW_SERVING__MAX_BATCH_ROWS", "64")
    s = Settings()
    assert s.state_dir == tmp_path / "state"
    assert s.ports.router == 18000 and s.router_url == "http://127.0.0.1:18000"
    assert s.serving.max_batch_rows == 64
    assert s.ports.mlflow == 5000  # untouched siblings keep their defaults


def test_non_loopback_host_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANARYFLOW_HOST", "0.0.0.0")
    with pytest.raises(ValidationError, match="not a loopback address"):
        Settings()


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANARYFLOW_SERVING__MAX_BATCH_ROWS", "0")
    with pytest.raises(ValidationError):
        Settings()


def test_get_settings_is_lazy_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    reset_settings()
    monkeypatch.setenv("CANARYFLOW_PORTS__BRIDGE", "18090")
    first = get_settings()
    monkeypatch.setenv("CANARYFLOW_PORTS__BRIDGE", "28090")
    assert get_settings() is first and first.ports.bridge == 18090
    reset_settings()
    assert get_settings().ports.bridge == 28090
    reset_settings()
