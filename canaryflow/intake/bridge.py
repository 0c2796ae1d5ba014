"""The MLflow -> Prefect webhook bridge: an ASGI app (Starlette).

Run it with ``uvicorn canaryflow.intake.bridge:create_app --factory --host 127.0.0.1 --port 8090`` or
``python -m canaryflow.bridge`` (host and port from the settings).

Status codes are chosen for MLflow's sender, which retries (about 7 s in all, same delivery id) only on
429/5xx and connection errors: a refusal that retrying cannot fix is a 4xx, "Prefect did not confirm the run"
is a 503.

=====================================  ======  ==============================================
delivery                               status  body
=====================================  ======  ==============================================
missing header / bad signature / old   401     ``{"status": "rejected", "reason", "detail"}``
body over 1 MiB                        413     ``{"status": "rejected", "reason": "too_large"}``
authentic but not an MLflow payload    400     ``{"status": "rejected", "reason": "bad_payload"}``
any event but model_version.created    200     ``{"status": "ignored", "event"}``
model_version.created, run confirmed   202     ``{"status": "started", "flow_run_id", ...}``
Prefect unreachable / refused          503     ``{"status": "error", "detail"}`` + Retry-After
=====================================  ======  ==============================================

``POST /feedback/<model>`` takes labels for answers the router already gave (deployments/feedback.py), with
``Authorization: Bearer <token>`` (``<state>/secrets/feedback_token``, or ``CANARYFLOW_FEEDBACK__TOKEN``): 200
``{"status": "recorded", "recorded", "already_recorded"}``; 401 without the token; 400 not JSON; 404 a request id
the router never answered for that model; 409 a different label for an answer already labelled; 413 too large;
422 malformed. Every refusal records nothing and names each bad item in ``problems``.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from canaryflow.core.errors import ConfigError, OrchestrationError, ServingError
from canaryflow.core.names import name_problem
from canaryflow.core.paths import StatePaths
from canaryflow.core.registry import MlflowRegistry
from canaryflow.core.settings import Settings, get_settings
from canaryflow.intake.canary_metrics import CONTENT_TYPE, RoutesSnapshot, render_canary_metrics
from canaryflow.intake.launcher import Launcher, prefect_launcher
from canaryflow.intake.webhook import (
    DELIVERY_ID_HEADER,
    MODEL_VERSION_CREATED,
    PayloadError,
    SignatureError,
    load_or_create_secret,
    parse_event,
    secret_file,
    verify,
)
from deployments.feedback import AnswerIndex, FeedbackError, FeedbackRecorder

_log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20  # MLflow payloads are a few hundred bytes
# MLflow honours Retry-After: its 3 retries then span 15 s instead of about 7, enough for a Prefect restart.
RETRY_AFTER_S = 5


class _BodyTooLarge(Exception):
    pass


def _clean(value: object, limit: int = 80) -> str:
    """Untrusted text made safe for one log line."""
    text = "-" if value is None else str(value)
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _log_delivery(delivery: object, event: object, model: object, version: object, outcome: str) -> None:
    _log.info(
        "mlflow webhook delivery=%s event=%s model=%s version=%s outcome=%s",
        _clean(delivery), _clean(event), _clean(model), _clean(version), outcome,
    )


def _ensure_delivery_log() -> None:
    """Keep the per-delivery lines visible under plain ``uvicorn --factory``, which configures only its own
    loggers; an application that configured logging (root handlers) is left alone."""
    if _log.level == logging.NOTSET:
        _log.setLevel(logging.INFO)
    if not _log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        _log.addHandler(handler)


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _routes_snapshot(settings: Settings) -> Callable[[], RoutesSnapshot] | None:
    """Where the canary metrics read the routes table: None for routes.json (the local router's), the HTTPRoutes
    on Kubernetes (the bridge's identity needs `list` on httproutes; the router is built at the first scrape)."""
    if settings.platform != "kubernetes":
        return None
    router: list[Any] = []

    def snapshot() -> RoutesSnapshot:
        if not router:
            from deployments.kubernetes.gateway import GatewayApiRouter

            router.append(GatewayApiRouter.for_settings(settings))
        return router[0].snapshot()

    return snapshot


def create_app(
    settings: Settings | None = None,
    launcher: Launcher | None = None,
    secret: str | None = None,
    *,
    clock: Callable[[], float] = time.time,
    feedback_token: str | None = None,
) -> Starlette:
    """Build the bridge; missing pieces come from :func:`get_settings` and the state dir's secret files."""
    settings = settings or get_settings()
    paths = StatePaths.of(settings)
    if launcher is None:
        launcher = prefect_launcher(settings)
    if secret is None:
        secret = load_or_create_secret(paths, settings)
    if not secret:
        raise ConfigError(
            "the webhook secret is empty; set CANARYFLOW_WEBHOOK__SECRET or unset it to generate one"
        )
    tolerance_s = settings.webhook.tolerance_s
    token = (feedback_token or secret_file(paths.feedback_token, settings.feedback.token)).encode()
    recorder = FeedbackRecorder(AnswerIndex(paths.router_access_log, settings.feedback.index_answers),
                                paths.feedback_file, settings.feedback.max_items, clock,
                                settings.feedback.answer_wait_s)
    _ensure_delivery_log()
    registry: list[MlflowRegistry] = []  # made at the first scrape: importing mlflow is slow

    routes_snapshot = _routes_snapshot(settings)

    def _canary_text() -> bytes:
        if not registry:
            registry.append(MlflowRegistry(settings.mlflow_uri))
        return render_canary_metrics(paths, registry[0], routes_snapshot() if routes_snapshot else None)

    async def metrics(request: Request) -> Response:
        """The canary's weight, phase and last change for Prometheus (alert ``CanaryflowCanaryStuck``)."""
        try:
            body = await run_in_threadpool(_canary_text)
        except ServingError as exc:  # an unreadable routes table fails the scrape visibly
            return JSONResponse({"status": "error", "detail": str(exc)}, status_code=500)
        return Response(body, media_type=CONTENT_TYPE)

    async def health(request: Request) -> JSONResponse:
        probe = getattr(launcher, "healthy", None)
        prefect = "unknown" if probe is None else ("up" if await run_in_threadpool(probe) else "down")
        return JSONResponse({"status": "ok", "prefect": prefect})

    async def mlflow_webhook(request: Request) -> JSONResponse:
        hint = request.headers.get(DELIVERY_ID_HEADER)
        try:
            body = await _read_body(request)
        except _BodyTooLarge:
            _log_delivery(hint, None, None, None, "rejected too_large")
            return JSONResponse({"status": "rejected", "reason": "too_large"}, status_code=413)
        try:
            delivery = verify(secret, request.headers, body, clock(), tolerance_s)
        except SignatureError as exc:
            _log_delivery(hint, None, None, None, f"rejected {exc.reason}: {exc.message}")
            return JSONResponse(
                {"status": "rejected", "reason": exc.reason, "detail": exc.message}, status_code=401
            )
        try:
            event = parse_event(body, delivery.delivery_id)
        except PayloadError as exc:
            _log_delivery(delivery.delivery_id, None, None, None, f"rejected bad_payload: {exc}")
            return JSONResponse(
                {"status": "rejected", "reason": "bad_payload", "detail": str(exc)}, status_code=400
            )
        who = (delivery.delivery_id, event.event, event.model_name, event.version)
        if event.event != MODEL_VERSION_CREATED:
            _log_delivery(*who, "ignored")
            return JSONResponse({"status": "ignored", "event": event.event})
        problem = name_problem(event.model_name, event.version)
        if problem:  # never reaches Prefect, a URL or a file name; reconcile tags the version rejected
            _log_delivery(*who, f"refused: {problem}")
            return JSONResponse({"status": "refused", "reason": problem}, status_code=422)
        key = f"mlflow-webhook:{delivery.delivery_id}"
        try:
            run_id = await run_in_threadpool(launcher.start_release, event.model_name, event.version, key)
        except OrchestrationError as exc:
            _log_delivery(*who, f"error (503, MLflow retries): {exc}")
            return JSONResponse(
                {"status": "error", "detail": str(exc)},
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        except Exception as exc:
            _log_delivery(*who, f"error (500): {type(exc).__name__}")
            raise
        _log_delivery(*who, f"started flow_run_id={run_id}")
        return JSONResponse(
            {"status": "started", "flow_run_id": run_id, "model_name": event.model_name,
             "version": event.version, "idempotency_key": key},
            status_code=202,
        )

    async def feedback(request: Request) -> JSONResponse:
        model = request.path_params["model"]
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
            return JSONResponse({"status": "rejected", "detail": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        try:
            body = json.loads(await _read_body(request))
        except _BodyTooLarge:
            return JSONResponse({"status": "rejected", "detail": f"body over {MAX_BODY_BYTES} bytes"},
                                status_code=413)
        except ValueError as exc:
            return JSONResponse({"status": "rejected", "detail": f"body is not JSON: {exc}"}, status_code=400)
        try:
            result = await run_in_threadpool(recorder.record, model, body)
        except FeedbackError as exc:
            _log.info("feedback model=%s refused %d: %s", _clean(model), exc.status, _clean(exc.detail, 200))
            return JSONResponse({"status": "rejected", "detail": exc.detail, "problems": exc.problems[:100]},
                                status_code=exc.status)
        return JSONResponse(result)

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/webhooks/mlflow", mlflow_webhook, methods=["POST"]),
            Route("/feedback/{model:path}", feedback, methods=["POST"]),
        ]
    )


def main() -> None:
    """Serve the bridge on ``settings.host:settings.ports.bridge``."""
    import uvicorn

    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.ports.bridge)


if __name__ == "__main__":
    main()
