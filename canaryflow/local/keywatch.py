"""supervisord event listener: when TorchServe (re)starts, bring serving back to what the router records.

TorchServe regenerates its keys at every start and forgets its registered models (it ignores its config
snapshots when started with --ts-config). Without this, a TorchServe that supervisord restarted after a crash
would answer the router with 401s and then 404s. So: wait (with backoff, bounded) until TorchServe answers with
its new key, re-render the router with that key (always, whatever else fails), re-register every routed version
(champion and canary) from the model store, skipping and reporting any that fails (a missing .mar), and make the
champion the default. The outcome goes to ``<state>/keywatch.json``, which ``canaryflow status`` shows; reconcile
re-renders a router whose key is still stale if this listener could not.
Run by supervisord as ``python -m canaryflow.keywatch``; stdout is supervisord's protocol, logs go to stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from canaryflow.core.paths import StatePaths, read_json, write_json
from canaryflow.release.converge import ArchiveMissing, register_from_store
from deployments import torchserve
from deployments.routes import TrafficRouter
from deployments.torchserve import ServingBackend

WATCHED = "torchserve"
RESULT_FILE = "keywatch.json"


@dataclass
class Recovery:
    """What one recovery did; written to ``keywatch.json``."""

    at: float
    healthy: bool = False
    router_rendered: bool = False
    restored: list[str] = field(default_factory=list)
    missing_archives: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    waited_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.healthy and self.router_rendered and not self.problems

    def summary(self) -> str:
        if not self.healthy:
            return f"TorchServe not healthy after {self.waited_s:.0f} s; router not re-rendered: " + \
                "; ".join(self.problems)
        head = (f"re-registered {', '.join(self.restored) or 'nothing'}; router "
                f"{'re-rendered with the new inference key' if self.router_rendered else 'NOT re-rendered'}")
        return head + (f"; problems: {'; '.join(self.problems)}" if self.problems else "")


def wait_healthy(healthy: Callable[[], bool], timeout_s: float, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, first_s: float = 0.5, max_s: float = 8.0) -> float | None:
    """Poll ``healthy`` with exponential backoff until it answers True (returns the seconds waited) or
    ``timeout_s`` passed (None)."""
    started = clock()
    delay = first_s
    while True:
        if healthy():
            return clock() - started
        left = timeout_s - (clock() - started)
        if left <= 0:
            return None
        sleep(min(delay, left))
        delay = min(delay * 2, max_s)


def recover(backend: ServingBackend, router: TrafficRouter, model_store: Path, timeout_s: float = 600.0,
            sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> Recovery:
    """Wait until TorchServe answers (its key file is then current), re-render the router with the new key,
    re-register each routed version (errors skipped and reported), set the defaults."""
    result = Recovery(at=time.time())
    waited = wait_healthy(backend.healthy, timeout_s, sleep, clock)
    if waited is None:
        result.waited_s = timeout_s
        result.problems.append(f"TorchServe did not answer /ping within {timeout_s:.0f} s; the router keeps the old "
                               "key (reconcile re-renders it once TorchServe answers)")
        return result
    result.healthy, result.waited_s = True, waited
    # First the key: every routed request needs it, whatever happens to single versions below.
    try:
        router.refresh()
        result.router_rendered = True
    except Exception as exc:  # noqa: BLE001 - reported; the versions are still worth restoring
        result.problems.append(f"re-rendering the router failed: {exc}")
    routes = router.routes()
    for model, route in sorted(routes.items()):
        stable = str(route["stable"])
        # the champion, and a candidate under a ramp (its release flow would otherwise see only errors)
        for version in filter(None, (stable, route.get("canary"))):
            name = f"{model} v{version}"
            try:
                if register_from_store(backend, model_store, model, str(version)):
                    result.restored.append(name)
            except ArchiveMissing as exc:
                result.missing_archives.append(name)
                result.problems.append(str(exc))
            except Exception as exc:  # noqa: BLE001 - one version must not keep the others down
                result.problems.append(f"{name}: re-registering failed: {exc}")
        try:
            backend.set_default(model, stable)
        except Exception as exc:  # noqa: BLE001
            result.problems.append(f"{model}: making v{stable} the default failed: {exc}")
    return result


def result_path(paths: StatePaths) -> Path:
    return paths.root / RESULT_FILE


def write_result(paths: StatePaths, result: Recovery) -> None:
    """``keywatch.json`` in the state dir, replaced atomically."""
    write_json(result_path(paths), {**asdict(result), "ok": result.ok, "summary": result.summary()})


def read_result(paths: StatePaths) -> dict[str, Any] | None:
    """The last recovery's outcome, or None when TorchServe never restarted under this listener."""
    return read_json(result_path(paths))


def recover_serving(timeout_s: float = 600.0) -> str:
    """The listener's action: recover the local stack's serving and record the outcome."""
    from canaryflow.core.settings import get_settings
    from canaryflow.services import local_router

    settings = get_settings()
    paths = StatePaths.of(settings)
    client = torchserve.TorchServeClient(settings, paths)
    if not paths.router_conf.exists():
        return "router not configured yet; `canaryflow up` renders it"
    result = recover(client, local_router(settings, paths), paths.model_store, timeout_s)
    if result.healthy:
        torchserve.key_file_mode_private(paths)
    write_result(paths, result)
    return result.summary()


def main() -> None:
    from supervisor import childutils

    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        event_headers, _ = childutils.eventdata(payload + "\n")
        if headers.get("eventname") == "PROCESS_STATE_RUNNING" and event_headers.get("processname") == WATCHED:
            try:
                print(f"keywatch: {recover_serving()}", file=sys.stderr, flush=True)
            except Exception as exc:  # keep listening: one failed refresh must not kill the listener
                print(f"keywatch: refresh failed: {exc}", file=sys.stderr, flush=True)
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    main()
