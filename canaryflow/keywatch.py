"""supervisord event listener: when TorchServe (re)starts, bring serving back to what the router records.

TorchServe regenerates its keys at every start and forgets its registered models (it ignores its config
snapshots when started with --ts-config). Without this, a TorchServe that supervisord restarted after a crash
would answer the router with 401s and then 404s. So: re-register every routed version (champion and canary) from
the model store, make the champion the default, and re-render the router with the new inference key.
Run by supervisord as ``python -m canaryflow.keywatch``; stdout is supervisord's protocol, logs go to stderr.
"""

from __future__ import annotations

import sys
import time

from supervisor import childutils

from canaryflow.paths import StatePaths
from canaryflow.services import local_router
from canaryflow.settings import get_settings
from deployments import torchserve

WATCHED = "torchserve"


def recover_serving(timeout_s: float = 120.0) -> str:
    """Wait until TorchServe answers, re-register routed versions, then re-render and reload the router."""
    settings = get_settings()
    paths = StatePaths(settings.state_dir)
    client = torchserve.TorchServeClient(settings, paths)
    deadline = time.monotonic() + timeout_s
    while not client.healthy():
        if time.monotonic() > deadline:
            return f"TorchServe not healthy after {timeout_s:.0f} s; router left as it was"
        time.sleep(1)
    torchserve.key_file_mode_private(paths)
    if not paths.router_conf.exists():
        return "router not configured yet; `canaryflow up` renders it"
    router = local_router(settings, paths)
    restored = []
    for model, route in router.routes().items():
        # the champion, and a candidate under a ramp (its release flow would otherwise see only errors)
        for version in filter(None, (str(route["stable"]), route.get("canary"))):
            if client.register(model, version, paths.model_store / torchserve.archive_name(model, version)):
                restored.append(f"{model} v{version}")
        client.set_default(model, str(route["stable"]))
    router.refresh()
    return f"re-registered {restored or 'nothing'}; router re-rendered with TorchServe's new inference key"


def main() -> None:
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
