"""KubernetesBackend: the ServingBackend Protocol on a cluster. Each model version is its own set of objects
(ConfigMap, Service, Deployment, PodDisruptionBudget, NetworkPolicy, HPA; see objects.py and pod.py), applied
server-side as ``settings.kubernetes.field_manager`` after a dry run, and waited for until Available.

"Default version": on Kubernetes the HTTPRoute (gateway.py) decides where traffic goes; the default is what
un-pinned traffic falls back to when no split is set, recorded here on a small per-model ConfigMap so the router
and ``canaryflow k8s status`` read one answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import quote

from canaryflow.core.errors import ServingError
from canaryflow.core.names import name_problem
from canaryflow.core.serving_contract import REPLAY_HEADER
from canaryflow.core.settings import Settings
from deployments.kubernetes import objects as o
from deployments.kubernetes.apply import Applier, KubeApplyError, api_error, load_api_client
from deployments.kubernetes.pod import version_objects

ArchiveSource = Callable[[str, str, Path], tuple[str, str]]
"""(model, version, local archive) -> (URL of the .mar in the MLflow artifact store, its sha256)."""
KINDS = (("autoscaling/v2", "HorizontalPodAutoscaler"), ("networking.k8s.io/v1", "NetworkPolicy"),
         ("policy/v1", "PodDisruptionBudget"), ("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ConfigMap"))
"""One version's kinds, in delete order (the HPA first, so it cannot scale what is being deleted)."""


def _version_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


class KubernetesBackend:
    """TorchServe per model version on a cluster (implements ServingBackend). ``api_client`` is an injected
    kubernetes ApiClient (tests); otherwise one is built from settings (apply.load_api_client)."""

    def __init__(self, settings: Settings, *, archive_source: ArchiveSource, api_client: Any = None,
                 mlflow_auth_secret: str | None = None, poll_s: float = 1.0) -> None:
        self.settings = settings
        self.namespace = settings.kubernetes.namespace
        self.archive_source = archive_source
        self.mlflow_auth_secret = mlflow_auth_secret
        self._api = api_client
        self._poll_s = poll_s

    @cached_property
    def api(self) -> Any:
        return self._api or load_api_client(self.settings.kubernetes)

    @cached_property
    def applier(self) -> Applier:
        return Applier(self.api, self.settings.kubernetes.field_manager, poll_s=self._poll_s)

    @staticmethod
    def _check(model: str, version: str | None = None) -> None:
        if problem := name_problem(model, version):
            raise ServingError(problem)

    def healthy(self) -> bool:
        """True when the API server answers and the namespace exists. The flow runs' Role is namespaced (it cannot
        read a Namespace, a cluster-scoped object): for them a read of the namespace's Deployments answers."""
        try:
            return self.applier.get("v1", "Namespace", self.namespace, "") is not None
        except KubeApplyError as exc:
            if exc.status != 403:
                return False
        except Exception:  # noqa: BLE001 - any failure to reach the API server is "not healthy"
            return False
        try:
            self.applier.list("apps/v1", "Deployment", self.namespace, f"{o.PART_OF_LABEL}={o.PART_OF}")
            return True
        except Exception:  # noqa: BLE001
            return False

    def versions(self, model: str) -> list[str]:
        """Versions with a Deployment (exact names from annotations; the labels are only a selector)."""
        self._check(model)
        found = self.applier.list("apps/v1", "Deployment", self.namespace, o.model_selector(model))
        # one being deleted (foreground: until its pods are gone) is no longer served
        annotations = [d["metadata"].get("annotations") or {} for d in found
                       if not d["metadata"].get("deletionTimestamp")]
        return sorted({a[o.VERSION_ANNOTATION] for a in annotations
                       if a.get(o.MODEL_ANNOTATION) == model and o.VERSION_ANNOTATION in a}, key=_version_key)

    def objects(self, model: str, version: str, archive: Path) -> list[dict[str, Any]]:
        """What :meth:`register` applies for this version."""
        url, sha256 = self.archive_source(model, version, archive)
        return version_objects(self.settings, o.ArchiveRef(model, version, url, sha256), self.namespace,
                               self.mlflow_auth_secret)

    def register(self, model: str, version: str, archive: Path) -> bool:
        """Apply the version's objects (dry run first) and wait until its Deployment is Available; False when
        that version already has a Deployment for the same archive (sha256). A different archive rolls its pods."""
        self._check(model, version)
        wanted = self.objects(model, version, archive)
        sha = wanted[2]["metadata"]["annotations"][o.SHA_ANNOTATION]
        current = self.applier.get("apps/v1", "Deployment", o.object_name(model, version), self.namespace)
        if current and (current["metadata"].get("annotations") or {}).get(o.SHA_ANNOTATION) == sha:
            return False
        self.applier.apply(wanted)
        self.applier.wait_available(o.object_name(model, version), self.namespace,
                                    self.settings.kubernetes.rollout_timeout_s)
        return True

    def tune(self, model: str, version: str, archive: Path, config: Any) -> bool:
        """Not on a cluster: replicas follow the HPA and TorchServe's settings come from the ConfigMap, so the
        release's search of serving settings is skipped (:meth:`serving_config` is None)."""
        return False

    def serving_config(self, model: str, version: str) -> None:
        """None: no per-version serving settings to tune here (see :meth:`tune`)."""
        return None

    def unregister(self, model: str, version: str) -> None:
        """Delete the version's objects (foreground propagation; missing ones are fine). When it was the
        recorded default, the record goes too: nothing serves it any more."""
        self._check(model, version)
        name = o.object_name(model, version)
        for api_version, kind in KINDS:
            self.applier.delete(api_version, kind, name, self.namespace)
        if self.default_version(model) == version:
            # no dependents: gone at once (foreground would wait for the garbage collector to drop its finalizer)
            self.applier.delete("v1", "ConfigMap", o.state_name(model), self.namespace, propagation="Background")

    def replicas(self, model: str, version: str) -> tuple[int, int]:
        """(ready, desired) pods of the version's Deployment; (0, 0) when it has none."""
        self._check(model, version)
        dep = self.applier.get("apps/v1", "Deployment", o.object_name(model, version), self.namespace) or {}
        status = dep.get("status") or {}
        return int(status.get("readyReplicas") or 0), int(status.get("replicas") or 0)

    def set_default(self, model: str, version: str) -> None:
        """Record ``version`` as the model's default (it must be served)."""
        self._check(model, version)
        if version not in self.versions(model):
            raise ServingError(f"{model} v{version} is not served in namespace {self.namespace}: register it "
                               "before making it the default")
        self.applier.apply([o.state_config_map(model, self.namespace, version)])

    def default_version(self, model: str) -> str | None:
        """The recorded default version (None: none recorded)."""
        self._check(model)
        state = self.applier.get("v1", "ConfigMap", o.state_name(model), self.namespace)
        if state is None or (state["metadata"].get("annotations") or {}).get(o.MODEL_ANNOTATION) != model:
            return None
        return (state.get("data") or {}).get(o.DEFAULT_KEY)

    def scale_for_share(self, model: str, version: str, percent: float) -> tuple[int, int]:
        """Set the version's HPA bounds from its traffic share (objects.share_bounds); returns (min, max)."""
        self._check(model, version)
        bounds = o.share_bounds(self.settings.kubernetes.hpa, percent)
        self.applier.apply([o.hpa(self.settings, model, version, self.namespace, bounds)])
        return bounds

    def replay(self, model: str, version: str, rows: list[list[float]]) -> list[dict[str, Any]]:
        """Answer live rows again with one version, through the API server's service proxy (works from outside
        the cluster; the gateway, its split and its metrics see nothing). Returns the predictions."""
        from kubernetes.client.exceptions import ApiException

        self._check(model, version)
        path = (f"/api/v1/namespaces/{self.namespace}/services/{o.object_name(model, version)}:inference/proxy"
                f"/predictions/{quote(model, safe='')}/{quote(version, safe='')}")
        try:
            raw = self.applier.dynamic.request("post", path, body={"inputs": rows}, serialize=False, header_params={
                REPLAY_HEADER: "1", "Accept": "application/json"}, _request_timeout=30)
        except ApiException as exc:
            raise api_error(exc, f"replay {len(rows)} rows on {model} v{version}") from exc
        try:
            return list(json.loads(raw.data)["predictions"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ServingError(f"replay on {model} v{version}: unexpected answer {raw.data[:200]!r}") from exc
