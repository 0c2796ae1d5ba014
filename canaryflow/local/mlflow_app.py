"""The local stack's MLflow server app: MLflow's own FastAPI app, with webhooks limited to canaryflow's bridge.

The local stack has to let MLflow deliver webhooks to a loopback URL (``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS``), and
MLflow has no per-URL allowance: any registry user could create a webhook aimed at another loopback service
(the Prefect API, TorchServe's management API) and have MLflow post to it. Here MLflow's webhook URL validation
(at create, update and delivery) also requires the URL to be one of ``CANARYFLOW_MLFLOW_WEBHOOK_URLS``
(comma-separated; the stack sets the bridge's), and refuses every other with MLflow's own 400.

Run as ``mlflow server --app-name canaryflow`` (entry point ``mlflow.app`` in pyproject.toml), so MLflow's CLI
still prepares the store and runs its server.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from urllib.parse import urlsplit

import mlflow.store.model_registry.sqlalchemy_store as _store
import mlflow.utils.validation as _validation
import mlflow.webhooks.delivery as _delivery
from mlflow.exceptions import MlflowException

ALLOWED_ENV = "CANARYFLOW_MLFLOW_WEBHOOK_URLS"


def _normal(url: str) -> tuple[str, str, int | None, str]:
    parts = urlsplit(url.strip())
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port, parts.path or "/"


def allowed_urls() -> set[tuple[str, str, int | None, str]]:
    return {_normal(u) for u in os.environ.get(ALLOWED_ENV, "").split(",") if u.strip()}


def limited(validate: Callable[[str], None]) -> Callable[[str], None]:
    """``validate`` (MLflow's own checks) plus: the URL is one of :func:`allowed_urls` (no query, no fragment)."""

    def check(url: str) -> None:
        validate(url)
        parts = urlsplit(url.strip())
        if parts.query or parts.fragment or parts.username or _normal(url) not in allowed_urls():
            raise MlflowException.invalid_parameter_value(
                f"Webhook URL {url[:200]!r} is not allowed on this server: webhooks may only target canaryflow's "
                f"bridge (set by the operator in {ALLOWED_ENV})")

    check.__wrapped__ = validate  # type: ignore[attr-defined]
    return check


def install() -> None:
    """Limit every place MLflow validates a webhook URL (idempotent)."""
    original = getattr(_validation._validate_webhook_url, "__wrapped__", _validation._validate_webhook_url)
    guarded = limited(original)
    for module in (_validation, _store, _delivery):
        module._validate_webhook_url = guarded


install()

from mlflow.server.fastapi_app import app  # noqa: E402  (after the guard: the app's store imports the validator)

__all__ = ["app", "install", "limited"]
