"""Warm-up and smoke test of a staged version, through the router with the version pinned."""

from __future__ import annotations

import time
from collections.abc import Mapping

import httpx
import numpy as np

from canaryflow.core.serving_contract import VERSION_HEADER
from validation.results import GateResult, failed, passed


def _post(client: httpx.Client, url: str, version: str, body: object) -> httpx.Response:
    return client.post(url, json=body, headers={VERSION_HEADER: str(version)})


def smoke_test(router_url: str, model: str, version: str, rows: np.ndarray, warmup: int,
               timeout_s: float = 30.0, pin: Mapping[str, str] | None = None) -> GateResult:
    """Warm the version up, then check a good batch answers row for row and a bad one is a 400.

    The request after the bad one must succeed again: a malformed request must never cost a worker. ``pin``: the
    router's pin credentials (:meth:`TrafficRouter.pin_credentials`), sent with every pinned request.
    """
    gate = "smoke"
    url = f"{router_url}/predictions/{model}"
    good = {"inputs": rows.tolist()}
    with httpx.Client(timeout=timeout_s, headers=dict(pin or {})) as client:
        try:
            for _ in range(warmup):
                _post(client, url, version, {"inputs": rows[:1].tolist()})
            started = time.perf_counter()
            resp = _post(client, url, version, good)
            latency_ms = (time.perf_counter() - started) * 1000
            if resp.status_code != 200:
                return failed(gate, f"{len(rows)}-row request answered HTTP {resp.status_code}: {resp.text[:300]}")
            preds = resp.json().get("predictions", [])
            served = {str(p.get("model_version")) for p in preds}
            if len(preds) != len(rows) or served != {str(version)}:
                return failed(gate, f"{len(preds)} predictions from versions {sorted(served)} for "
                                    f"{len(rows)} rows sent to v{version}")
            bad = _post(client, url, version, {"inputs": [["not-a-number"] * rows.shape[1]]})
            if bad.status_code != 400:
                return failed(gate, f"a non-numeric row answered HTTP {bad.status_code}, expected 400")
            again = _post(client, url, version, good)
            if again.status_code != 200:
                return failed(gate, f"request after a bad one answered HTTP {again.status_code}: {again.text[:200]}")
        except httpx.HTTPError as exc:
            return failed(gate, f"router unreachable at {url}: {exc}")
    return passed(gate, f"{len(rows)} rows answered by v{version} in {latency_ms:.1f} ms; bad row -> 400; "
                        "next request 200", latency_ms=round(latency_ms, 2))
