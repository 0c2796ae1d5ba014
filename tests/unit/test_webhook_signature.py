"""Signing, verification and parsing of MLflow webhook deliveries (no servers)."""

from __future__ import annotations

import json
import stat
import uuid

import pytest

from canaryflow.core.paths import StatePaths
from canaryflow.core.settings import Settings
from canaryflow.intake.webhook import (
    DELIVERY_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    PayloadError,
    SignatureError,
    load_or_create_secret,
    parse_event,
    sign,
    verify,
)

SECRET = "s3cr3t-for-tests"
NOW = 1_800_000_000
BODY = json.dumps({
    "entity": "model_version", "action": "created", "timestamp": "2027-01-15T08:00:00+00:00",
    "data": {"name": "iris", "version": "3", "source": "models:/m-1", "run_id": None,
             "tags": {}, "description": None},
}).encode()


def signed_headers(body: bytes = BODY, secret: str = SECRET, ts: int = NOW, delivery: str = "d-1") -> dict:
    return {
        DELIVERY_ID_HEADER: delivery,
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: sign(secret, delivery, ts, body),
    }


def reason(headers: dict, body: bytes = BODY, now: float = NOW, tolerance: float = 300) -> str:
    with pytest.raises(SignatureError) as err:
        verify(SECRET, headers, body, now, tolerance)
    return err.value.reason


def test_valid_delivery_verifies() -> None:
    delivery = verify(SECRET, signed_headers(), BODY, NOW, 300)
    assert (delivery.delivery_id, delivery.timestamp) == ("d-1", NOW)


def test_headers_are_case_insensitive() -> None:
    headers = {k.lower(): v for k, v in signed_headers().items()}
    assert verify(SECRET, headers, BODY, NOW, 300).delivery_id == "d-1"


def test_tampered_body_is_a_mismatch() -> None:
    assert reason(signed_headers(), BODY.replace(b'"3"', b'"4"')) == "mismatch"


def test_wrong_secret_is_a_mismatch() -> None:
    assert reason(signed_headers(secret="other")) == "mismatch"


def test_replayed_under_another_delivery_id_is_a_mismatch() -> None:
    headers = signed_headers()
    headers[DELIVERY_ID_HEADER] = "d-2"
    assert reason(headers) == "mismatch"


def test_stale_timestamp_quotes_skew_and_limit() -> None:
    with pytest.raises(SignatureError) as err:
        verify(SECRET, signed_headers(ts=NOW - 301), BODY, NOW, 300)
    assert err.value.reason == "stale_timestamp"
    assert "301 s old" in str(err.value) and "limit 300 s" in str(err.value)


def test_future_timestamp_is_refused() -> None:
    with pytest.raises(SignatureError) as err:
        verify(SECRET, signed_headers(ts=NOW + 400), BODY, NOW, 300)
    assert err.value.reason == "future_timestamp"
    assert "400 s in the future" in str(err.value)


def test_timestamp_at_the_limit_is_accepted() -> None:
    verify(SECRET, signed_headers(ts=NOW - 300), BODY, NOW, 300)
    verify(SECRET, signed_headers(ts=NOW + 300), BODY, NOW, 300)


@pytest.mark.parametrize("missing", [DELIVERY_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER])
def test_each_missing_header_is_refused(missing: str) -> None:
    headers = signed_headers()
    del headers[missing]
    with pytest.raises(SignatureError) as err:
        verify(SECRET, headers, BODY, NOW, 300)
    assert err.value.reason == "missing_header" and missing in str(err.value)


def test_empty_header_counts_as_missing() -> None:
    assert reason({**signed_headers(), SIGNATURE_HEADER: "  "}) == "missing_header"


@pytest.mark.parametrize("value", [
    "garbage", "v2,AAAA", "v1,not base64!!", "v1,", "v1,AAAA",  # last: valid base64, wrong length
])
def test_bad_signature_format(value: str) -> None:
    assert reason({**signed_headers(), SIGNATURE_HEADER: value}) == "bad_format"


def test_non_integer_timestamp() -> None:
    assert reason({**signed_headers(), TIMESTAMP_HEADER: "2027-01-01T00:00:00Z"}) == "bad_timestamp"


def test_one_good_signature_among_several_verifies() -> None:
    good = signed_headers()[SIGNATURE_HEADER]
    other = sign("rotated-away", "d-1", NOW, BODY)
    verify(SECRET, {**signed_headers(), SIGNATURE_HEADER: f"{other} {good}"}, BODY, NOW, 300)


def test_str_and_bytes_bodies_sign_alike() -> None:
    assert sign(SECRET, "d", 1, BODY.decode()) == sign(SECRET, "d", 1, BODY)


def test_mlflow_own_signature_verifies() -> None:
    from mlflow.webhooks.delivery import _generate_hmac_signature

    delivery_id, ts = str(uuid.uuid4()), str(NOW)
    payload = json.dumps({"entity": "model_version", "action": "created", "timestamp": "t",
                          "data": {"name": "m\u00e9", "version": "1", "description": "caf\u00e9 \u2713"}},
                         ensure_ascii=False)  # non-ASCII: MLflow signs str, sends UTF-8 bytes
    theirs = _generate_hmac_signature(SECRET, delivery_id, ts, payload)
    body = payload.encode("utf-8")
    assert theirs == sign(SECRET, delivery_id, ts, body)
    headers = {DELIVERY_ID_HEADER: delivery_id, TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: theirs}
    assert verify(SECRET, headers, body, NOW, 300).delivery_id == delivery_id


def test_mlflow_header_names_match() -> None:
    from mlflow.webhooks import constants

    assert (constants.WEBHOOK_SIGNATURE_HEADER, constants.WEBHOOK_TIMESTAMP_HEADER,
            constants.WEBHOOK_DELIVERY_ID_HEADER) == (SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_ID_HEADER)


def test_parse_model_version_created() -> None:
    event = parse_event(BODY, "d-1")
    assert (event.event, event.model_name, event.version, event.delivery_id) == (
        "model_version.created", "iris", "3", "d-1")
    assert event.data["source"] == "models:/m-1"


def test_parse_mlflow_example_payloads() -> None:
    from mlflow.entities.webhook import WebhookEvent as MlflowEvent
    from mlflow.webhooks.types import get_example_payload_for_event

    for name in ["model_version.created", "model_version_alias.created", "registered_model.created",
                 "model_version_alias.deleted", "prompt.created"]:
        mlflow_event = MlflowEvent.from_str(name)
        body = json.dumps({"entity": mlflow_event.entity.value, "action": mlflow_event.action.value,
                           "timestamp": "t", "data": get_example_payload_for_event(mlflow_event)}).encode()
        assert parse_event(body, "d").event == name


@pytest.mark.parametrize("body", [
    b"not json", b"\xff\xfe", b"[]", b'"x"', b"{}",
    b'{"entity": "model_version", "action": "created"}',
    b'{"entity": "model_version", "action": "created", "data": []}',
    b'{"entity": "model_version", "action": "created", "data": {"name": "m"}}',
    b'{"entity": "model_version", "action": "created", "data": {"name": "m", "version": {"x": 1}}}',
    b'{"entity": 3, "action": "created", "data": {}}',
])
def test_malformed_payload(body: bytes) -> None:
    with pytest.raises(PayloadError):
        parse_event(body, "d")


def test_secret_from_settings_wins(tmp_path) -> None:
    settings = Settings(state_dir=tmp_path, webhook={"secret": "given"})
    assert load_or_create_secret(StatePaths(tmp_path), settings) == "given"
    assert not StatePaths(tmp_path).webhook_secret.exists()


def test_secret_file_is_created_private_and_reused(tmp_path) -> None:
    paths = StatePaths(tmp_path / "state")
    settings = Settings(state_dir=tmp_path / "state")
    first = load_or_create_secret(paths, settings)
    assert len(first) >= 32
    assert stat.S_IMODE(paths.webhook_secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.webhook_secret.parent.stat().st_mode) == 0o700
    assert load_or_create_secret(paths, settings) == first
    assert [p.name for p in paths.webhook_secret.parent.iterdir()] == ["webhook_secret"]
