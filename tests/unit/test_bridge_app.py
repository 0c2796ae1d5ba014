"""The webhook bridge app with a fake launcher (no servers)."""

from __future__ import annotations

import json
import logging
import time

import pytest
from fakes import FakeLauncher
from starlette.testclient import TestClient

from canaryflow.core.settings import Settings
from canaryflow.intake.bridge import create_app
from canaryflow.intake.webhook import DELIVERY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

SECRET = "bridge-test-secret-DO-NOT-LOG"


def payload(entity: str = "model_version", action: str = "created", **data: object) -> bytes:
    data = {"name": "iris", "version": "7", "source": "models:/m", "run_id": None, "tags": {},
            "description": None, **data}
    return json.dumps({"entity": entity, "action": action, "timestamp": "t", "data": data}).encode()


def post(client: TestClient, body: bytes, delivery: str = "dlv-1", secret: str = SECRET,
         ts: int | None = None, drop: str | None = None):
    ts = int(time.time()) if ts is None else ts
    headers = {
        "Content-Type": "application/json",
        DELIVERY_ID_HEADER: delivery,
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: sign(secret, delivery, ts, body),
    }
    if drop:
        del headers[drop]
    return client.post("/webhooks/mlflow", content=body, headers=headers)


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher()


@pytest.fixture
def client(launcher: FakeLauncher, tmp_path) -> TestClient:
    app = create_app(Settings(state_dir=tmp_path), launcher=launcher, secret=SECRET)
    return TestClient(app)


def test_started(client: TestClient, launcher: FakeLauncher) -> None:
    response = post(client, payload(), delivery="abc-123")
    assert response.status_code == 202
    assert response.json()["status"] == "started"
    assert response.json()["flow_run_id"] == "run-123"
    assert launcher.calls == [("iris", "7", "mlflow-webhook:abc-123")]


def test_retried_delivery_reuses_the_key(client: TestClient, launcher: FakeLauncher) -> None:
    post(client, payload(), delivery="same")
    post(client, payload(), delivery="same")
    assert {c[2] for c in launcher.calls} == {"mlflow-webhook:same"}


def test_forged_signature_is_401(client: TestClient, launcher: FakeLauncher) -> None:
    response = post(client, payload(), secret="guessed")
    assert response.status_code == 401
    assert response.json()["reason"] == "mismatch"
    assert launcher.calls == []


def test_stale_is_401_with_reason(client: TestClient) -> None:
    response = post(client, payload(), ts=int(time.time()) - 3600)
    assert response.status_code == 401
    assert response.json()["reason"] == "stale_timestamp"
    assert "limit 300 s" in response.json()["detail"]


@pytest.mark.parametrize("header", [DELIVERY_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER])
def test_missing_header_is_401(client: TestClient, header: str) -> None:
    response = post(client, payload(), drop=header)
    assert response.status_code == 401
    assert response.json()["reason"] == "missing_header"


def test_unsigned_request_is_401(client: TestClient) -> None:
    assert client.post("/webhooks/mlflow", json={"entity": "model_version"}).status_code == 401


@pytest.mark.parametrize(
    "body", [b"{not json", b'{"entity": "model_version", "action": "created", "data": {}}']
)
def test_malformed_is_400(client: TestClient, launcher: FakeLauncher, body: bytes) -> None:
    response = post(client, body)
    assert response.status_code == 400
    assert response.json()["reason"] == "bad_payload"
    assert launcher.calls == []


def test_other_event_is_ignored(client: TestClient, launcher: FakeLauncher) -> None:
    response = post(client, payload("model_version_alias", "created", alias="champion"))
    assert response.status_code == 200
    assert response.json() == {"status": "ignored", "event": "model_version_alias.created"}
    assert launcher.calls == []


def test_orchestration_error_is_503(tmp_path) -> None:
    app = create_app(Settings(state_dir=tmp_path), launcher=FakeLauncher(fail=True), secret=SECRET)
    response = post(TestClient(app), payload())
    assert response.status_code == 503
    assert response.json()["status"] == "error"
    assert "connection refused" in response.json()["detail"]
    assert response.headers["retry-after"]


def test_too_large_is_413(client: TestClient) -> None:
    assert post(client, b"x" * (2 << 20)).status_code == 413


def test_get_on_webhook_is_405(client: TestClient) -> None:
    assert client.get("/webhooks/mlflow").status_code == 405


def test_health_reports_prefect(client: TestClient, tmp_path) -> None:
    assert client.get("/health").json() == {"status": "ok", "prefect": "up"}
    app = create_app(Settings(state_dir=tmp_path), launcher=FakeLauncher(fail=True), secret=SECRET)
    down = TestClient(app)
    assert down.get("/health").json() == {"status": "ok", "prefect": "down"}


def test_secret_generated_when_not_given(tmp_path, launcher: FakeLauncher) -> None:
    settings = Settings(state_dir=tmp_path)
    client = TestClient(create_app(settings, launcher=launcher))
    secret = (tmp_path / "secrets" / "webhook_secret").read_text()
    assert post(client, payload(), secret=secret).status_code == 202


def test_secret_and_signature_never_logged(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    signatures = []
    for launcher in (FakeLauncher(), FakeLauncher(fail=True)):
        client = TestClient(create_app(Settings(state_dir=tmp_path), launcher=launcher, secret=SECRET))
        for body, secret in [(payload(), SECRET), (payload(), "wrong"), (b"{bad", SECRET),
                             (payload("registered_model", "created"), SECRET)]:
            response = post(client, body, delivery="log-dlv", secret=secret)
            signatures.append(response.request.headers[SIGNATURE_HEADER])
    text = caplog.text + repr([r.__dict__ for r in caplog.records])
    assert "log-dlv" in caplog.text  # one line per delivery is there...
    assert SECRET not in text  # ...but neither the secret nor any signature
    assert not any(sig.partition(",")[2] in text for sig in signatures)
    lines = [r.getMessage() for r in caplog.records if r.name == "canaryflow.intake.bridge"]
    assert len(lines) == 8
    assert any("outcome=started flow_run_id=run-123" in line for line in lines)
