"""The pipeline's own objects on a cluster, beside the served versions: who the flow runs are, what they may do,
and the two keys every run must share.

- ServiceAccount ``canaryflow-release``: the identity of the flow-run pods (the Prefect Kubernetes work pool's
  base job template names it, deployments/templates/prefect-kubernetes-job-template.json).
- Role + RoleBinding ``canaryflow-release`` in the namespace, least privilege: exactly the kinds and verbs the
  release's interfaces use (KubernetesBackend, GatewayApiRouter, the Lease locks, the replay through the service
  proxy), ``get`` on the two key Secrets by name, and nothing cluster-wide. tests/integration/test_k8s_pipeline.py
  runs a release's cluster steps with a token of this ServiceAccount, so a rule missing here fails there.
- Secrets ``canaryflow-seal-key`` (``seal_key``: the HMAC key of the serving state, canaryflow/core/seal.py, mounted
  read-only into every flow-run pod at ``/var/run/secrets/canaryflow/seal_key``) and ``canaryflow-pin-key``
  (``pin-key``: deployments/kubernetes/gateway.py) are created with random values by :func:`ensure_keys`
  (``canaryflow k8s init``) when missing and never changed or printed afterwards: a new seal key would un-trust
  every champion sealed before it.
"""

from __future__ import annotations

from typing import Any

from deployments.kubernetes.apply import Applier, api_error, create_random_secret
from deployments.kubernetes.gateway import PIN_SECRET, PIN_SECRET_KEY

SERVICE_ACCOUNT = "canaryflow-release"
SEAL_SECRET, SEAL_SECRET_KEY = "canaryflow-seal-key", "seal_key"
SEAL_MOUNT = "/var/run/secrets/canaryflow"
_LABELS = {"app.kubernetes.io/part-of": "canaryflow", "app.kubernetes.io/component": "pipeline"}
_WRITE = ["get", "list", "watch", "create", "patch", "update", "delete"]


def rules() -> list[dict[str, Any]]:
    """What a release run does on the cluster, verb by verb."""
    return [
        # one version's objects (deployments/kubernetes/objects.py, pod.py): server-side apply is a PATCH
        {"apiGroups": [""], "resources": ["services", "configmaps"], "verbs": _WRITE},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": _WRITE},
        {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": _WRITE},
        {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": _WRITE},
        {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "verbs": _WRITE},
        # the traffic split (deployments/kubernetes/gateway.py)
        {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes"], "verbs": _WRITE},
        # the canary's replay of live rows on one version, through the API server's service proxy
        {"apiGroups": [""], "resources": ["services/proxy"], "verbs": ["get", "create"]},
        # the model locks (deployments/kubernetes/lease.py)
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
        # the pin key, by name only (the seal key is a mounted volume: no API read needed)
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [PIN_SECRET], "verbs": ["get"]},
    ]


def objects(namespace: str) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding of the flow-run pods in ``namespace``."""
    meta = {"name": SERVICE_ACCOUNT, "namespace": namespace, "labels": dict(_LABELS)}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta, "rules": rules()},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SERVICE_ACCOUNT},
         "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}]},
    ]


def ensure_keys(api: Any, namespace: str) -> list[str]:
    """Create the seal and pin key Secrets with random values where missing; an existing one is kept as it is.
    Returns what was done, one line per Secret (never a key)."""
    from kubernetes.client.exceptions import ApiException

    done = []
    for name, key in ((SEAL_SECRET, SEAL_SECRET_KEY), (PIN_SECRET, PIN_SECRET_KEY)):
        try:
            created = create_random_secret(api, namespace, name, key, _LABELS)
        except ApiException as exc:
            raise api_error(exc, f"create Secret {namespace}/{name}") from exc
        done.append(f"Secret {namespace}/{name}: " + (f"created with a random {key}" if created else "exists, kept"))
    return done


def init(api: Any, namespace: str, field_manager: str = "canaryflow") -> list[str]:
    """Everything the flow runs need in ``namespace`` before the first release: the namespace's pipeline objects
    (server-side apply, dry run first) and the key Secrets. Safe to run again."""
    applier = Applier(api, field_manager)
    applier.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}])
    stored = applier.apply(objects(namespace))
    lines = [f"Namespace {namespace}: applied"]
    lines += [f"{obj['kind']} {namespace}/{obj['metadata']['name']}: applied" for obj in stored]
    return lines + ensure_keys(api, namespace)
