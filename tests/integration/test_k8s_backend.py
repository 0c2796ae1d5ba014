"""KubernetesBackend and its applier against a real kube-apiserver + etcd (fixture kube_api; no kubelet, no
controllers: Pods never run, Deployments never become Available by themselves, foreground deletion never
finishes). Where a test needs a Deployment Available it patches the status subresource itself, as the kubelet and
the deployment controller would, and says so. Also: the init container's fetch script against a loopback HTTP
server (sha256 match and mismatch)."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from canaryflow.core.errors import ServingError
from canaryflow.core.settings import KubernetesSettings, Settings
from deployments.kubernetes import objects as o
from deployments.kubernetes.apply import Applier, FieldConflict, KubeApplyError, RolloutTimeout
from deployments.kubernetes.backend import KINDS, KubernetesBackend
from deployments.kubernetes.pod import TEMPLATES

SHA = "cd" * 32


def wait_for(condition: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout_s} s")


@pytest.fixture(scope="module")
def api(kube_api: Any) -> Any:
    from kubernetes import config

    return config.new_client_from_config(str(kube_api.kubeconfig))


@pytest.fixture(scope="module")
def namespace(api: Any) -> str:
    from kubernetes import client

    name = f"k8s-backend-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    return name


def backend(api: Any, namespace: str, rollout_s: float = 30.0, sha: str = SHA) -> KubernetesBackend:
    k = KubernetesSettings(namespace=namespace, rollout_timeout_s=rollout_s, gpus_per_pod=1,
                           tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                           node_selector={"nvidia.com/gpu.present": "true"}, gateway_namespace="gateways")
    source = lambda model, version, archive: (f"https://mlflow.example/{archive.name}", sha)  # noqa: E731
    return KubernetesBackend(Settings.model_construct(kubernetes=k), archive_source=source, api_client=api,
                             poll_s=0.05)


def mark_available(api: Any, namespace: str, name: str) -> None:
    """What the deployment controller and kubelet would report once the pods are Ready (there are none here)."""
    from kubernetes import client

    apps = client.AppsV1Api(api)
    dep = wait_for(lambda: _read(apps, name, namespace))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    apps.patch_namespaced_deployment_status(name, namespace, {"status": {
        "observedGeneration": dep.metadata.generation, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2,
        "availableReplicas": 2, "conditions": [{"type": "Available", "status": "True", "reason": "Simulated",
                                                "message": "status patched by the test", "lastUpdateTime": now,
                                                "lastTransitionTime": now}]}})


def _read(apps: Any, name: str, namespace: str) -> Any:
    from kubernetes.client.exceptions import ApiException

    try:
        return apps.read_namespaced_deployment(name, namespace)
    except ApiException:
        return None


def register_available(b: KubernetesBackend, api: Any, model: str, version: str) -> bool:
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(b.register, model, version, Path(f"/store/{model}_v{version}.mar"))
        mark_available(api, b.namespace, o.object_name(model, version))
        return done.result(timeout=30)


@pytest.fixture(scope="module")
def served(api: Any, namespace: str) -> KubernetesBackend:
    b = backend(api, namespace)
    assert register_available(b, api, "iris", "1") is True
    return b


@pytest.mark.kube
@pytest.mark.integration
def test_register_applies_every_object_with_labels_and_settings(served: KubernetesBackend, api: Any) -> None:
    ns, name = served.namespace, o.object_name("iris", "1")
    stored = {kind: served.applier.get(v, kind, name, ns) for v, kind in KINDS}
    for kind, obj in stored.items():
        assert obj is not None, kind
        assert obj["metadata"]["labels"][o.MODEL_LABEL] == "iris" and obj["metadata"]["labels"][o.VERSION_LABEL] == "1"
        managers = {m["manager"] for m in obj["metadata"]["managedFields"]}
        assert "canaryflow" in managers
    spec = stored["Deployment"]["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    ts = next(c for c in spec["containers"] if c["name"] == "torchserve")
    assert ts["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert ts["securityContext"]["readOnlyRootFilesystem"] is True
    proxy = next(c for c in spec["containers"] if c["name"] == "keyproxy")
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/ping"
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    hpa = stored["HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert hpa["behavior"]["scaleUp"]["policies"] == [{"type": "Percent", "value": 100, "periodSeconds": 15}]
    peers = stored["NetworkPolicy"]["spec"]["ingress"]
    assert peers[0]["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "gateways"}
    assert [r["ports"][0]["port"] for r in peers] == ["inference", "metrics"]
    assert served.versions("iris") == ["1"] and served.healthy()


@pytest.mark.kube
@pytest.mark.integration
def test_register_again_is_a_no_op_and_reapply_changes_nothing(served: KubernetesBackend) -> None:
    ns, name = served.namespace, o.object_name("iris", "1")
    before = {kind: served.applier.get(v, kind, name, ns) for v, kind in KINDS}
    before = {k: obj if k == "HorizontalPodAutoscaler" else obj["metadata"]["resourceVersion"]
              for k, obj in before.items()}
    assert served.register("iris", "1", Path("/store/iris_v1.mar")) is False  # same archive sha256
    served.applier.apply(served.objects("iris", "1", Path("/store/iris_v1.mar")))  # SSA of identical objects
    after = {kind: served.applier.get(v, kind, name, ns) for v, kind in KINDS}
    after = {k: obj if k == "HorizontalPodAutoscaler" else obj["metadata"]["resourceVersion"]
             for k, obj in after.items()}
    hpa_before, hpa_after = before.pop("HorizontalPodAutoscaler"), after.pop("HorizontalPodAutoscaler")
    assert after == before
    # This v1.24 API server re-stamps the HPA's managedFields time on an identical apply (a new resourceVersion,
    # nothing else changes); the spec and the ownership stay as they were.
    assert hpa_after["spec"] == hpa_before["spec"]
    strip = lambda hpa: [{**m, "time": None} for m in hpa["metadata"]["managedFields"]]  # noqa: E731
    assert strip(hpa_after) == strip(hpa_before)


@pytest.mark.kube
@pytest.mark.integration
def test_rollout_that_never_becomes_available_times_out(api: Any, namespace: str) -> None:
    b = backend(api, namespace, rollout_s=0.5)
    with pytest.raises(RolloutTimeout, match="not Available after"):
        b.register("slow", "1", Path("/store/slow_v1.mar"))  # no kubelet, nobody patches its status


@pytest.mark.kube
@pytest.mark.integration
def test_dry_run_refuses_a_bad_object_before_anything_is_created(served: KubernetesBackend) -> None:
    objs = served.objects("bad", "1", Path("/store/bad_v1.mar"))
    objs[-1]["metadata"]["labels"]["canaryflow.io/version"] = "not a label value!"  # the last one applied
    with pytest.raises(KubeApplyError, match="dry-run apply of HorizontalPodAutoscaler") as err:
        served.applier.apply(objs)
    assert err.value.status == 422
    name = o.object_name("bad", "1")
    assert [served.applier.get(v, k, name, served.namespace) for v, k in KINDS] == [None] * len(KINDS)


@pytest.mark.kube
@pytest.mark.integration
def test_another_field_manager_owning_a_field_is_a_typed_conflict(served: KubernetesBackend, api: Any) -> None:
    intruder = Applier(api, "someone-else")
    hpa = o.hpa(served.settings, "iris", "1", served.namespace, bounds=(2, 99))
    intruder.dynamic.server_side_apply(intruder.resource("autoscaling/v2", "HorizontalPodAutoscaler"), body=hpa,
                                       field_manager="someone-else", force_conflicts=True)
    with pytest.raises(FieldConflict) as err:
        served.scale_for_share("iris", "1", 25)
    assert err.value.managers == ["someone-else"] and ".spec.maxReplicas" in err.value.fields
    assert "someone-else" in str(err.value)
    stored = served.applier.get("autoscaling/v2", "HorizontalPodAutoscaler", o.object_name("iris", "1"),
                                served.namespace)
    assert stored["spec"]["maxReplicas"] == 99  # never forced: the other manager's value stands


@pytest.mark.kube
@pytest.mark.integration
def test_canary_share_sets_the_hpa_bounds(api: Any, namespace: str) -> None:
    b = backend(api, namespace)
    b.applier.apply([o.hpa(b.settings, "canary", "2", namespace)])
    assert b.scale_for_share("canary", "2", 25) == (1, 3)
    stored = b.applier.get("autoscaling/v2", "HorizontalPodAutoscaler", o.object_name("canary", "2"), namespace)
    assert (stored["spec"]["minReplicas"], stored["spec"]["maxReplicas"]) == (1, 3)


@pytest.mark.kube
@pytest.mark.integration
def test_default_version_is_recorded_per_model(served: KubernetesBackend) -> None:
    assert served.default_version("iris") is None
    served.set_default("iris", "1")
    assert served.default_version("iris") == "1"
    with pytest.raises(ServingError, match="not served"):
        served.set_default("iris", "7")


@pytest.mark.kube
@pytest.mark.integration
def test_replay_goes_through_the_api_server_service_proxy(served: KubernetesBackend) -> None:
    # No kubelet: no pod is ready. The empty Endpoints is what the endpoints controller (absent here) writes for
    # such a Service; the API server then answers 503 for it, which proves the path (namespace, Service name,
    # inference port) resolves on the server.
    from kubernetes import client

    client.CoreV1Api(served.api).create_namespaced_endpoints(served.namespace,
                                                             {"metadata": {"name": o.object_name("iris", "1")}})
    with pytest.raises(KubeApplyError, match="replay 1 rows on iris v1: HTTP 503") as err:
        served.replay("iris", "1", [[1.0, 2.0]])
    assert o.object_name("iris", "1") in str(err.value)


@pytest.mark.kube
@pytest.mark.integration
def test_unregister_deletes_every_object_and_is_idempotent(api: Any, namespace: str) -> None:
    b = backend(api, namespace)
    assert register_available(b, api, "gone", "2") is True
    b.set_default("gone", "2")
    b.unregister("gone", "2")
    b.unregister("gone", "2")
    name = o.object_name("gone", "2")
    for v, kind in KINDS:
        obj = b.applier.get(v, kind, name, namespace)
        # Foreground deletion: without the garbage collector (no controller manager here) an object may stay,
        # marked for deletion with the foregroundDeletion finalizer; a cluster's GC finishes it.
        assert obj is None or (obj["metadata"].get("deletionTimestamp")
                               and "foregroundDeletion" in obj["metadata"].get("finalizers", [])), kind
    assert b.versions("gone") == [] and b.default_version("gone") is None


@pytest.mark.kube
@pytest.mark.integration
def test_healthy_is_false_without_the_namespace(api: Any) -> None:
    assert backend(api, "no-such-namespace").healthy() is False


class _Archive(http.server.BaseHTTPRequestHandler):
    payload = b"not really a mar" * 100

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def archive_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Archive)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/example_v1.mar"
    server.shutdown()


@pytest.mark.integration
@pytest.mark.parametrize("good", [True, False])
def test_fetch_init_container_checks_the_sha256(archive_url: str, tmp_path: Path, good: bool) -> None:
    want = hashlib.sha256(_Archive.payload).hexdigest() if good else "0" * 64
    dest = tmp_path / "example_v1.mar"
    env = {**os.environ, "ARCHIVE_URL": archive_url, "ARCHIVE_SHA256": want, "ARCHIVE_PATH": str(dest)}
    done = subprocess.run([sys.executable, str(TEMPLATES / "k8s-fetch.py")], env=env, capture_output=True,
                          text=True, timeout=30)
    if good:
        assert done.returncode == 0 and dest.read_bytes() == _Archive.payload
    else:
        assert done.returncode == 1 and "sha256 mismatch" in done.stderr
        assert list(tmp_path.iterdir()) == []  # nothing left for TorchServe to load
