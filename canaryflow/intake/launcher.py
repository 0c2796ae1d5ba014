"""Start release flow runs on a Prefect server through its REST API (no prefect import: house rule).

Prefect de-duplicates ``create_flow_run`` on ``(flow_id, idempotency_key)``: a second call with the same key
answers 200 (not 201) with the FIRST run, whatever parameters it was given. The bridge therefore keys runs
on the MLflow delivery id, which MLflow keeps across its retries.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from canaryflow.core.credentials import PREFECT_KEY, credential_env
from canaryflow.core.errors import ConfigError, OrchestrationError
from canaryflow.core.settings import Settings

_log = logging.getLogger(__name__)
_PAGE = 200  # Prefect's default maximum for filter endpoints
_RETRY_CODES = frozenset({408, 429, 502, 503})  # the codes Prefect's own client retries
_MAX_BACKOFF_S = 4.0


class PrefectAPIError(OrchestrationError):
    """Prefect answered, or failed to answer, a REST call; ``status_code`` is None when nothing came back."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class Launcher(Protocol):
    """The orchestrator, as the webhook bridge and reconcile use it (:class:`PrefectLauncher` is the real one)."""

    def start_release(self, model_name: str, version: str, idempotency_key: str, allow_older: bool = False) -> str:
        """Start (or find, by idempotency key) the release flow run of a version; returns its id."""
        ...

    def list_flow_runs(self, model_name: str | None = None, version: str | None = None) -> list[dict[str, Any]]:
        """Release flow runs, optionally of one model (and version)."""
        ...

    def mark_crashed(self, run_id: str, message: str) -> None:
        """Record a run that died without reporting as crashed."""
        ...

    def healthy(self) -> bool:
        """Whether the orchestrator's API answers."""
        ...


def release_run_name(model_name: str, version: str) -> str:
    """The flow run name shown in the Prefect UI."""
    return f"release-{model_name}-v{version}"


class PrefectLauncher:
    """Creates release flow runs from a named deployment; every failure is an :class:`OrchestrationError`."""

    def __init__(
        self,
        api_url: str,
        deployment: str = "release/release",
        timeout_s: float = 10.0,
        headers: Mapping[str, str] | None = None,
        retries: int = 5,
    ) -> None:
        flow_name, sep, deployment_name = deployment.partition("/")
        if not (sep and flow_name and deployment_name) or "/" in deployment_name:
            raise ConfigError(f"deployment must be 'flow/deployment', got {deployment!r}")
        self.api_url = api_url.rstrip("/")
        self.deployment = deployment
        self.timeout_s = timeout_s
        self.retries = retries
        self._flow_name, self._deployment_name = flow_name, deployment_name
        self._headers = dict(headers or {})

    def __repr__(self) -> str:  # headers may carry credentials
        return f"PrefectLauncher(api_url={self.api_url!r}, deployment={self.deployment!r})"

    def _request(self, method: str, path: str, json: Any = None) -> httpx.Response:
        what = f"{method} {self.api_url}{path}"
        try:
            # A fresh client per call: no stale keep-alive connection to fail on (httpx does not retry those).
            with httpx.Client(base_url=self.api_url, timeout=self.timeout_s, headers=self._headers) as client:
                for attempt in range(self.retries + 1):
                    response = client.request(method, path, json=json)
                    if response.status_code not in _RETRY_CODES or attempt == self.retries:
                        break
                    # Prefect answers 503 when SQLite is busy (concurrent writes); its own client retries too.
                    # Every call here is safe to repeat: reads, and creates keyed by an idempotency key.
                    time.sleep(_backoff(attempt, response.headers.get("retry-after")))
        except httpx.TimeoutException as exc:
            raise PrefectAPIError(
                f"Prefect API did not answer {what} within {self.timeout_s:g} s ({type(exc).__name__}); "
                "is the server overloaded?"
            ) from exc
        except httpx.HTTPError as exc:
            raise PrefectAPIError(
                f"cannot reach the Prefect API for {what}: {exc or type(exc).__name__}; "
                "is `prefect server start` running and PREFECT_API_URL right?"
            ) from exc
        if not response.is_success:
            raise PrefectAPIError(
                f"Prefect API answered {response.status_code} to {what}: {_detail(response)}",
                status_code=response.status_code,
            )
        return response

    def deployment_id(self) -> str:
        """Resolve the deployment by name (every call: a re-created deployment gets a new id)."""
        path = f"/deployments/name/{quote(self._flow_name, safe='')}/{quote(self._deployment_name, safe='')}"
        try:
            body = _json(self._request("GET", path))
        except PrefectAPIError as exc:
            if exc.status_code == 404:
                raise PrefectAPIError(
                    f"deployment {self.deployment!r} not found at {self.api_url}; deploy it first "
                    "(`prefect --no-prompt deploy --all`)",
                    status_code=404,
                ) from exc
            raise
        return _id_of(body, f"deployment {self.deployment!r}")

    def start_release(self, model_name: str, version: str, idempotency_key: str, allow_older: bool = False) -> str:
        """Create (or find, for a known key) the release run of ``model_name`` version ``version``;
        ``allow_older`` lets a person release a version older than the champion (never the webhook)."""
        deployment_id = self.deployment_id()
        parameters: dict[str, Any] = {"model_name": model_name, "version": str(version)}
        if allow_older:
            parameters["allow_older"] = True
        response = self._request(
            "POST",
            f"/deployments/{deployment_id}/create_flow_run",
            json={
                "name": release_run_name(model_name, version),
                "parameters": parameters,
                "idempotency_key": idempotency_key,
            },
        )
        run_id = _id_of(_json(response), "created flow run")
        _log.info(
            "flow run %s for %s v%s %s (key %s)", run_id, model_name, version,
            "created" if response.status_code == 201 else "already existed", idempotency_key,
        )
        return run_id

    def list_flow_runs(
        self, model_name: str | None = None, version: str | None = None
    ) -> list[dict[str, Any]]:
        """Flow runs of the deployment, optionally only those with these parameters, oldest first."""
        deployment_id = self.deployment_id()
        runs: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = _json(self._request("POST", "/flow_runs/filter", json={
                "flow_runs": {"deployment_id": {"any_": [deployment_id]}},
                "sort": "EXPECTED_START_TIME_ASC", "limit": _PAGE, "offset": offset,
            }))
            if not isinstance(page, list):
                raise PrefectAPIError(f"Prefect API answered a {type(page).__name__} to /flow_runs/filter")
            runs.extend(page)
            if len(page) < _PAGE:
                break
            offset += _PAGE
        unique = {r.get("id"): r for r in runs}  # pages can overlap if runs are created meanwhile
        return [r for r in unique.values() if _matches(r.get("parameters") or {}, model_name, version)]

    def mark_crashed(self, run_id: str, message: str) -> None:
        """Force a flow run into CRASHED (its process died without reporting; reconcile saw no heartbeat)."""
        body = _json(self._request("POST", f"/flow_runs/{quote(run_id, safe='')}/set_state", json={
            "state": {"type": "CRASHED", "name": "Crashed", "message": message[:2000]}, "force": True}))
        outcome = body.get("status") if isinstance(body, dict) else None
        if outcome not in (None, "ACCEPT"):
            raise PrefectAPIError(f"Prefect answered {outcome!r} (expected ACCEPT) to marking run {run_id} crashed: "
                                  f"{str(body.get('details'))[:200]}")
        _log.warning("flow run %s marked crashed: %s", run_id, message)

    def count_runs(self, model_name: str, version: str) -> int:
        """How many release runs exist for this model version."""
        return len(self.list_flow_runs(model_name, version))

    def healthy(self) -> bool:
        """Whether the Prefect server answers ``/api/health``."""
        try:
            self._request("GET", "/health")
        except OrchestrationError:
            return False
        return True


def _backoff(attempt: int, retry_after: str | None) -> float:
    if retry_after and retry_after.isdigit():
        return min(float(retry_after), _MAX_BACKOFF_S)
    # 0.25, 0.5, 1, 2, 4 s: about 8 s in all, what a busy SQLite behind Prefect needs (seen: a 503 burst after a
    # server restart outlasted 1.5 s), still inside a webhook sender's timeout
    return min(0.25 * 2**attempt + random.uniform(0, 0.1), _MAX_BACKOFF_S)


def _matches(params: Mapping[str, Any], model_name: str | None, version: str | None) -> bool:
    return (model_name is None or params.get("model_name") == model_name) and (
        version is None or str(params.get("version")) == str(version)
    )


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise PrefectAPIError(
            f"Prefect API answered {response.status_code} with a non-JSON body: {response.text[:200]!r}",
            status_code=response.status_code,
        ) from exc


def _id_of(body: Any, what: str) -> str:
    if isinstance(body, dict) and isinstance(body.get("id"), str) and body["id"]:
        return body["id"]
    raise PrefectAPIError(f"Prefect API answered without an id for the {what}: {str(body)[:200]!r}")


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or "(empty body)"
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:300]
    return str(body)[:300]


def prefect_launcher(settings: Settings, deployment: str | None = None, **kwargs: Any) -> PrefectLauncher:
    """The launcher for the settings' Prefect API (embedded, or the team's with its API key), for ``deployment``
    (default: the release deployment)."""
    key = credential_env(settings).get(PREFECT_KEY)
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return PrefectLauncher(settings.prefect_api_url, deployment or settings.prefect.release_deployment,
                           headers=headers, **kwargs)
