"""supervisord event listener: when TorchServe (re)starts, give the router its new inference key.

TorchServe regenerates its keys at every start, and the router holds the inference key in its config. Without
this, a TorchServe that supervisord restarted after a crash would answer the router with 401s.
Run by supervisord as ``python -m canaryflow.keywatch``; stdout is supervisord's protocol, logs go to stderr.
"""

from __future__ import annotations

import sys
import time

from supervisor import childutils

from canaryflow.paths import StatePaths
from canaryflow.settings import get_settings
from deployments import torchserve
from deployments.router import NginxRouter

WATCHED = "torchserve"


def refresh_router(timeout_s: float = 120.0) -> str:
    """Wait until TorchServe answers with its current key, then re-render and reload the router."""
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
    NginxRouter(settings, paths, lambda: torchserve.read_keys(paths)["inference"]).refresh()
    return "router re-rendered with TorchServe's new inference key"


def main() -> None:
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        event_headers, _ = childutils.eventdata(payload + "\n")
        if headers.get("eventname") == "PROCESS_STATE_RUNNING" and event_headers.get("processname") == WATCHED:
            try:
                print(f"keywatch: {refresh_router()}", file=sys.stderr, flush=True)
            except Exception as exc:  # keep listening: one failed refresh must not kill the listener
                print(f"keywatch: refresh failed: {exc}", file=sys.stderr, flush=True)
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    main()
