"""The key-renewal soak for tests/integration/test_key_renewal.py: a second, small stack whose TorchServe issues
2-minute keys (``CANARYFLOW_SERVING__TOKEN_EXPIRATION_MIN=2``), run for a little over 3 minutes with steady traffic
through its router, then checked and stopped.

Only the services renewal involves, as the real stack runs them (``LocalStack.programs()``, its own supervisord, its
own state dir and free ports): TorchServe, the nginx router and the keyrenew listener; no MLflow or Prefect (the
model is archived and registered here), no keywatch (it acts on restarts only, and costs ~265 MB).

The soak runs in a background thread. The shared ``stack`` fixture starts it beside the session's stack when the
soak's test is selected (tests/conftest.py), so its 3 minutes overlap the stack's start and first tests instead of
adding to the suite's wall time; the test (sorted among the stack's tests) only waits for what is left of it. Run
alone, the test starts it and waits about 4 minutes.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

SOAK_S = 180.0  # the final checks come this long after TorchServe issued its first keys
EXPIRY_MIN = 2
MODEL = "keyrenew-model"
FIXTURE = "key_renewal_soak"
GAP_GRACE_S = 5.0  # a refused request this close to an inference renewal is counted as one of its gap
ROW = [0.5, -1.0, 2.0, 0.0]

_soak: Soak | None = None


@dataclass
class Request:
    start: float
    end: float
    status: int  # -1: no answer (the exception is in ``detail``)
    detail: str = ""


@dataclass
class Observation:
    """What the soak saw; the test asserts on it."""

    started_at: float = 0.0
    healthy_at: float = 0.0  # TorchServe answered (its first keys were issued just before)
    issued_at: float = 0.0  # first inference key's expiry minus the configured lifetime
    serving_at: float = 0.0  # router up with the model: traffic starts
    final_at: float = 0.0
    ended_at: float = 0.0
    env_expiry: str | None = None  # CANARYFLOW_SERVING__TOKEN_EXPIRATION_MIN as given to supervisord
    config: str = ""
    initial_keys: dict[str, str] = field(default_factory=dict)
    final_keys: dict[str, str] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    management: list[tuple[float, str]] = field(default_factory=list)  # (when, "ok" or the error)
    final_predictions: list[Request] = field(default_factory=list)
    final_versions: list[str] | str = ""
    renewal: dict[str, Any] | None = None  # keyrenew.json at the end
    listener_log: str = ""
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds of the soak's processes, by name
    error: str | None = None

    @property
    def wall_s(self) -> float:
        return self.ended_at - self.started_at


class Soak:
    """One soak: prepared in the caller's thread (settings, environment, config), run in a background thread."""

    def __init__(self, root: Path, avoid_ports: set[int]) -> None:
        from canaryflow.core.paths import StatePaths
        from canaryflow.core.settings import Ports, Settings
        from canaryflow.local.stack import LocalStack, child_env
        from canaryflow.local.supervisor import render_config
        from tests.conftest import PORT_NAMES, free_ports

        ports = free_ports(len(PORT_NAMES))
        while avoid_ports & set(ports):
            ports = free_ports(len(PORT_NAMES))
        # TorchServe's workers talk over unix sockets in its private TMPDIR; the base only names them
        worker_base = 20010 + (os.getpid() % 400) * 20
        self.settings = Settings(state_dir=root, ports=Ports(**dict(zip(PORT_NAMES, ports, strict=True)),
                                                             torchserve_worker_base=worker_base),
                                 serving={"token_expiration_min": EXPIRY_MIN, "java_heap_mb": 256})
        self.paths = StatePaths(self.settings.state_dir).ensure()
        self.local = LocalStack(self.settings)
        programs = [p for p in self.local.programs() if p.name in ("torchserve", "router", "keyrenew")]
        assert {p.name for p in programs} == {"torchserve", "router", "keyrenew"}, programs
        self.config = render_config(self.paths, programs)
        self.env = child_env(self.settings, self.paths)
        self.obs = Observation(env_expiry=self.env.get("CANARYFLOW_SERVING__TOKEN_EXPIRATION_MIN"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="key-renewal-soak", daemon=True)

    # -- control -------------------------------------------------------------------------------------------------
    def start(self) -> Soak:
        self._thread.start()
        return self

    def result(self, timeout_s: float = 900.0) -> Observation:
        """Wait for the soak to end (at most ``timeout_s``) and return what it saw."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.obs.error = f"the soak did not end within {timeout_s:.0f} s"
        return self.obs

    def stop(self) -> None:
        """Stop the soak and its processes (by supervisord's pid and its process tree); idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(120)
        self.local.down()

    # -- the run -------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        obs = self.obs
        obs.started_at = time.time()
        workers: list[threading.Thread] = []
        traffic_stop = threading.Event()
        try:
            self._serve()
            if self._stop.is_set():
                return
            workers = [threading.Thread(target=self._traffic, args=(traffic_stop,), daemon=True),
                       threading.Thread(target=self._manage, args=(traffic_stop,), daemon=True)]
            for w in workers:
                w.start()
            # 3 minutes after the keys were issued (TorchServe answered after it wrote them)
            while time.time() < obs.healthy_at + SOAK_S and not self._stop.is_set():
                time.sleep(1.0)
            traffic_stop.set()
            for w in workers:
                w.join(60)
            self._final_checks()
        except Exception:  # noqa: BLE001 - reported to the test
            obs.error = traceback.format_exc()
        finally:
            traffic_stop.set()
            for w in workers:
                w.join(60)
            try:
                obs.listener_log = (self.paths.logs / "keyrenew.log").read_text()[-20000:]
            except OSError:
                pass
            obs.cpu_s = self._cpu_seconds()
            try:
                self.local.down()
            finally:
                obs.ended_at = time.time()

    def _cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds of supervisord's live process tree, summed by process name."""
        import psutil

        pid = self.local.supervisor.pid()
        out: dict[str, float] = {}
        if pid is None:
            return out
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                times, name = proc.cpu_times(), proc.name()
            except psutil.Error:
                continue
            out[name] = round(out.get(name, 0.0) + times.user + times.system, 2)
        return out

    def _serve(self) -> None:
        """Start TorchServe and the listener, register the model, route it, start the router."""
        from canaryflow.core.errors import StackError
        from deployments import torchserve

        obs, paths = self.obs, self.paths
        archive = self._archive()
        torchserve.write_config(self.settings, paths)
        obs.config = paths.torchserve_config.read_text()
        self.local.supervisor.start(self.config, self.env)
        try:
            self.local.wait_healthy(["torchserve"], timeout_s=300)
        except StackError as exc:
            raise StackError(f"{exc}\n{_tail(paths.logs / 'torchserve.log')}") from exc
        obs.healthy_at = time.time()
        torchserve.key_file_mode_private(paths)
        obs.initial_keys = torchserve.read_keys(paths)
        first = torchserve.key_expiries(paths)["inference"]
        obs.issued_at = first.timestamp() - EXPIRY_MIN * 60
        client = self.local.torchserve
        client.register(MODEL, "1", archive)
        client.set_default(MODEL, "1")
        self.local.router.set_route(MODEL, "1")
        self.local.supervisor.start_program("router")
        self.local.wait_healthy(["router"], timeout_s=120)
        obs.serving_at = time.time()

    def _archive(self) -> Path:
        """A tiny exported model (4 features, 2 classes) archived with our handler into the soak's model store."""
        import torch

        from canaryflow.core.serving_contract import META_FILE, ServingMeta
        from deployments.archive import build_mar

        bundle = self.paths.root / "bundle"
        bundle.mkdir(exist_ok=True)
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2).eval()
        program = torch.export.export(model, (torch.randn(2, 4),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
        torch.export.save(program, bundle / "model.pt2")
        ServingMeta(model_name=MODEL, model_version="1", format="torch_export", model_file="model.pt2",
                    n_features=4).save(bundle / META_FILE)
        return build_mar(bundle / "model.pt2", [bundle / META_FILE], model=MODEL, version="1",
                         model_store=self.paths.model_store).path

    def _predict(self, client: httpx.Client) -> Request:
        start = time.time()
        try:
            resp = client.post(f"{self.settings.router_url}/predictions/{MODEL}", json={"inputs": [ROW]})
        except httpx.HTTPError as exc:
            return Request(start, time.time(), -1, repr(exc)[:300])
        return Request(start, time.time(), resp.status_code, "" if resp.status_code == 200 else resp.text[:300])

    def _traffic(self, stop: threading.Event) -> None:
        """Steady light load through the router: one request at a time, ~10 a second."""
        with httpx.Client(timeout=30.0) as client:
            while not stop.is_set():
                self.obs.requests.append(self._predict(client))
                stop.wait(0.1)

    def _manage(self, stop: threading.Event) -> None:
        """A management call every 3 s, as the pipeline makes them (the key read from key_file.json each time)."""
        while not stop.wait(3.0):
            try:
                versions = self.local.torchserve.versions(MODEL)
                self.obs.management.append((time.time(), "ok" if versions == ["1"] else f"versions {versions}"))
            except Exception as exc:  # noqa: BLE001
                self.obs.management.append((time.time(), str(exc)[:300]))

    def _final_checks(self) -> None:
        from canaryflow.local.keyrenew import read_state
        from deployments import torchserve

        obs = self.obs
        obs.final_at = time.time()
        with httpx.Client(timeout=30.0) as client:
            for _ in range(3):  # a renewal's gap may fall on the first one; the next comes 2 s later
                obs.final_predictions.append(self._predict(client))
                if obs.final_predictions[-1].status == 200:
                    break
                time.sleep(2.0)
        try:
            obs.final_versions = self.local.torchserve.versions(MODEL)
        except Exception as exc:  # noqa: BLE001
            obs.final_versions = str(exc)
        obs.final_keys = torchserve.read_keys(self.paths)
        obs.renewal = read_state(self.paths)


def gap_figures(obs: Observation) -> dict[str, Any]:
    """Requests refused in the renewal gaps (between an inference key's swap and the router's reload) and any
    other non-200 answer."""
    history = (obs.renewal or {}).get("history", [])
    windows = [(h["at"], h["at"] + h.get("router_live_s", 0.0) + GAP_GRACE_S)
               for h in history if h["kind"] == "inference" and h.get("ok")]

    def in_gap(r: Request) -> bool:
        return any(r.end >= lo and r.start <= hi for lo, hi in windows)

    failed = [r for r in obs.requests if r.status != 200]
    return {
        "requests": len(obs.requests),
        "non_200": len(failed),
        "non_200_in_gaps": sum(in_gap(r) for r in failed),
        "outside_gaps": [r for r in failed if not in_gap(r)],
        "gap_statuses": sorted({(r.status, r.detail[:80]) for r in failed if in_gap(r)}),
        "inference_renewals": len(windows),
        "router_live_s": [h.get("router_live_s") for h in history if h["kind"] == "inference" and h.get("ok")],
        "post_s": [h.get("post_s") for h in history if h["kind"] == "inference" and h.get("ok")],
        "management_calls": len(obs.management),
        "management_failures": [m for m in obs.management if m[1] != "ok"],
    }


def selected(session: pytest.Session) -> bool:
    return any(FIXTURE in getattr(item, "fixturenames", ()) for item in session.items)


def start_soak(session: pytest.Session, tmp_path_factory: pytest.TempPathFactory,
               beside: dict[str, str] | None = None, force: bool = False) -> Soak | None:
    """The session's soak, started on first call: when ``force``d (its test), or when its test is selected (the
    shared stack's fixture, ``beside`` its environment, whose ports it avoids). Stopped at session end at the
    latest."""
    global _soak
    if _soak is None and (force or selected(session)):
        avoid = {int(v) for k, v in (beside or {}).items() if k.startswith("CANARYFLOW_PORTS__")}
        _soak = Soak(tmp_path_factory.mktemp("keyrenew") / ".canaryflow", avoid).start()
        session.config.add_cleanup(_soak.stop)
    return _soak


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text()[-chars:]
    except OSError:
        return f"({path} unreadable)"
