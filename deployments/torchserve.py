"""TorchServe, the local serving backend: config rendering, its keys, and a management API client.

TorchServe 0.12 keeps token auth on: every call needs ``Authorization: Bearer <key>``, and the keys are
regenerated each time it starts (``key_file.json`` in its working directory), so they are read from disk
on every call rather than cached for the process lifetime. The inference and management keys expire
``serving.token_expiration_min`` after they were issued; :meth:`TorchServeClient.renew_key` has TorchServe issue
a new one (canaryflow/local/keyrenew.py does, before they expire; :func:`keys_due` says when).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from canaryflow.core.errors import ServingError
from canaryflow.core.names import name_problem
from canaryflow.core.paths import StatePaths, model_file_name, read_json, write_json
from canaryflow.core.serving_contract import REPLAY_HEADER
from canaryflow.core.settings import ServingConfig, Settings
from deployments.prometheus import TORCHSERVE_METRICS_FILE


class ServingBackend(Protocol):
    """What the release flow needs from a model server (TorchServe locally, Kubernetes later)."""

    def healthy(self) -> bool: ...
    def versions(self, model: str) -> list[str]: ...
    def register(self, model: str, version: str, archive: Path) -> bool: ...
    def unregister(self, model: str, version: str) -> None: ...
    def tune(self, model: str, version: str, archive: Path, config: ServingConfig) -> bool: ...
    def serving_config(self, model: str, version: str) -> ServingConfig | None: ...
    def set_default(self, model: str, version: str) -> None: ...
    def default_version(self, model: str) -> str | None: ...
    def replay(self, model: str, version: str, rows: list[list[float]]) -> list[dict[str, Any]]: ...


def render_config(settings: Settings, paths: StatePaths) -> str:
    """config.properties: every address on loopback, model API on, prometheus metrics."""
    h, p, s = settings.host, settings.ports, settings.serving
    lines = {
        "inference_address": f"http://{h}:{p.torchserve_inference}",
        "management_address": f"http://{h}:{p.torchserve_management}",
        "metrics_address": f"http://{h}:{p.torchserve_metrics}",
        "grpc_inference_address": h,
        "grpc_management_address": h,
        "grpc_inference_port": p.torchserve_grpc_inference,
        "grpc_management_port": p.torchserve_grpc_management,
        "initial_worker_port": p.torchserve_worker_base,
        "model_store": paths.model_store,
        "enable_model_api": "true",
        "metrics_mode": "prometheus",
        "disable_system_metrics": "true",
        "token_expiration_min": s.token_expiration_min,
        "default_workers_per_model": s.workers_per_version,
        "default_response_timeout": s.response_timeout_s,
        "install_py_dep_per_model": "false",
        # TorchServe's default metrics + the handler's live-traffic counters (deployments/prometheus.py)
        "metrics_config": paths.torchserve_dir / TORCHSERVE_METRICS_FILE.name,
        # Only archives already in the model store can be registered: a stolen management key cannot make
        # TorchServe fetch (and run) a remote .mar.
        "allowed_urls": f"file://{paths.model_store}/.*",
        "vmargs": f"{s.jvm_options} -Dlog4j.configurationFile=file://{paths.torchserve_log4j}",
    }
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def write_config(settings: Settings, paths: StatePaths) -> None:
    """Write config.properties and the log4j config into the state dir."""
    paths.torchserve_config.write_text(render_config(settings, paths))
    paths.torchserve_log4j.write_text((Path(__file__).with_name("templates") / "log4j2.xml").read_text())
    (paths.torchserve_dir / TORCHSERVE_METRICS_FILE.name).write_text(TORCHSERVE_METRICS_FILE.read_text())


def command(paths: StatePaths) -> list[str]:
    """The foreground command supervisord runs (``--foreground`` keeps the Java process its child)."""
    exe = shutil.which("torchserve", path=str(Path(sys.executable).parent)) or "torchserve"
    return [exe, "--start", "--foreground", "--ts-config", str(paths.torchserve_config),
            "--model-store", str(paths.model_store)]


def environment(paths: StatePaths) -> dict[str, str]:
    """Private temp dir (else pid file and worker sockets are machine-wide in /tmp) and one thread per worker."""
    tmp = str(paths.torchserve_tmp)
    return {"TMPDIR": tmp, "TEMP": tmp, "OMP_NUM_THREADS": "1", "CANARYFLOW_TRAFFIC_DIR": str(paths.traffic_dir),
            "LOG_LOCATION": str(paths.torchserve_dir / "logs"),
            "METRICS_LOCATION": str(paths.torchserve_dir / "logs")}


RENEWABLE_KEYS = ("inference", "management")
"""TorchServe's keys that expire. The third, "API", never does: it only mints new keys (``POST /token``)."""
_INVALID_KEY = "InvalidKeyException"  # TorchServe's 400 for a wrong or expired key
MIN_RENEW_MARGIN = timedelta(seconds=15)
"""A key is renewed at least this long before it expires, whatever the fraction (3 of keyrenew's 5-s ticks)."""


def _key_file(paths: StatePaths, attempts: int = 3) -> dict[str, Any]:
    # TorchServe rewrites the file in place at a renewal (truncate, then write): a read in between sees no JSON, so
    # that is read again a moment later.
    for attempt in range(attempts):
        try:
            raw = json.loads(paths.torchserve_keys.read_text())
            break
        except ValueError as exc:
            if attempt + 1 == attempts:
                raise ServingError(f"TorchServe key file {paths.torchserve_keys} unreadable ({exc})") from exc
            time.sleep(0.05)
        except OSError as exc:
            raise ServingError(f"TorchServe key file {paths.torchserve_keys} unreadable ({exc}); is it running?") \
                from exc
    if not isinstance(raw, dict):
        raise ServingError(f"TorchServe key file {paths.torchserve_keys} is not a JSON object")
    return raw


def read_keys(paths: StatePaths) -> dict[str, str]:
    """TorchServe's current keys: {"inference": ..., "management": ..., "API": ...}."""
    raw = _key_file(paths)
    return {name: entry["key"] for name, entry in raw.items() if isinstance(entry, dict) and "key" in entry}


def key_expiries(paths: StatePaths) -> dict[str, datetime]:
    """When TorchServe's inference and management keys expire (aware UTC), from ``key_file.json``'s
    ``"expiration time"`` (an ISO-8601 instant such as ``2026-12-06T13:00:00.123456789Z``)."""
    raw = _key_file(paths)
    out = {}
    for kind in RENEWABLE_KEYS:
        try:
            when = datetime.fromisoformat(raw[kind]["expiration time"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ServingError(f"TorchServe key file {paths.torchserve_keys}: no valid expiration time for the "
                               f"{kind} key ({exc!r})") from exc
        out[kind] = when if when.tzinfo else when.replace(tzinfo=UTC)
    return out


def keys_due(expiries: Mapping[str, datetime], lifetimes: Mapping[str, timedelta], now: datetime,
             fraction: float) -> list[str]:
    """The keys to renew now, in :data:`RENEWABLE_KEYS` order: those with less than ``fraction`` of their
    lifetime left (and at least :data:`MIN_RENEW_MARGIN`), expired ones included (the API key renews them too)."""
    return [kind for kind in RENEWABLE_KEYS if kind in expiries and kind in lifetimes
            and expiries[kind] - now < max(lifetimes[kind] * fraction, MIN_RENEW_MARGIN)]


def archive_name(model: str, version: str) -> str:
    """File name of a version's archive in the model store (the archiver always writes <model>.mar)."""
    return f"{model}_v{version}.mar"


BATCHED_SUFFIX = "..batched"
"""The batched twin of a model's versions is registered in TorchServe as ``<model>..batched``: a name the name rule
(canaryflow.core.names) never lets a registered model have (no ``..``), so it cannot collide with one."""


def batched_name(model: str) -> str:
    """The TorchServe model name of a version's batched twin (adaptive batching, TorchServeClient.register)."""
    return model + BATCHED_SUFFIX


def _batched_dir(paths: StatePaths) -> Path:
    return paths.torchserve_dir / "batched"


def batched_twins(paths: StatePaths) -> list[tuple[str, str, str]]:
    """Every version served with adaptive batching, as ``(model, version, TorchServe name of its batched twin)``,
    from the records :class:`TorchServeClient` keeps while the twin is registered (the router routes with them).
    A record that is not what the client writes is ignored."""
    out = []
    for path in sorted(_batched_dir(paths).glob("*.json")):
        record = read_json(path)
        if not isinstance(record, dict):
            continue
        model, version = record.get("model"), record.get("version")
        if isinstance(model, str) and name_problem(model, version) is None \
                and record.get("name") == batched_name(model):
            out.append((model, str(version), batched_name(model)))
    return out


@dataclass
class TorchServeClient:
    """Management and inference calls against the local TorchServe (implements ServingBackend)."""

    settings: Settings
    paths: StatePaths
    timeout_s: float = 10.0
    on_batched_change: Callable[[], None] | None = None
    """Called when a version's batched twin comes or goes (the local platform refreshes the router's table)."""

    def _call(self, api: str, method: str, path: str, *, timeout: float | None = None,
              headers: dict[str, str] | None = None, key: str | None = None, **kwargs: Any) -> httpx.Response:
        """One call to the ``api`` port with the key of that name (or ``key``: "API" for the token API)."""
        port = {"inference": self.settings.ports.torchserve_inference,
                "management": self.settings.ports.torchserve_management}[api]
        kind = key or api
        sent = read_keys(self.paths)[kind]
        url = f"http://{self.settings.host}:{port}{path}"

        def send(token: str) -> httpx.Response:
            try:
                return httpx.request(method, url, headers={**(headers or {}), "Authorization": f"Bearer {token}"},
                                     timeout=timeout or self.timeout_s, **kwargs)
            except httpx.HTTPError as exc:
                raise ServingError(f"TorchServe {api} API unreachable at {url}: {exc}") from exc

        resp = send(sent)
        if resp.status_code == 400 and _INVALID_KEY in resp.text:
            # The key was renewed (or TorchServe restarted) between reading it and the call. TorchServe refuses a
            # bad key before it looks at the request, so sending it again with the current key is safe.
            try:
                current = read_keys(self.paths).get(kind)
            except ServingError:
                return resp
            if current and current != sent:
                resp = send(current)
        return resp

    @staticmethod
    def _check(resp: httpx.Response, what: str) -> httpx.Response:
        if resp.status_code >= 400:
            raise ServingError(f"TorchServe refused to {what}: HTTP {resp.status_code} {resp.text[:300]}")
        return resp

    def healthy(self) -> bool:
        """True when the inference API answers /ping with Healthy."""
        try:
            resp = self._call("inference", "GET", "/ping", timeout=2.0)
        except ServingError:
            return False
        return resp.status_code == 200 and resp.json().get("status") == "Healthy"

    def versions(self, model: str) -> list[str]:
        """Registered versions of a model ([] when the model is unknown)."""
        resp = self._call("management", "GET", f"/models/{_seg(model)}/all")
        if resp.status_code == 404:
            return []
        return [str(d["modelVersion"]) for d in self._check(resp, f"list {model}").json()]

    def describe(self, model: str, version: str) -> dict[str, Any]:
        """TorchServe's description of one version (workers, default flag, ...)."""
        resp = self._check(self._call("management", "GET", f"/models/{_seg(model)}/{_seg(version)}"),
                           f"describe {model}")
        return resp.json()[0]

    def default_version(self, model: str) -> str | None:
        """The version TorchServe serves for ``/predictions/<model>`` without a version (None: model unknown)."""
        resp = self._call("management", "GET", f"/models/{_seg(model)}")
        if resp.status_code == 404:
            return None
        return str(self._check(resp, f"describe {model}").json()[0]["modelVersion"])

    def register(self, model: str, version: str, archive: Path) -> bool:
        """Register an archive from the model store, with the serving settings its release measured (or
        serving.*); False when that version was already registered.

        A batched setting is served adaptively (``serving.adaptive_batching``): the version is registered twice
        from the same archive, under its name without batching (one worker: the router sends it a request only
        while none of the version's is in flight, so a lone request never waits for a batch that cannot fill)
        and under :func:`batched_name` with the setting (the requests that arrive while others are in flight,
        batched). The twin is registered and recorded before the version itself: a version that answers is
        routed adaptively, and a registration cut short is completed by the next one."""
        config = self.serving_config(model, version)
        plain = config
        if self.settings.serving.adaptive_batching and config.batch_size > 1:
            plain = ServingConfig(workers=1, batch_size=1, max_batch_delay_ms=config.max_batch_delay_ms)
            if version not in self.versions(batched_name(model)):
                self._register(batched_name(model), version, archive, config)
            self._record_batched(model, version)
        else:  # served as one registration now (a setting without batching, or adaptive batching turned off)
            self._drop_batched(model, version)
        if version in self.versions(model):
            return False
        return self._register(model, version, archive, plain)

    def _register(self, name: str, version: str, archive: Path, config: ServingConfig) -> bool:
        # In a server-side batch a malformed request fails only itself (the handler's per-request status).
        params = {"url": archive.name, "model_name": name, "initial_workers": config.workers,
                  "synchronous": "true", "response_timeout": self.settings.serving.response_timeout_s,
                  "batch_size": config.batch_size, "max_batch_delay": config.max_batch_delay_ms}
        resp = self._call("management", "POST", "/models", params=params, timeout=120.0)
        if resp.status_code == 409:
            return False
        self._check(resp, f"register {archive.name} as {name}")
        return True

    def unregister(self, model: str, version: str) -> None:
        """Unregister a version (and forget its measured serving settings); a version that is not there is fine
        (idempotent)."""
        self._unregister(model, version)
        self._tuning_file(model, version).unlink(missing_ok=True)

    def _unregister(self, model: str, version: str) -> None:
        """Both registrations of a version; the router stops sending to the batched twin before it goes."""
        self._drop_batched(model, version, always=True)
        self._delete(model, version)

    def _drop_batched(self, model: str, version: str, always: bool = False) -> None:
        """The version's batched twin out of the router, then out of TorchServe (its DELETE only when it was
        recorded, or ``always``)."""
        record = self._batched_file(model, version)
        if record.exists():
            record.unlink()
            self._batched_changed()
        elif not always:
            return
        self._delete(batched_name(model), version)

    def _delete(self, name: str, version: str) -> None:
        resp = self._call("management", "DELETE", f"/models/{_seg(name)}/{_seg(version)}", timeout=60.0)
        if resp.status_code != 404:
            self._check(resp, f"unregister {name} v{version}")

    def batched_config(self, model: str, version: str) -> ServingConfig | None:
        """How the version's batched twin is served (None: it has none; every request goes to the version)."""
        if not self._batched_file(model, version).exists():
            return None
        return self.serving_config(model, version)

    def _record_batched(self, model: str, version: str) -> None:
        path = self._batched_file(model, version)
        record = {"model": model, "version": version, "name": batched_name(model)}
        if read_json(path) == record:
            return
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_json(path, record)
        self._batched_changed()

    def _batched_changed(self) -> None:
        if self.on_batched_change is not None:
            self.on_batched_change()

    def _batched_file(self, model: str, version: str) -> Path:
        return _batched_dir(self.paths) / model_file_name(f"{model} v{version}", ".json")

    def tune(self, model: str, version: str, archive: Path, config: ServingConfig) -> bool:
        """Serve a STAGED version with ``config`` from now on: recorded (so a TorchServe restart or a re-registration
        keeps it) and the version registered again with it (TorchServe sets batching only at registration). Never
        for a version that takes live traffic: it answers nothing while it registers again."""
        path = self._tuning_file(model, version)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_json(path, config.model_dump())
        os.chmod(path, 0o600)
        self._unregister(model, version)
        return self.register(model, version, archive)

    def serving_config(self, model: str, version: str) -> ServingConfig:
        """The serving settings a version's release measured, else serving.*."""
        recorded = read_json(self._tuning_file(model, version))
        if isinstance(recorded, dict):
            try:
                return ServingConfig.model_validate(recorded)
            except ValueError:
                pass  # a damaged record: the operator's settings
        return ServingConfig.of(self.settings.serving)

    def _tuning_file(self, model: str, version: str) -> Path:
        return self.paths.torchserve_dir / "tuning" / model_file_name(f"{model} v{version}", ".json")

    def replay(self, model: str, version: str, rows: list[list[float]]) -> list[dict[str, Any]]:
        """Answer live rows again with one version, out of band (the canary's pairwise replay): straight to the
        inference API, so the router's access log and the traffic sample see nothing. Returns the predictions."""
        path = f"/predictions/{_seg(model)}/{_seg(version)}"
        resp = self._call("inference", "POST", path, json={"inputs": rows}, timeout=30.0,
                          headers={REPLAY_HEADER: "1", "Content-Type": "application/json"})
        body = self._check(resp, f"replay {len(rows)} rows on {model} v{version}").json()
        return list(body["predictions"])

    def set_default(self, model: str, version: str) -> None:
        """Make a version TorchServe's default for /predictions/<model>."""
        self._check(self._call("management", "PUT", f"/models/{_seg(model)}/{_seg(version)}/set-default"),
                    f"set {model} v{version} as default")

    def key_expiries(self) -> dict[str, datetime]:
        """When the current inference and management keys expire (see :func:`key_expiries`)."""
        return key_expiries(self.paths)

    def renew_key(self, kind: str) -> datetime:
        """Have TorchServe issue a new ``kind`` key ("inference" or "management") with a full lifetime; returns
        when it expires. Uses the token API with the API key, which never expires: an expired key is renewed too.
        The old key is refused from that moment on; TorchServe rewrites key_file.json before it answers. The
        router holds a copy of the inference key: refresh it at once (NginxRouter.refresh)."""
        if kind not in RENEWABLE_KEYS:
            raise ValueError(f"{kind!r} is not one of TorchServe's expiring keys {RENEWABLE_KEYS}")
        before = read_keys(self.paths).get(kind)
        self._check(self._call("management", "POST", "/token", params={"type": kind}, key="API"),
                    f"renew its {kind} key")
        key_file_mode_private(self.paths)
        if read_keys(self.paths).get(kind) == before:
            raise ServingError(f"TorchServe answered the {kind} key renewal but {self.paths.torchserve_keys} "
                               "still holds the old key")
        return key_expiries(self.paths)[kind]


def key_file_mode_private(paths: StatePaths) -> None:
    """TorchServe writes its keys world-readable; keep them to the owner."""
    if paths.torchserve_keys.exists():
        os.chmod(paths.torchserve_keys, 0o600)


def _seg(value: object) -> str:
    """One URL path segment: every character that is not unreserved is percent-encoded (``iris?`` stays one
    model's name, never a query string; ``a/b`` never two segments)."""
    return quote(str(value), safe="")
