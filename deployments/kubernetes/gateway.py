"""The Kubernetes :class:`~deployments.routes.TrafficRouter`: one Gateway API ``HTTPRoute`` per model
(deployments/kubernetes/gateway_route.py builds it), attached to the Gateway ``settings.kubernetes.gateway_name``.

- The API server is the truth: :meth:`GatewayApiRouter.routes` and :meth:`~GatewayApiRouter.route` read the
  HTTPRoutes back and turn them into the routes table; nothing is cached here.
- Every change is ONE server-side apply of the whole HTTPRoute (field manager ``settings.kubernetes.field_manager``),
  first with ``dryRun=All``, then for real: a weight change updates the object in place (same uid, new
  resourceVersion), never a delete and create, so the gateway never sees the model unrouted. The routes-table
  checks of every router (deployments/routes.py) run before anything is sent; the server's CRD schema and CEL rules
  run after: a 422 or a 409 (a field another manager owns) is a ServingError and the live route stays as it was.
- Pins: ``X-Model-Version`` reaches a version only together with the pipeline's pin key
  (``X-Canaryflow-Pin-Key``, :meth:`~GatewayApiRouter.pin_credentials`), matched as a second header of the pin
  rule. A request with the version header but without the key (or with a wrong one) matches no pin rule and gets
  the unpinned traffic (stable, split or shadow), never the pinned version: the local router's 403 becomes "not
  pinned". Gateway API cannot match a header against a Secret, so the key is written into the HTTPRoute: whoever may
  read HTTPRoutes in the namespace may pin; grant that read accordingly. The key comes from ``pin_key_provider``,
  by default the Secret ``canaryflow-pin-key`` in the namespace (created with a random key when missing).
- Sticky users: NOT on Kubernetes by default. The weighted split is per request; users are sticky only with
  ``settings.kubernetes.session_persistence``, which adds a cookie ``sessionPersistence`` to the split rule. That
  field is in the experimental channel's HTTPRoute CRD only (Gateway API v1.6.1) and needs a Gateway
  implementation that supports it; against the standard CRD the server refuses the apply (a ServingError).
- No backend credentials: TorchServe's key is added next to each TorchServe (the per-pod key proxy), never by the
  gateway, so :meth:`~GatewayApiRouter.credentials_stale` is always False; :meth:`~GatewayApiRouter.refresh`
  re-applies every route (with the current pin key).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from functools import cached_property
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from canaryflow.core.errors import ServingError
from canaryflow.core.serving_contract import PIN_KEY_HEADER
from canaryflow.core.settings import Settings
from canaryflow.core.state import Route
from deployments.kubernetes import gateway_route as gr
from deployments.kubernetes import objects as o
from deployments.kubernetes.apply import api_error, create_random_secret, load_api_client, parse_time
from deployments.routes import Routes, validate_routes

PIN_SECRET, PIN_SECRET_KEY = "canaryflow-pin-key", "pin-key"
_APPLY = "application/apply-patch+yaml"


class SecretPinKey:
    """The pin key from a Kubernetes Secret (every worker of the pipeline reads the same one); created with a
    random key on first use."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str = PIN_SECRET) -> None:
        self.core, self.namespace, self.name = client.CoreV1Api(api), namespace, name

    def __call__(self) -> str:
        try:
            try:
                secret = self.core.read_namespaced_secret(self.name, self.namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                secret = self._create()
            raw = (secret.data or {}).get(PIN_SECRET_KEY)
        except (ApiException, HTTPError) as exc:
            raise api_error(exc, f"reading Secret {self.namespace}/{self.name}") from exc
        if not raw:
            raise ServingError(f"Secret {self.namespace}/{self.name} has no {PIN_SECRET_KEY!r}; add one or delete it")
        return base64.b64decode(raw).decode()

    def _create(self) -> Any:
        try:
            create_random_secret(self.core.api_client, self.namespace, self.name, PIN_SECRET_KEY, dict([gr.PART_OF]))
        except ApiException as exc:
            if exc.status == 403:  # the flow runs' Role may only read it (deployments/kubernetes/pipeline.py)
                raise ServingError(f"Secret {self.namespace}/{self.name} is missing and this identity may not create "
                                   "it: run `canaryflow k8s init` (as a namespace admin) first") from exc
            raise
        return self.core.read_namespaced_secret(self.name, self.namespace)  # ours, or another worker's first


class GatewayApiRouter:
    """Routes each model through its own HTTPRoute in ``settings.kubernetes.namespace``."""

    def __init__(self, settings: Settings, service_name: Callable[[str, str], str], *, service_port: int = 8080,
                 api: client.ApiClient | None = None, pin_key_provider: Callable[[], str] | None = None) -> None:
        k8s = settings.kubernetes
        self.settings = settings
        self.namespace, self.field_manager = k8s.namespace, k8s.field_manager
        self.target = gr.RouteTarget(namespace=k8s.namespace, gateway_name=k8s.gateway_name,
                                     gateway_namespace=k8s.gateway_namespace, hostnames=list(k8s.hostnames),
                                     service_name=service_name, service_port=service_port,
                                     session_persistence=k8s.session_persistence)
        self._api = api
        self._pin_key_provider = pin_key_provider

    @cached_property
    def api(self) -> client.ApiClient:
        return self._api or load_api_client(self.settings.kubernetes)

    @cached_property
    def objects(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    @cached_property
    def pin_key_provider(self) -> Callable[[], str]:
        return self._pin_key_provider or SecretPinKey(self.api, self.namespace)

    @classmethod
    def for_settings(cls, settings: Settings) -> GatewayApiRouter:
        """One HTTPRoute per model in front of the per-version Services (names and port from the backend's
        objects), the cluster from settings."""
        return cls(settings, o.object_name, service_port=o.INFERENCE_PORT)

    # -- reading -------------------------------------------------------------------------------------
    def routes(self) -> Routes:
        """Every model routed by an HTTPRoute of canaryflow in the namespace, as the server holds it."""
        return self.snapshot()[0]

    def snapshot(self) -> tuple[Routes, float]:
        """:meth:`routes` and when canaryflow last wrote any of them (unix time, from the HTTPRoutes'
        ``managedFields``; 0 when none): an upper bound of the last weight change, like routes.json's mtime."""
        try:
            listed = self.objects.list_namespaced_custom_object(gr.GROUP, gr.VERSION, self.namespace, gr.PLURAL,
                                                                label_selector=gr.SELECTOR)
        except (ApiException, HTTPError) as exc:
            raise api_error(exc, f"listing HTTPRoutes in {self.namespace}") from exc
        items = listed.get("items", [])
        routes = dict(sorted((gr.parse_httproute(item) for item in items), key=lambda mr: mr[0]))
        written = [stamp.timestamp() for item in items
                   for entry in (item.get("metadata") or {}).get("managedFields") or []
                   if entry.get("manager") == self.field_manager and (stamp := parse_time(entry.get("time")))]
        return routes, max(written, default=0.0)

    def route(self, model: str) -> Route | None:
        """What ``model``'s HTTPRoute serves (None: it has none)."""
        obj = self._get(gr.object_name(model))
        if obj is None:
            return None
        owner, route = gr.parse_httproute(obj)
        if owner != model:
            raise ServingError(f"HTTPRoute {gr.object_name(model)!r} belongs to model {owner!r}, not {model!r}")
        return Route.of(route)

    def _get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.objects.get_namespaced_custom_object(gr.GROUP, gr.VERSION, self.namespace, gr.PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise api_error(exc, f"reading HTTPRoute {self.namespace}/{name}") from exc
        except HTTPError as exc:
            raise api_error(exc, f"reading HTTPRoute {self.namespace}/{name}") from exc

    # -- changing ------------------------------------------------------------------------------------
    def set_route(self, model: str, version: str) -> None:
        """All of ``model``'s traffic to ``version``; its canary, split and shadow are gone."""
        self.apply(model, {"stable": str(version)})

    def set_split(self, model: str, stable: str, canary: str, weight: float, shadow: bool = False) -> None:
        """``weight`` percent (0.01 steps) of the unpinned traffic to ``canary`` (weighted backendRefs), or with
        ``shadow`` all of it to ``stable`` and a copy of each request to ``canary`` (RequestMirror)."""
        self.apply(model, {"stable": str(stable), "canary": str(canary), "weight": weight, "shadow": shadow})

    def clear_canary(self, model: str) -> None:
        """All traffic back to the stable version; a no-op without a canary or a route."""
        current = self.route(model)
        if current is not None and current.canary is not None:
            self.set_route(model, current.stable)

    def remove_route(self, model: str) -> None:
        """Delete ``model``'s HTTPRoute: the gateway answers 404 for it. A no-op when it has none."""
        name = gr.object_name(model)
        try:
            self.objects.delete_namespaced_custom_object(gr.GROUP, gr.VERSION, self.namespace, gr.PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise api_error(exc, f"deleting HTTPRoute {self.namespace}/{name}") from exc
        except HTTPError as exc:
            raise api_error(exc, f"deleting HTTPRoute {self.namespace}/{name}") from exc

    def apply(self, model: str, route: dict[str, Any]) -> dict[str, Any]:
        """Make ``route`` live for ``model``: checked, built, server-side applied dry-run then for real (one
        request each); returns the object the server stored."""
        checked = validate_routes({model: route})[model]
        body = gr.build_httproute(model, checked, self.target, self.pin_key_provider())
        name = body["metadata"]["name"]
        described = (Route.of(checked) or Route(checked["stable"])).describe()
        what = f"applying HTTPRoute {self.namespace}/{name} ({described})"
        stored: Any = None
        for dry_run in ("All", None):
            try:
                stored = self.objects.patch_namespaced_custom_object(
                    gr.GROUP, gr.VERSION, self.namespace, gr.PLURAL, name, body, dry_run=dry_run,
                    field_manager=self.field_manager, _content_type=_APPLY)
            except (ApiException, HTTPError) as exc:
                error = api_error(exc, what + (" [dry run]" if dry_run else ""))
                if self.target.session_persistence and "sessionPersistence" in str(error):
                    error = ServingError(f"{error}. kubernetes.session_persistence needs the experimental channel's "
                                         "HTTPRoute CRD and a Gateway that implements it; turn it off otherwise")
                raise error from exc
        # The client decodes only a 200 answer; a create answers 201 (no body for us): read it back.
        return stored if isinstance(stored, dict) else self._get(name) or {}

    def refresh(self) -> None:
        """Apply every current route again (e.g. after the pin key changed)."""
        for model, route in self.routes().items():
            self.apply(model, route)

    def pin_credentials(self) -> dict[str, str]:
        """The header that lets the pipeline's requests pin a version (``X-Model-Version``)."""
        return {PIN_KEY_HEADER: self.pin_key_provider()}

    def credentials_stale(self) -> bool:
        """Always False: the HTTPRoutes carry no TorchServe key (each pod's key proxy adds it), so a TorchServe
        restart with new keys leaves nothing stale here."""
        return False

