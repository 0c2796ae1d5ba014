"""A small applier over the official client's DynamicClient: server-side apply (dry run for every object first,
then for real), delete, and waiting for a Deployment's rollout. API errors become typed errors that say what the
server refused and what to do. Also two small helpers of the package: a random-key Secret created once, and the
API server's timestamps parsed.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

from canaryflow.core.errors import ConfigError, ServingError
from canaryflow.core.settings import KubernetesSettings


class KubeApplyError(ServingError):
    """The API server refused an object (invalid, forbidden, ...): kind, name, HTTP status and its message."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class FieldConflict(KubeApplyError):
    """Another field manager owns fields canaryflow applies (a 409 from server-side apply; never forced)."""

    def __init__(self, message: str, managers: list[str], fields: list[str]) -> None:
        super().__init__(message, 409)
        self.managers = managers
        self.fields = fields


class RolloutTimeout(ServingError):
    """A Deployment did not become Available in time (or its rollout stopped progressing)."""


def load_api_client(k: KubernetesSettings) -> Any:
    """The cluster from ``kubeconfig``/``context`` when set, else the in-cluster config, else the default
    kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        if k.kubeconfig:
            return config.new_client_from_config(str(k.kubeconfig), context=k.context)
        try:
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(cfg)
        except ConfigException:
            return config.new_client_from_config(context=k.context)
    except (ConfigException, OSError) as exc:
        raise ConfigError(f"no Kubernetes cluster configured (kubernetes.kubeconfig={k.kubeconfig}, "
                          f"context={k.context}, not in a cluster): {exc}") from exc


def _describe(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata", {})
    return f"{obj.get('kind')} {meta.get('namespace', '')}/{meta.get('name')}"


def _status_body(exc: Any) -> dict[str, Any]:
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        return {"message": str(exc.body)[:500]}
    return body if isinstance(body, dict) else {}


def api_error(exc: Any, what: str) -> KubeApplyError:
    """The typed error for an ApiException (or a connection failure) raised while doing ``what``."""
    if not hasattr(exc, "status"):
        return KubeApplyError(f"{what}: the Kubernetes API server cannot be reached ({exc})", None)
    body = _status_body(exc)
    message = body.get("message") or exc.reason
    if exc.status == 409 and body.get("reason") != "AlreadyExists":
        causes = (body.get("details") or {}).get("causes") or []
        managers = sorted({m for c in causes for m in re.findall(r'conflict with "([^"]+)"', c.get("message", ""))})
        fields = [c.get("field", "") for c in causes]
        return FieldConflict(f"{what}: field manager conflict with {', '.join(managers) or 'another manager'} on "
                             f"{', '.join(fields) or '?'} ({message}). canaryflow never forces ownership: remove "
                             "that manager's fields or let canaryflow own them, then retry", managers, fields)
    hint = {422: "the object is invalid: nothing was applied", 403: "the credentials lack this permission",
            404: "the namespace or API does not exist"}.get(exc.status, "see the API server's message")
    return KubeApplyError(f"{what}: HTTP {exc.status} {message} ({hint})", exc.status)


@dataclass
class Applier:
    """Server-side apply as one field manager; ``api`` is a kubernetes ``ApiClient``."""

    api: Any
    field_manager: str
    poll_s: float = 1.0
    clock: Callable[[], float] = field(default=time.monotonic)

    @cached_property
    def dynamic(self) -> Any:
        from kubernetes.dynamic import DynamicClient

        return DynamicClient(self.api)

    def resource(self, api_version: str, kind: str) -> Any:
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def apply(self, objects: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Dry-run every object (``dryRun=All``: validation, defaulting and conflicts, nothing stored), then apply
        them in order; returns what the server stored. Any refusal in the dry run applies nothing."""
        from kubernetes.client.exceptions import ApiException

        objects = list(objects)
        for dry_run in ("All", None):
            stored = []
            for obj in objects:
                try:
                    res = self.resource(obj["apiVersion"], obj["kind"])
                    out = self.dynamic.server_side_apply(res, body=obj, field_manager=self.field_manager,
                                                         force_conflicts=False, dry_run=dry_run)
                except ApiException as exc:
                    step = "dry-run apply of" if dry_run else "apply of"
                    raise api_error(exc, f"{step} {_describe(obj)}") from exc
                stored.append(out.to_dict())
        return stored

    def get(self, api_version: str, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        """The stored object, or None when there is none."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self.dynamic.get(self.resource(api_version, kind), name=name, namespace=namespace).to_dict()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise api_error(exc, f"get {kind} {namespace}/{name}") from exc

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        from kubernetes.client.exceptions import ApiException

        try:
            found = self.dynamic.get(self.resource(api_version, kind), namespace=namespace,
                                     label_selector=label_selector)
        except ApiException as exc:
            raise api_error(exc, f"list {kind} in {namespace} ({label_selector})") from exc
        return [item.to_dict() for item in found.items]

    def delete(self, api_version: str, kind: str, name: str, namespace: str, propagation: str = "Foreground") -> bool:
        """Delete (foreground: dependents such as ReplicaSets and Pods first); False when it was not there."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.dynamic.delete(self.resource(api_version, kind), name=name, namespace=namespace,
                                propagation_policy=propagation)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise api_error(exc, f"delete {kind} {namespace}/{name}") from exc
        return True

    def wait_available(self, name: str, namespace: str, timeout_s: float) -> dict[str, Any]:
        """Wait until the Deployment's controller saw its latest spec (observedGeneration >= generation) and it
        is Available; RolloutTimeout after ``timeout_s`` or when its progress deadline was exceeded."""
        deadline = self.clock() + timeout_s
        while True:
            dep = self.get("apps/v1", "Deployment", name, namespace)
            if dep is None:
                raise RolloutTimeout(f"Deployment {namespace}/{name} vanished while waiting for its rollout")
            verdict = rollout_state(dep)
            if verdict == "available":
                return dep
            if verdict.startswith("failed") or self.clock() >= deadline:
                status = dep.get("status") or {}
                raise RolloutTimeout(
                    f"Deployment {namespace}/{name} not Available after {timeout_s:.0f} s ({verdict}; "
                    f"observedGeneration {status.get('observedGeneration')} of {dep['metadata'].get('generation')}"
                    f", {status.get('availableReplicas') or 0} available): check its pods' events "
                    "(image pull, init container fetch/sha256, GPU scheduling)")
            time.sleep(min(self.poll_s, max(0.0, deadline - self.clock())))


def rollout_state(dep: dict[str, Any]) -> str:
    """"available", "progressing: ..." or "failed: ..." for a Deployment as stored."""
    status = dep.get("status") or {}
    if (status.get("observedGeneration") or 0) < (dep["metadata"].get("generation") or 0):
        return "progressing: the controller has not seen the latest spec"
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    progressing = conditions.get("Progressing") or {}
    if progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
        return f"failed: {progressing.get('message', 'progress deadline exceeded')}"
    if (conditions.get("Available") or {}).get("status") == "True":
        return "available"
    return "progressing: not Available yet"


def create_random_secret(api: Any, namespace: str, name: str, key: str, labels: dict[str, str]) -> bool:
    """Create the Secret ``name`` holding a random ``key`` unless it exists; True when it was created, False when
    one was already there (kept as it is: another worker, or an admin, made it first). Other refusals (a 403 for
    an identity that may not create Secrets) are the caller's to explain."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
            "stringData": {key: secrets.token_urlsafe(32)}}
    try:
        client.CoreV1Api(api).create_namespaced_secret(namespace, body)
        return True
    except ApiException as exc:
        if exc.status == 409:
            return False
        raise


def parse_time(value: Any) -> datetime | None:
    """An API server timestamp (RFC 3339 ``2026-12-07T09:00:00Z``, or what the client already parsed) as an aware
    datetime; None when absent or unreadable."""
    if value is None or isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
