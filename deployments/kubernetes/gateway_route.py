"""One model's Gateway API ``HTTPRoute`` (gateway.networking.k8s.io/v1, standard channel v1.6.1), as data: built
from a routes-table entry (:func:`build_httproute`) and read back into one (:func:`parse_httproute`). Pure: no
API server here (deployments/kubernetes/gateway.py applies it).

Rules (Gateway API picks the most specific match, whatever the order; they are written most specific first):

- ``pin-stable`` / ``pin-canary``: path ``/predictions/<model>`` (or with a trailing ``/``) AND
  ``X-Model-Version: <version>`` AND ``X-Canaryflow-Pin-Key: <the pipeline's pin key>`` -> that version only.
  A pin without the right key matches no pin rule and falls to ``traffic``: it never reaches a staged version.
- ``traffic``: the same paths, no header -> stable alone, or weighted stable/canary, or stable with a
  ``RequestMirror`` filter copying every request to the canary (shadow).

Only these exact paths are routed, like the local router: ``/predictions/<model>/<version>`` (or anything deeper)
matches no rule and the gateway answers 404, so a client cannot name a version that is not routed.
Every rule strips the headers that only the pipeline may set (pin key, version, pinned and replay markers) and
TorchServe's ``describe``/``explain`` switches; pin rules set ``X-Canaryflow-Pinned: 1`` for the handler.

Weights: Gateway API weights are integers; the canary's share is written in basis points out of
:data:`WEIGHT_SCALE` (10000), so 0.01 % steps map exactly, as the nginx router's route table resolves them, and the two
weights always sum to 10000. A shadow's (ignored) weight is kept in an annotation so a route reads back unchanged.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from canaryflow.core.errors import ServingError
from canaryflow.core.names import name_problem
from canaryflow.core.serving_contract import PIN_KEY_HEADER, PINNED_HEADER, REPLAY_HEADER, VERSION_HEADER
from deployments.kubernetes.objects import _LABEL_VALUE, label_value  # noqa: F401 (one label rule for every object)
from deployments.routes import BASIS_POINTS, canary_basis_points, validate_routes

GROUP, VERSION, PLURAL, KIND = "gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute"
WEIGHT_SCALE = BASIS_POINTS
"""Weights are basis points: canary + stable = 10000, 1 = 0.01 % of the unpinned traffic."""
PART_OF = ("app.kubernetes.io/part-of", "canaryflow")
MODEL_LABEL = "canaryflow.io/model"
MODEL_ANNOTATION = "canaryflow.io/model-name"  # the exact model name (a label value cannot hold every name)
SHADOW_WEIGHT_ANNOTATION = "canaryflow.io/shadow-weight"
SELECTOR = f"{PART_OF[0]}={PART_OF[1]},{MODEL_LABEL}"
TRAFFIC_RULE, PIN_RULES = "traffic", {"stable": "pin-stable", "canary": "pin-canary"}
STRIPPED = [VERSION_HEADER, PIN_KEY_HEADER, PINNED_HEADER, REPLAY_HEADER, "describe", "explain"]
SESSION_COOKIE = "canaryflow-session"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_HEADER_VALUE = re.compile(r"^[\x21-\x7e]{1,4096}$")


@dataclass(frozen=True)
class RouteTarget:
    """Where the routes live and what they point at (from settings.kubernetes and the backend's naming)."""

    namespace: str
    gateway_name: str
    service_name: Callable[[str, str], str]
    service_port: int = 8080
    gateway_namespace: str | None = None
    hostnames: list[str] = field(default_factory=list)
    session_persistence: bool = False


def object_name(model: str) -> str:
    """The HTTPRoute's name for ``model``: the name itself when it is a DNS-1123 label, else a lowercased,
    cleaned prefix plus ``-`` and 8 hex of its sha256 (so ``Iris``, ``iris`` and ``iris.v2`` never collide);
    at most 63 characters. ServingError for a name canaryflow does not serve (``iris?``, too long)."""
    problem = name_problem(model)
    if problem:
        raise ServingError(problem)
    if _DNS_LABEL.match(model):
        return model
    base = re.sub(r"[^a-z0-9-]", "-", model.lower())[: 63 - 9].strip("-")
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"{base}-{digest}" if base else digest


def basis_points(weight: float) -> tuple[int, int]:
    """(stable, canary) integer weights for a canary share of ``weight`` percent; they sum to WEIGHT_SCALE."""
    canary = canary_basis_points(weight)
    return WEIGHT_SCALE - canary, canary


def percent(stable: int, canary: int) -> float:
    """The canary's share in percent (2 decimals) of two backend weights."""
    total = stable + canary
    return round(canary * 100 / total, 2) if total else 0.0


def _backend(target: RouteTarget, model: str, version: str, weight: int | None = None) -> dict[str, Any]:
    name = target.service_name(model, version)
    if not isinstance(name, str) or not _DNS_LABEL.match(name):
        raise ServingError(f"service name {name!r} for {model} v{version} is not a DNS-1123 label; fix the naming")
    ref: dict[str, Any] = {"group": "", "kind": "Service", "name": name, "port": target.service_port}
    return ref if weight is None else {**ref, "weight": weight}


def _matches(model: str, headers: list[dict[str, str]]) -> list[dict[str, Any]]:
    path = f"/predictions/{model}"
    return [{"path": {"type": "Exact", "value": p}, **({"headers": headers} if headers else {})}
            for p in (path, path + "/")]


def _header_filter(*, pinned: bool) -> dict[str, Any]:
    modifier: dict[str, Any] = {"remove": [h for h in STRIPPED if not (pinned and h == PINNED_HEADER)]}
    if pinned:
        modifier["set"] = [{"name": PINNED_HEADER, "value": "1"}]
    return {"type": "RequestHeaderModifier", "requestHeaderModifier": modifier}


def _pin_rule(target: RouteTarget, model: str, role: str, version: str, pin_key: str) -> dict[str, Any]:
    headers = [{"type": "Exact", "name": VERSION_HEADER, "value": version},
               {"type": "Exact", "name": PIN_KEY_HEADER, "value": pin_key}]
    return {"name": PIN_RULES[role], "matches": _matches(model, headers),
            "filters": [_header_filter(pinned=True)],
            "backendRefs": [_backend(target, model, version, WEIGHT_SCALE)]}


def _traffic_rule(target: RouteTarget, model: str, route: Mapping[str, Any]) -> dict[str, Any]:
    filters = [_header_filter(pinned=False)]
    stable, canary = route["stable"], route.get("canary")
    if canary is None or route["shadow"]:
        backends = [_backend(target, model, stable, WEIGHT_SCALE)]
        if canary is not None:  # every request copied; the gateway drops the copy's answer
            filters.append({"type": "RequestMirror", "requestMirror": {"backendRef": _backend(target, model, canary)}})
    else:
        stable_w, canary_w = basis_points(route["weight"])
        backends = [_backend(target, model, stable, stable_w), _backend(target, model, canary, canary_w)]
    rule: dict[str, Any] = {"name": TRAFFIC_RULE, "matches": _matches(model, []), "filters": filters,
                            "backendRefs": backends}
    if target.session_persistence and canary is not None and not route["shadow"]:
        # Experimental channel only (not in the standard CRD): the API server refuses it there.
        rule["sessionPersistence"] = {"type": "Cookie", "sessionName": SESSION_COOKIE}
    return rule


def build_httproute(model: str, route: Mapping[str, Any], target: RouteTarget, pin_key: str) -> dict[str, Any]:
    """The whole HTTPRoute for ``model`` serving ``route`` (a routes-table entry, checked here first)."""
    name = object_name(model)
    checked = validate_routes({model: route})[model]
    if not _HEADER_VALUE.match(pin_key or ""):
        raise ServingError("the pin key is empty or not printable ASCII; the HTTPRoute's pin match cannot hold it")
    parent: dict[str, Any] = {"group": GROUP, "kind": "Gateway", "name": target.gateway_name}
    if target.gateway_namespace:
        parent["namespace"] = target.gateway_namespace
    roles = [("stable", checked["stable"])] + ([("canary", checked["canary"])] if "canary" in checked else [])
    rules = [_pin_rule(target, model, role, version, pin_key) for role, version in roles]
    rules.append(_traffic_rule(target, model, checked))
    annotations = {MODEL_ANNOTATION: model}
    if checked.get("shadow") and checked.get("weight") is not None:
        annotations[SHADOW_WEIGHT_ANNOTATION] = f"{checked['weight']:g}"
    spec: dict[str, Any] = {"parentRefs": [parent], "rules": rules}
    if target.hostnames:
        spec["hostnames"] = list(target.hostnames)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": name, "namespace": target.namespace,
                         "labels": {PART_OF[0]: PART_OF[1], MODEL_LABEL: label_value(model)},
                         "annotations": annotations},
            "spec": spec}


def parse_httproute(obj: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(model, routes-table entry) of an HTTPRoute built by :func:`build_httproute`, as the server holds it;
    ServingError when it is not one of ours or was edited into something canaryflow did not write."""
    meta = obj.get("metadata") or {}
    name, model = meta.get("name"), (meta.get("annotations") or {}).get(MODEL_ANNOTATION)
    if not isinstance(model, str) or name_problem(model) or object_name(model) != name:
        raise ServingError(f"HTTPRoute {name!r} has no valid {MODEL_ANNOTATION} annotation naming its model")
    rules = {r.get("name"): r for r in (obj.get("spec") or {}).get("rules") or []}
    try:
        versions = {role: _pinned_version(rules[rule]) for role, rule in PIN_RULES.items() if rule in rules}
        services = {_only_backend(rules[PIN_RULES[role]])["name"]: v for role, v in versions.items()}
        traffic = rules[TRAFFIC_RULE]
        route: dict[str, Any] = {"stable": versions["stable"]}
        mirrors = [f["requestMirror"] for f in traffic.get("filters") or [] if f.get("type") == "RequestMirror"]
        weights = {services[b["name"]]: int(b.get("weight", 1)) for b in traffic.get("backendRefs") or []}
        if mirrors:
            shadow_weight = (meta.get("annotations") or {}).get(SHADOW_WEIGHT_ANNOTATION)
            route.update(canary=services[mirrors[0]["backendRef"]["name"]], shadow=True,
                         weight=float(shadow_weight) if shadow_weight is not None else None)
        elif "canary" in versions:
            route.update(canary=versions["canary"], shadow=False,
                         weight=percent(weights[versions["stable"]], weights[versions["canary"]]))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ServingError(f"HTTPRoute {name!r} of {model} does not hold the rules canaryflow writes ({exc!r}); "
                           "re-apply its route (refresh) or delete it") from exc
    return model, validate_routes({model: {k: v for k, v in route.items() if v is not None}})[model]


def rule_for(httproute: Mapping[str, Any], path: str, headers: Mapping[str, str]) -> str | None:
    """The name of the rule a conformant Gateway picks for a request to ``path`` with ``headers`` (Gateway API
    precedence: an Exact path beats a prefix, a longer prefix a shorter one, then more header matches win); None:
    no rule matches and the gateway answers 404. Methods and query parameters are not considered (never written)."""
    sent = {k.lower(): v for k, v in headers.items()}
    best: tuple[tuple[int, int, int], str | None] | None = None
    for rule in (httproute.get("spec") or {}).get("rules") or []:
        for match in rule.get("matches") or [{}]:
            spec_path = match.get("path") or {}
            kind, value = spec_path.get("type", "PathPrefix"), spec_path.get("value", "/")
            prefix = value.rstrip("/")
            if not (path == value if kind == "Exact" else path == prefix or path.startswith(prefix + "/")):
                continue
            wanted = match.get("headers") or []
            if all(h.get("type", "Exact") == "Exact" and sent.get(h["name"].lower()) == h["value"] for h in wanted):
                key = (kind == "Exact", len(value), len(wanted))
                if best is None or key > best[0]:
                    best = (key, rule.get("name"))
    return best[1] if best else None


def _pinned_version(rule: Mapping[str, Any]) -> str:
    headers = rule["matches"][0]["headers"]
    return next(h["value"] for h in headers if h["name"].lower() == VERSION_HEADER.lower())


def _only_backend(rule: Mapping[str, Any]) -> Mapping[str, Any]:
    (backend,) = rule["backendRefs"]
    return backend
