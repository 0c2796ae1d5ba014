"""MLflow webhook deliveries: HMAC signing and verification, payload parsing, secret, registration.

Matches MLflow 3.17 (``mlflow/webhooks/delivery.py``): the signature is
``v1,<base64 HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{body}")>`` over the exact bytes of the body
MLflow sends (its ``json.dumps`` of the payload, UTF-8). Everything here is pure except
:func:`load_or_create_secret` (one file) and :func:`ensure_mlflow_webhook` (MLflow API).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from canaryflow.core.errors import CanaryflowError, ConfigError, RegistryError
from canaryflow.core.keys import secret_file

if TYPE_CHECKING:
    from mlflow.entities.webhook import Webhook

    from canaryflow.core.paths import StatePaths
    from canaryflow.core.settings import Settings

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
MODEL_VERSION_CREATED = "model_version.created"
_DIGEST_SIZE = hashlib.sha256().digest_size


class WebhookError(CanaryflowError):
    """A webhook delivery was refused."""


class SignatureError(WebhookError):
    """The delivery is not authentic or not fresh; ``reason`` is a short machine-readable code.

    Codes: ``missing_header``, ``bad_timestamp``, ``stale_timestamp``, ``future_timestamp``,
    ``bad_format``, ``mismatch``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class PayloadError(WebhookError):
    """The body is authentic but is not an MLflow webhook payload we understand."""


@dataclass(frozen=True)
class Delivery:
    """The authenticated envelope of one delivery (same id on every MLflow retry)."""

    delivery_id: str
    timestamp: int


@dataclass(frozen=True)
class WebhookEvent:
    """One parsed MLflow webhook payload (``{"entity", "action", "timestamp", "data"}``)."""

    delivery_id: str
    entity: str
    action: str
    model_name: str | None
    version: str | None
    sent_at: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def event(self) -> str:
        """``entity.action``, e.g. ``model_version.created``: the names used to subscribe."""
        return f"{self.entity}.{self.action}"


def sign(secret: str, delivery_id: str, timestamp: str | int, body: bytes | str) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery.

    MLflow HMACs ``f"{delivery_id}.{timestamp}.{payload_json}".encode("utf-8")`` and sends
    ``payload_json.encode("utf-8")``: prefixing the raw body bytes gives the same message.
    """
    if isinstance(body, str):
        body = body.encode("utf-8")
    message = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode("utf-8"), message, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:  # plain dicts are case-sensitive; Starlette's Headers are not
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    if value is None or not value.strip():
        raise SignatureError("missing_header", f"header {name} is missing or empty")
    return value.strip()


def _signatures(value: str) -> list[bytes]:
    """Decoded ``v1`` digests; Standard Webhooks allows several, space separated."""
    digests: list[bytes] = []
    for item in value.split():
        version, sep, encoded = item.partition(",")
        if not sep or version != SIGNATURE_VERSION:
            continue
        try:
            digest = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(digest) == _DIGEST_SIZE:
            digests.append(digest)
    if not digests:
        raise SignatureError(
            "bad_format", f"{SIGNATURE_HEADER} is not '{SIGNATURE_VERSION},<base64 HMAC-SHA256>'"
        )
    return digests


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, now: float, tolerance_s: float
) -> Delivery:
    """Check headers, timestamp window and HMAC of one delivery; raise :class:`SignatureError` if bad."""
    if not secret:
        raise ConfigError(
            "the webhook secret is empty; set CANARYFLOW_WEBHOOK__SECRET or let it be generated"
        )
    delivery_id = _header(headers, DELIVERY_ID_HEADER)
    raw_timestamp = _header(headers, TIMESTAMP_HEADER)
    provided = _header(headers, SIGNATURE_HEADER)
    try:
        timestamp = int(raw_timestamp)
    except ValueError:
        raise SignatureError(
            "bad_timestamp", f"{TIMESTAMP_HEADER} must be integer unix seconds, got {raw_timestamp[:32]!r}"
        ) from None
    digests = _signatures(provided)
    skew = now - timestamp
    if skew > tolerance_s:
        raise SignatureError(
            "stale_timestamp",
            f"timestamp is {skew:.0f} s old, limit {tolerance_s:g} s (replay or clock skew)",
        )
    if -skew > tolerance_s:
        raise SignatureError(
            "future_timestamp",
            f"timestamp is {-skew:.0f} s in the future, limit {tolerance_s:g} s (clock skew)",
        )
    expected = base64.b64decode(sign(secret, delivery_id, raw_timestamp, body).partition(",")[2])
    # Check every candidate so the time taken does not depend on which one matched.
    matched = [hmac.compare_digest(expected, digest) for digest in digests]
    if not any(matched):
        raise SignatureError("mismatch", "signature does not match the body and the shared secret")
    return Delivery(delivery_id=delivery_id, timestamp=timestamp)


def _optional_str(data: Mapping[str, Any], key: str, where: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PayloadError(f"{where}: data.{key} must be a string, got {type(value).__name__}")
    return str(value)


def parse_event(body: bytes, delivery_id: str) -> WebhookEvent:
    """Parse an authenticated body; raise :class:`PayloadError` when it is not an MLflow payload."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PayloadError(f"body is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise PayloadError(f"payload must be a JSON object, got {type(payload).__name__}")
    entity, action, data = payload.get("entity"), payload.get("action"), payload.get("data")
    if not isinstance(entity, str) or not entity or not isinstance(action, str) or not action:
        raise PayloadError("payload needs string fields 'entity' and 'action'")
    if not isinstance(data, dict):
        raise PayloadError(f"payload field 'data' must be an object, got {type(data).__name__}")
    where = f"{entity}.{action}"
    name = _optional_str(data, "name", where)
    version = _optional_str(data, "version", where)
    if where == MODEL_VERSION_CREATED and not (name and version):
        raise PayloadError(f"{where} needs data.name and data.version, got name={name!r} version={version!r}")
    sent_at = payload.get("timestamp")
    return WebhookEvent(
        delivery_id=delivery_id,
        entity=entity,
        action=action,
        model_name=name,
        version=version,
        sent_at=sent_at if isinstance(sent_at, str) else None,
        data=data,
    )


def load_or_create_secret(paths: StatePaths, settings: Settings) -> str:
    """``settings.webhook.secret`` if set, else the secret file in the state dir, created (0600) if absent."""
    return secret_file(paths.webhook_secret, settings.webhook.secret)


def ensure_mlflow_webhook(
    tracking_uri: str, name: str, url: str, secret: str, events: Sequence[str] = (MODEL_VERSION_CREATED,)
) -> Webhook:
    """Make MLflow hold exactly one ACTIVE webhook called ``name`` with this url, secret and events.

    MLflow never returns secrets, so an existing webhook always gets the secret written again.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        same_name: list[Webhook] = []
        page_token: str | None = None
        while True:
            page = client.list_webhooks(max_results=100, page_token=page_token)
            same_name.extend(w for w in page if w.name == name)
            page_token = page.token
            if not page_token:
                break
        if not same_name:
            return client.create_webhook(
                name=name, url=url, events=list(events), secret=secret, status="ACTIVE"
            )
        same_name.sort(key=lambda w: (w.creation_timestamp, w.webhook_id))
        keep, extra = same_name[0], same_name[1:]
        for webhook in extra:
            client.delete_webhook(webhook.webhook_id)
        return client.update_webhook(
            keep.webhook_id, url=url, events=list(events), secret=secret, status="ACTIVE"
        )
    except MlflowException as exc:
        # The message comes from MLflow and holds no secret (MLflow never echoes it).
        raise RegistryError(f"cannot register webhook {name!r} at {tracking_uri}: {exc.message}") from None
