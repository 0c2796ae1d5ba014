"""Pure builders for one served model version on Kubernetes: names, labels, TorchServe's config and the small
objects around the Deployment (ConfigMap, Service, PodDisruptionBudget, NetworkPolicy, HPA). Plain dicts, no
client: the applier (apply.py) sends them, the manifests generator (manifests.py) writes them to
serving_manifests/, and the unit tests read them. The Deployment itself is in pod.py.

Model names are untrusted input (canaryflow/core/names.py allows ``A-Z a-z 0-9 _ . -``, up to 64): object names
are DNS-1035 labels derived from them, with a short hash whenever the name had to change, so two models never
share objects; the exact model and version are kept in annotations.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from canaryflow.core.settings import HpaSettings, Settings

PART_OF = "canaryflow"
NAME_LABEL, PART_OF_LABEL = "app.kubernetes.io/name", "app.kubernetes.io/part-of"
MODEL_LABEL, VERSION_LABEL = "canaryflow.io/model", "canaryflow.io/version"
MODEL_ANNOTATION, VERSION_ANNOTATION = "canaryflow.io/model-name", "canaryflow.io/version-name"
SHA_ANNOTATION = "canaryflow.io/archive-sha256"
DEFAULT_KEY = "default_version"
INFERENCE_PORT, METRICS_PORT = 8080, 8082  # the key proxy's ports: the only ones the pod exposes
# TorchServe inside the pod, loopback only. Not 8080: the proxy owns the pod's 8080 and a loopback bind of the
# same port would collide with it (one network namespace per pod).
TS_INFERENCE, TS_MANAGEMENT, TS_METRICS = 18080, 18081, 18082
MODEL_STORE, KEY_DIR = "/model-store", "/keys"
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class ArchiveRef:
    """One version to serve: its .mar's URL in the MLflow artifact store and the sha256 the release recorded."""

    model: str
    version: str
    url: str
    sha256: str


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


def dns_name(prefix: str, *parts: str, limit: int = 63) -> str:
    """A DNS-1035 label (``[a-z]([-a-z0-9]*[a-z0-9])?``, at most ``limit``) from a fixed prefix and untrusted parts;
    ``-<8 hex>`` of the parts is appended whenever the plain join is not already such a name."""
    raw = "-".join((prefix, *parts))
    clean = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", raw.lower())).strip("-")
    if clean == raw and len(clean) <= limit:
        return clean
    return f"{clean[:limit - 9].rstrip('-')}-{_digest(prefix, *parts)}"


def object_name(model: str, version: str) -> str:
    """Name of every object of one served version (one name, several kinds)."""
    return dns_name("ts", model, f"v{version}")


def state_name(model: str) -> str:
    """Name of the per-model ConfigMap that records the default version."""
    return dns_name("canaryflow-model", model)


def label_value(value: str) -> str:
    """A valid label value for ``value`` (itself when valid; else a cleaned prefix plus a hash)."""
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value
    clean = re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:54].strip("-_.")
    return f"{clean}-{_digest(value)}" if clean else _digest(value)


def selector(model: str, version: str) -> dict[str, str]:
    """The labels that pick one version's pods (Service, PDB, NetworkPolicy, Deployment selector)."""
    return {NAME_LABEL: "torchserve", MODEL_LABEL: label_value(model), VERSION_LABEL: label_value(version)}


def model_selector(model: str) -> str:
    """Label selector (string form) for every version of a model."""
    return f"{PART_OF_LABEL}={PART_OF},{NAME_LABEL}=torchserve,{MODEL_LABEL}={label_value(model)}"


def metadata(model: str, version: str, namespace: str | None, **annotations: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": object_name(model, version),
                            "labels": {**selector(model, version), PART_OF_LABEL: PART_OF},
                            "annotations": {MODEL_ANNOTATION: model, VERSION_ANNOTATION: version, **annotations}}
    if namespace:
        meta["namespace"] = namespace
    return meta


def mar_name(model: str, version: str) -> str:
    """The archive's file name in the pod's model store (as deployments/torchserve.archive_name)."""
    return f"{model}_v{version}.mar"


def config_properties(settings: Settings, model: str, version: str) -> str:
    """TorchServe's config.properties for one version: token auth on (never disabled), every address on
    loopback, no model API (the one .mar is loaded at start), Prometheus metrics, archives from the store only."""
    s, gpus = settings.serving, settings.kubernetes.gpus_per_pod
    mar = mar_name(model, version)
    per_version = {"defaultVersion": True, "marName": mar, "minWorkers": s.workers_per_version,
                   "maxWorkers": s.workers_per_version, "batchSize": 1, "responseTimeout": s.response_timeout_s}
    lines = {
        "inference_address": f"http://127.0.0.1:{TS_INFERENCE}",
        "management_address": f"http://127.0.0.1:{TS_MANAGEMENT}",
        "metrics_address": f"http://127.0.0.1:{TS_METRICS}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_management_address": "127.0.0.1",
        "model_store": MODEL_STORE,
        "load_models": mar,
        "models": json.dumps({model: {version: per_version}}, separators=(",", ":")),
        "enable_model_api": "false",
        "metrics_mode": "prometheus",
        # TorchServe's defaults + the handler's live-traffic counters (deployments/prometheus.py)
        "metrics_config": "/config/torchserve-metrics.yaml",
        "number_of_gpu": gpus,
        "default_workers_per_model": s.workers_per_version,
        "default_response_timeout": s.response_timeout_s,
        # the key proxy renews the inference key at half this lifetime (templates/k8s-keyproxy.sh)
        "token_expiration_min": s.token_expiration_min,
        "install_py_dep_per_model": "false",
        "allowed_urls": f"file://{MODEL_STORE}/.*",
        # log levels of the local stack, to stdout (pod.log4j_console)
        "vmargs": f"{s.jvm_options} -XX:+UseContainerSupport "
                  "-Dlog4j.configurationFile=file:///config/log4j2.xml",
    }
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def service(model: str, version: str, namespace: str | None) -> dict[str, Any]:
    """ClusterIP Service with the proxy's two ports; TorchServe's management port is not in the pod's ports."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(model, version, namespace),
            "spec": {"type": "ClusterIP", "selector": selector(model, version), "ports": [
                {"name": "inference", "port": INFERENCE_PORT, "targetPort": "inference", "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}]}}


def pod_disruption_budget(model: str, version: str, namespace: str | None) -> dict[str, Any]:
    """maxUnavailable 1, not minAvailable 1: a canary may run a single replica, and minAvailable 1 on one replica
    forbids every eviction (node drains hang); maxUnavailable 1 lets drains proceed one pod at a time while the
    stable version (HPA min 2) keeps serving."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": metadata(model, version, namespace),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(model, version)}}}


def _namespace_peer(labels: dict[str, str], namespace: str | None) -> dict[str, Any]:
    peer: dict[str, Any] = {"podSelector": {"matchLabels": dict(labels)}}
    if namespace is not None:  # "" is any namespace, a name is that namespace, None is the policy's own
        peer["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": namespace}} if namespace else {}
    return peer


def network_policy(settings: Settings, model: str, version: str, namespace: str | None) -> dict[str, Any]:
    """Ingress to the pods: inference only from the gateway's pods (and the API servers' addresses in
    ``replay_from_cidrs``: the canary's replay comes through the service proxy), metrics only from Prometheus,
    nothing else. TorchServe's management port listens on loopback and is never a port of the pod: nothing
    reaches it."""
    k = settings.kubernetes
    gateway_ns = k.gateway_namespace if k.gateway_namespace not in (None, namespace) else None
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": metadata(model, version, namespace),
            "spec": {"podSelector": {"matchLabels": selector(model, version)}, "policyTypes": ["Ingress"],
                     "ingress": [
                         {"from": [_namespace_peer(k.gateway_pod_labels, gateway_ns)]
                          + [{"ipBlock": {"cidr": cidr}} for cidr in k.replay_from_cidrs],
                          "ports": [{"protocol": "TCP", "port": "inference"}]},
                         {"from": [_namespace_peer(k.prometheus_pod_labels, k.monitoring_namespace or "")],
                          "ports": [{"protocol": "TCP", "port": "metrics"}]}]}}


def _quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"


def share_bounds(hpa: HpaSettings, percent: float) -> tuple[int, int]:
    """A canary's (min, max) replicas for ``percent`` of the traffic: the stable bounds scaled by the share,
    rounded up, at least 1 (100% gives the stable bounds)."""
    share = min(max(percent, 0.0), 100.0) / 100.0
    low = max(1, math.ceil(share * hpa.min_replicas))
    return low, max(low, math.ceil(share * hpa.max_replicas))


def hpa(settings: Settings, model: str, version: str, namespace: str | None,
        bounds: tuple[int, int] | None = None) -> dict[str, Any]:
    """autoscaling/v2 HPA on CPU and memory (plus a per-pod request rate when set); ``bounds`` overrides
    (min, max) replicas (a canary's, from :func:`share_bounds`)."""
    h = settings.kubernetes.hpa
    low, high = bounds or (h.min_replicas, max(h.min_replicas, h.max_replicas))
    metrics: list[dict[str, Any]] = [
        {"type": "Resource", "resource": {"name": name, "target": {"type": "Utilization", "averageUtilization": pct}}}
        for name, pct in (("cpu", h.cpu_utilization), ("memory", h.memory_utilization))]
    if h.requests_per_pod:
        metrics.append({"type": "Pods", "pods": {"metric": {"name": h.requests_metric}, "target": {
            "type": "AverageValue", "averageValue": _quantity(h.requests_per_pod)}}})
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": metadata(model, version, namespace),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": object_name(model, version)},
                     "minReplicas": low, "maxReplicas": high, "metrics": metrics,
                     "behavior": {
                         "scaleUp": {"policies": [{"type": "Percent", "value": h.scale_up_percent,
                                                   "periodSeconds": h.scale_up_period_s}]},
                         "scaleDown": {"stabilizationWindowSeconds": h.scale_down_stabilization_s}}}}


def state_config_map(model: str, namespace: str | None, default_version: str) -> dict[str, Any]:
    """The per-model record of the default version (what un-pinned traffic falls back to)."""
    meta: dict[str, Any] = {"name": state_name(model),
                            "labels": {PART_OF_LABEL: PART_OF, MODEL_LABEL: label_value(model),
                                       "app.kubernetes.io/component": "serving-state"},
                            "annotations": {MODEL_ANNOTATION: model}}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {DEFAULT_KEY: default_version}}
