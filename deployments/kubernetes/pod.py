"""The Deployment of one served version and the ConfigMap its pod reads (pure builders, plain dicts).

A pod has three containers, all non-root with a read-only root filesystem:
- ``fetch`` (init): downloads the .mar from the MLflow artifact store into an emptyDir model store and checks the
  sha256 the release recorded; a mismatch fails the init container, so TorchServe never starts on that archive.
  The store is filled again on every pod start, so nothing is lost when a pod moves to another node.
- ``torchserve``: token auth on, every address on 127.0.0.1, its working directory (``key_file.json``) in an
  emptyDir shared read-only with the proxy.
- ``keyproxy`` (nginx): the pod's only listeners (``inference``, ``metrics``); it adds TorchServe's current
  inference key upstream (templates/k8s-keyproxy.sh). Probes hit ``/ping`` through it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from canaryflow.core.settings import Settings
from deployments.kubernetes import objects as o
from deployments.kubernetes.objects import (
    INFERENCE_PORT,
    KEY_DIR,
    METRICS_PORT,
    MODEL_STORE,
    SHA_ANNOTATION,
    TS_INFERENCE,
    TS_MANAGEMENT,
    TS_METRICS,
    ArchiveRef,
    config_properties,
    mar_name,
    metadata,
    object_name,
    selector,
)
from deployments.prometheus import TORCHSERVE_METRICS_FILE

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
LOG4J_FILE = TEMPLATES / "log4j2.xml"
UID = 1000  # the pytorch/torchserve image's model-server user; nginx and python run as it too
CONFIG_HASH_ANNOTATION = "canaryflow.io/config-sha256"


def _hardened() -> dict[str, Any]:
    """Each container's securityContext (a fresh dict each: the manifests are dumped without YAML aliases)."""
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}}


def _template(name: str, settings: Settings) -> str:
    values = {"@KEY_DIR@": KEY_DIR, "@TS_INFERENCE@": TS_INFERENCE, "@TS_MANAGEMENT@": TS_MANAGEMENT,
              "@TS_METRICS@": TS_METRICS, "@INFERENCE_PORT@": INFERENCE_PORT, "@METRICS_PORT@": METRICS_PORT,
              "@RESPONSE_TIMEOUT@": settings.serving.response_timeout_s + 5}
    text = (TEMPLATES / name).read_text()
    for placeholder, value in values.items():
        text = text.replace(placeholder, str(value))
    return text


def log4j_console() -> str:
    """The local stack's TorchServe log levels (templates/log4j2.xml: nothing per request) with one Console appender
    instead of its files: a pod's log is its stdout (``kubectl logs``), and its root filesystem is read-only.
    TorchServe's default config would write 6-7 lines a request there, and more into an emptyDir."""
    text = LOG4J_FILE.read_text()
    start, end = text.index("<Appenders>"), text.index("</Appenders>") + len("</Appenders>")
    console = ('<Appenders>\n    <Console name="console" target="SYSTEM_OUT">\n'
               '      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>\n    </Console>\n  </Appenders>')
    return re.sub(r'<AppenderRef ref="[^"]+"/>', '<AppenderRef ref="console"/>', text[:start] + console + text[end:])


def config_data(settings: Settings, model: str, version: str) -> dict[str, str]:
    """The ConfigMap's files: TorchServe's config and log config, the proxy's nginx config and script, the fetch
    script."""
    return {"config.properties": config_properties(settings, model, version), "log4j2.xml": log4j_console(),
            "nginx.conf": _template("k8s-keyproxy-nginx.conf", settings),
            "keyproxy.sh": _template("k8s-keyproxy.sh", settings),
            "fetch.py": _template("k8s-fetch.py", settings),
            "torchserve-metrics.yaml": TORCHSERVE_METRICS_FILE.read_text()}


def config_map(settings: Settings, ref: ArchiveRef, namespace: str | None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(ref.model, ref.version, namespace),
            "data": config_data(settings, ref.model, ref.version)}


def _mount(name: str, path: str, read_only: bool = False) -> dict[str, Any]:
    return {"name": name, "mountPath": path, **({"readOnly": True} if read_only else {})}


def _probe(path: str, period_s: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "inference"}, "periodSeconds": period_s,
            "timeoutSeconds": 3, "failureThreshold": failures}


def _fetch(settings: Settings, ref: ArchiveRef, mlflow_auth_secret: str | None) -> dict[str, Any]:
    env = [{"name": "ARCHIVE_URL", "value": ref.url}, {"name": "ARCHIVE_SHA256", "value": ref.sha256},
           {"name": "ARCHIVE_PATH", "value": f"{MODEL_STORE}/{mar_name(ref.model, ref.version)}"}]
    container: dict[str, Any] = {
        "name": "fetch", "image": settings.kubernetes.fetch_image, "command": ["python", "/config/fetch.py"],
        "env": env, "securityContext": _hardened(),
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "volumeMounts": [_mount("config", "/config", True), _mount("model-store", MODEL_STORE),
                         _mount("tmp", "/tmp")]}
    if mlflow_auth_secret:  # MLFLOW_TRACKING_TOKEN or _USERNAME/_PASSWORD, referenced by name, never copied
        container["envFrom"] = [{"secretRef": {"name": mlflow_auth_secret}}]
    return container


def _torchserve(settings: Settings) -> dict[str, Any]:
    k = settings.kubernetes
    limits: dict[str, Any] = {"memory": k.memory_limit}
    if k.gpus_per_pod > 0:
        # a string, as the server stores quantities: an int makes every re-apply rewrite managedFields
        limits["nvidia.com/gpu"] = str(k.gpus_per_pod)
    env = {"TMPDIR": "/tmp", "TEMP": "/tmp", "HOME": "/tmp", "LOG_LOCATION": "/tmp/logs",
           "METRICS_LOCATION": "/tmp/logs", "OMP_NUM_THREADS": "1"}
    return {"name": "torchserve", "image": k.image, "workingDir": KEY_DIR,
            "command": ["torchserve", "--start", "--foreground", "--ts-config", "/config/config.properties",
                        "--model-store", MODEL_STORE],
            "env": [{"name": n, "value": v} for n, v in env.items()], "securityContext": _hardened(),
            "resources": {"requests": {"cpu": k.cpu_request, "memory": k.memory_request}, "limits": limits},
            "volumeMounts": [_mount("config", "/config", True), _mount("model-store", MODEL_STORE, True),
                             _mount("keys", KEY_DIR), _mount("tmp", "/tmp")]}


def _keyproxy(settings: Settings) -> dict[str, Any]:
    renew_s = settings.serving.token_expiration_min * 30  # half the key's lifetime, in seconds
    return {"name": "keyproxy", "image": settings.kubernetes.proxy_image, "command": ["sh", "/config/keyproxy.sh"],
            "env": [{"name": "RENEW_EVERY_S", "value": str(renew_s)}],
            "ports": [{"name": "inference", "containerPort": INFERENCE_PORT, "protocol": "TCP"},
                      {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
            "securityContext": _hardened(),
            "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
            # startup allows 10 min for the model to load; after that liveness restarts a hung pod
            "startupProbe": _probe("/ping", 5, 120), "readinessProbe": _probe("/ping", 5, 2),
            "livenessProbe": _probe("/ping", 10, 6),
            # keep serving while the endpoint removal reaches the gateway
            "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
            "volumeMounts": [_mount("config", "/config", True), _mount("keys", KEY_DIR, True),
                             _mount("proxy-tmp", "/tmp")]}


def pod_spec(settings: Settings, ref: ArchiveRef, mlflow_auth_secret: str | None) -> dict[str, Any]:
    k = settings.kubernetes
    empty = [{"name": n, "emptyDir": {}} for n in ("model-store", "keys", "tmp", "proxy-tmp")]
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False, "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [_fetch(settings, ref, mlflow_auth_secret)],
        "containers": [_torchserve(settings), _keyproxy(settings)],
        "volumes": [{"name": "config", "configMap": {"name": object_name(ref.model, ref.version)}}, *empty],
        "terminationGracePeriodSeconds": settings.serving.response_timeout_s + 10}
    if k.node_selector:
        spec["nodeSelector"] = dict(k.node_selector)
    if k.tolerations:
        spec["tolerations"] = [dict(t) for t in k.tolerations]
    if k.affinity:
        spec["affinity"] = dict(k.affinity)
    return spec


def deployment(settings: Settings, ref: ArchiveRef, namespace: str | None,
               mlflow_auth_secret: str | None = None) -> dict[str, Any]:
    """No ``replicas``: the HPA owns it (an applied value would reset the HPA's on every apply). A new archive
    or config changes the pod template's annotations, so the pods roll."""
    config = hashlib.sha256("".join(config_data(settings, ref.model, ref.version).values()).encode()).hexdigest()
    pod_meta = {"labels": metadata(ref.model, ref.version, None)["labels"],
                "annotations": {SHA_ANNOTATION: ref.sha256, CONFIG_HASH_ANNOTATION: config}}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": metadata(ref.model, ref.version, namespace, **{SHA_ANNOTATION: ref.sha256}),
            "spec": {"selector": {"matchLabels": selector(ref.model, ref.version)},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                     "template": {"metadata": pod_meta, "spec": pod_spec(settings, ref, mlflow_auth_secret)}}}


def version_objects(settings: Settings, ref: ArchiveRef, namespace: str | None,
                    mlflow_auth_secret: str | None = None) -> list[dict[str, Any]]:
    """Every object of one served version, in apply order (the ConfigMap before the pods that mount it)."""
    m, v = ref.model, ref.version
    return [config_map(settings, ref, namespace), o.service(m, v, namespace),
            deployment(settings, ref, namespace, mlflow_auth_secret), o.pod_disruption_budget(m, v, namespace),
            o.network_policy(settings, m, v, namespace), o.hpa(settings, m, v, namespace)]
