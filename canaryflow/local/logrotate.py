"""supervisord event listener: every minute (TICK_60), rotate the router's logs that grew over their limit.

nginx writes one JSON line per request to ``<state>/router/access.log`` and never rotates it itself. Once it is
over ``router.access_log_max_mb`` it becomes ``access.log.1`` (the older ones shift up to
``access.log.<router.access_log_keep>``, the oldest is dropped) and nginx is reloaded onto a new file:
:meth:`deployments.router.NginxRouter.rotate_logs`, which does the same for the error log. The readers of the
access log (the canary's metrics, the feedback endpoint's answer index) read across the rotated files.

For operators, :func:`rotate_router_logs` does one check by hand (``force`` rotates whatever is not empty)::

    python -c "from canaryflow.local.logrotate import rotate_router_logs; print(rotate_router_logs())"

Run by supervisord as ``python -m canaryflow.local.logrotate``; stdout is supervisord's protocol (every event is
answered, whatever happens), logs go to stderr.
"""

from __future__ import annotations

import sys

from canaryflow.core.paths import StatePaths
from canaryflow.core.settings import Settings, get_settings

EVENT = "TICK_60"


def rotate_router_logs(settings: Settings | None = None, force: bool = False) -> str:
    """Rotate the router's logs that are over ``router.access_log_max_mb`` (``force``: any that is not empty);
    what was done, in words."""
    from canaryflow.services import local_router

    settings = settings or get_settings()
    paths = StatePaths.of(settings)
    if not paths.router_dir.is_dir():
        return "no router yet; nothing to rotate"
    limit = 0 if force else int(settings.router.access_log_max_mb * (1 << 20))
    keep = settings.router.access_log_keep
    if local_router(settings, paths).rotate_logs(limit, keep):
        return f"rotated the router's logs over {limit} bytes in {paths.router_dir} (keeping {keep})"
    return ""


def main() -> None:
    from supervisor import childutils

    while True:
        headers, _ = childutils.listener.wait(sys.stdin, sys.stdout)
        if headers.get("eventname", "").startswith("TICK"):
            try:
                done = rotate_router_logs()
                if done:
                    print(f"logrotate: {done}", file=sys.stderr, flush=True)
            except Exception as exc:  # noqa: BLE001 - keep listening: the next tick tries again
                print(f"logrotate: rotation failed: {exc}", file=sys.stderr, flush=True)
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    main()
