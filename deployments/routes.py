"""What a router serves, as data: the :class:`TrafficRouter` interface every router implements, and the checks
of a routes table (model and version names, weights, canary and shadow) that every router applies before it
changes anything."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

from canaryflow.core.errors import ServingError
from canaryflow.core.names import MODEL_PATTERN, MODEL_RE, VERSION_PATTERN, VERSION_RE  # noqa: F401 (re-exported)
from canaryflow.core.state import Route

Routes = dict[str, dict[str, Any]]
"""``{model: {"stable": version, "canary": version, "weight": percent, "shadow": bool}}`` (canary, weight and
shadow optional): the ``routes`` member of routes.json."""

CANARY_KEYS = ("canary", "weight", "shadow")
BASIS_POINTS = 10000
"""A whole route in basis points: weights are percent with 2 decimals, so every router splits in 0.01 % steps."""


def canary_basis_points(weight: float) -> int:
    """A canary share of ``weight`` percent (0-100, 2 decimals) in basis points."""
    return round(weight * BASIS_POINTS / 100)


class TrafficRouter(Protocol):
    """Sends each model's inference traffic to the version(s) it is told to."""

    def set_route(self, model: str, version: str) -> None:
        """Route all of ``model``'s traffic to ``version``."""
        ...

    def remove_route(self, model: str) -> None:
        """Stop routing ``model``; its requests get 404 ModelNotRouted."""
        ...

    def set_split(self, model: str, stable: str, canary: str, weight: float, shadow: bool = False) -> None:
        """Send ``weight`` percent of ``model``'s unpinned traffic to ``canary``, the rest to ``stable``; with
        ``shadow``, stable answers everything and each request is copied to ``canary`` (weight ignored)."""
        ...

    def clear_canary(self, model: str) -> None:
        """All of ``model``'s traffic back to its stable version; no canary, no shadow copies."""
        ...

    def routes(self) -> Routes:
        """What the router currently serves."""
        ...

    def route(self, model: str) -> Route | None:
        """What the router currently serves for ``model`` (None: it is not routed)."""
        ...

    def refresh(self) -> None:
        """Apply the current routes again with the serving backend's current credentials (after a restart)."""
        ...

    def pin_credentials(self) -> dict[str, str]:
        """Headers the pipeline adds to a request that pins a version (``X-Model-Version``): a pin is honoured only
        with them (empty where the router needs none)."""
        ...

    def credentials_stale(self) -> bool:
        """Whether what is live carries other credentials than the serving backend's current ones (it restarted
        and :meth:`refresh` did not run); raises ServingError when the current ones cannot be read."""
        ...


def _check_version(model: str, role: str, value: Any) -> str:
    version = str(value if value is not None else "")
    if not VERSION_RE.match(version):
        raise ServingError(f"route {model!r}: {role} version {version!r} does not match {VERSION_RE.pattern}")
    return version


def _check_weight(model: str, value: Any, shadow: bool) -> float:
    """A canary share in percent; nginx's split_clients resolves 0.01 %."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ServingError(f"route {model!r}: weight {value!r} is not a number of percent")
    weight = float(value)
    low_ok = weight >= 0 if shadow else weight > 0
    if not (low_ok and weight <= 100):
        bound = "0 <= weight <= 100 in shadow mode" if shadow else "0 < weight <= 100"
        raise ServingError(f"route {model!r}: weight {weight:g} % is out of range; expected {bound}")
    if abs(weight * 100 - round(weight * 100)) > 1e-6:
        raise ServingError(f"route {model!r}: weight {weight!r} % has more than 2 decimals; nginx splits in 0.01 % "
                           "steps, round it")
    return round(weight, 2)


def validate_routes(routes: Mapping[str, Mapping[str, Any]]) -> Routes:
    """A checked, normalized copy of ``routes``; raises ServingError naming the bad model, version or weight.

    A canary needs a weight unless it is a shadow; ``weight`` and ``shadow: true`` need a canary.
    """
    checked: Routes = {}
    for model, route in routes.items():
        if not MODEL_RE.match(model):
            raise ServingError(f"model name {model!r} does not match {MODEL_RE.pattern}; rename the model")
        out = {**route, "stable": _check_version(model, "stable", route.get("stable"))}
        shadow = route.get("shadow", False)
        if not isinstance(shadow, bool):
            raise ServingError(f"route {model!r}: shadow must be true or false, got {shadow!r}")
        if route.get("canary") is None:
            if route.get("weight") is not None or shadow:
                raise ServingError(f"route {model!r}: weight or shadow without a canary version; set a canary "
                                   "or clear them")
            for key in CANARY_KEYS:
                out.pop(key, None)
        else:
            out["canary"] = _check_version(model, "canary", route["canary"])
            if out["canary"] == out["stable"]:
                raise ServingError(f"route {model!r}: canary and stable are both version {out['stable']!r}; "
                                   "use set_route for a single version")
            out["shadow"] = shadow
            if route.get("weight") is not None:
                out["weight"] = _check_weight(model, route["weight"], shadow)
            elif not shadow:
                raise ServingError(f"route {model!r}: canary {out['canary']!r} needs a weight (percent of traffic)")
            else:
                out.pop("weight", None)
        checked[model] = out
    return checked
