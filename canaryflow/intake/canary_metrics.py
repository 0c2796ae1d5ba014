"""The canary's state as Prometheus metrics, for the alert rules and the dashboard
(serving_manifests/components/monitoring).

Rendered in the Prometheus text exposition format from what the pipeline wrote, read-only:

- the routes table (``<state>/router/routes.json``, :attr:`StatePaths.router_state`; on Kubernetes the model's
  HTTPRoutes, read back from the API server): which version is the canary and its share of live traffic, i.e.
  what is actually served;
- the ramp's sealed status (the ``canaryflow.canary`` tag on the candidate version in the MLflow registry,
  :mod:`canaryflow.core.seal`): its phase and when its current step began. A status whose seal does not verify
  is not used (a registry user could forge it); the phase then comes from the route alone and the last change
  from routes.json's modification time (on Kubernetes: the HTTPRoutes' last write by canaryflow), an upper bound
  of it (the table is rewritten at every route change).

Series (one set per model with an active ramp; none once the ramp ended):

- ``canaryflow_canary_weight{model, version}``: percent of the model's unpinned traffic on the canary (0 in
  shadow; 100 while a promoted version bakes);
- ``canaryflow_canary_phase{model, version, phase}``: 1 for the current phase, 0 for the others;
- ``canaryflow_canary_last_change_timestamp_seconds{model}``: when the weight last changed (epoch s);
- ``canaryflow_canary_status_verified{model, version}``: 1 when phase and last change come from the sealed
  status, 0 when they are derived from the routes table alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from canaryflow.core import seal
from canaryflow.core.errors import RegistryError, ServingError
from canaryflow.core.paths import StatePaths, read_json
from canaryflow.core.registry import Registry
from canaryflow.core.state import Route, Tag
from deployments.canary import CanaryStatus, Phase
from deployments.routes import validate_routes

_log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""The ``Content-Type`` of :func:`render_canary_metrics`: the classic text format every Prometheus 2.x reads."""

ACTIVE = (Phase.SHADOW, Phase.PROGRESSING, Phase.BAKING)


@dataclass(frozen=True)
class CanaryView:
    """One model's active ramp as the metrics show it."""

    model: str
    version: str
    weight: float
    phase: Phase
    last_change: float
    verified: bool


def read_routes(paths: StatePaths) -> dict[str, dict[str, Any]]:
    """The ``routes`` of routes.json ({} when the router never wrote one); ServingError when it is unreadable
    or invalid, so that the scrape fails visibly instead of reporting no canary."""
    if not paths.router_state.exists():
        return {}
    data = read_json(paths.router_state)
    if not isinstance(data, dict):
        raise ServingError(f"cannot read the routes table {paths.router_state}: not a JSON object")
    return validate_routes(data.get("routes") or {})


def sealed_status(paths: StatePaths, registry: Registry | None, model: str, version: str) -> CanaryStatus | None:
    """The ramp status the pipeline sealed on ``version`` (None: no registry, no status, not verified, or the
    registry did not answer: logged)."""
    # Without a seal key nothing can verify; not reading it also keeps this module from creating one.
    if registry is None or not paths.seal_key.exists():
        return None
    try:
        raw = registry.get_version(model, version).tags.get(Tag.CANARY)
    except RegistryError as exc:
        _log.warning("canary metrics: no ramp status for %s v%s: %s", model, version, exc)
        return None
    body = seal.open_json(paths, model, version, raw) if raw else None
    if body is None:
        return None
    try:
        return CanaryStatus.from_json(body)
    except (ValueError, TypeError, KeyError) as exc:
        _log.warning("canary metrics: the ramp status of %s v%s does not parse: %s", model, version, exc)
        return None


def _view(paths: StatePaths, registry: Registry | None, model: str, route: Route, routes_mtime: float
          ) -> CanaryView | None:
    """The view of ``model``'s ramp, or None when it has none active."""
    if route.canary is None:
        # A promoted version bakes at 100% behind a plain route: only its sealed status tells.
        status = sealed_status(paths, registry, model, route.stable)
        if status is None or status.phase is not Phase.BAKING or status.candidate != route.stable:
            return None
        return CanaryView(model, route.stable, 100.0, Phase.BAKING, status.step_started_at, True)
    weight = 0.0 if route.shadow else route.weight
    status = sealed_status(paths, registry, model, route.canary)
    if status is not None and status.candidate == route.canary and status.phase in ACTIVE:
        return CanaryView(model, route.canary, weight, status.phase, status.step_started_at, True)
    phase = Phase.SHADOW if route.shadow else Phase.PROGRESSING
    return CanaryView(model, route.canary, weight, phase, routes_mtime, False)


RoutesSnapshot = tuple[Mapping[str, Mapping[str, Any]], float]
"""(routes table, when it was last written): where the table is not routes.json (a GatewayApiRouter.snapshot)."""


def canary_views(paths: StatePaths, registry: Registry | None = None,
                 snapshot: RoutesSnapshot | None = None) -> list[CanaryView]:
    """Every active ramp, by model name. The routes table is routes.json unless a ``snapshot`` of it is given
    (where the table lives elsewhere); ``registry`` None: phases come from the routes alone."""
    if snapshot is None:
        table = read_routes(paths)
        try:
            routes_mtime = paths.router_state.stat().st_mtime
        except OSError:
            routes_mtime = 0.0
    else:
        table, routes_mtime = validate_routes(snapshot[0]), snapshot[1]
    views = []
    for model in sorted(table):
        route = Route.of(table[model])
        view = _view(paths, registry, model, route, routes_mtime) if route is not None else None
        if view is not None:
            views.append(view)
    return views


def render_canary_metrics(paths: StatePaths, registry: Registry | None = None,
                          snapshot: RoutesSnapshot | None = None) -> bytes:
    """The canary series in the Prometheus text format (``Content-Type``: :data:`CONTENT_TYPE`)."""
    out = CollectorRegistry(auto_describe=False)
    weight = Gauge("canaryflow_canary_weight", "Percent of the model's live traffic on the canary version "
                   "(0 in shadow, 100 while baking).", ["model", "version"], registry=out)
    phase = Gauge("canaryflow_canary_phase", "1 for the canary's current phase, 0 for the other phases.",
                  ["model", "version", "phase"], registry=out)
    changed = Gauge("canaryflow_canary_last_change_timestamp_seconds", "When the canary's weight last changed "
                    "(unix time).", ["model"], registry=out)
    verified = Gauge("canaryflow_canary_status_verified", "1: phase and last change from the pipeline's sealed "
                     "ramp status; 0: derived from the routes table alone.", ["model", "version"], registry=out)
    for view in canary_views(paths, registry, snapshot):
        weight.labels(view.model, view.version).set(view.weight)
        for each in Phase:
            phase.labels(view.model, view.version, each.value).set(1 if each is view.phase else 0)
        changed.labels(view.model).set(view.last_change)
        verified.labels(view.model, view.version).set(1 if view.verified else 0)
    return generate_latest(out)
