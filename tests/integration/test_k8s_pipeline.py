"""The flow runs' identity on a cluster (deployments/kubernetes/pipeline.py, `canaryflow k8s init`) against a real
kube-apiserver with RBAC on: the namespace is prepared once (ServiceAccount, Role, RoleBinding, the seal and pin key
Secrets, kept on a second run), and a release's cluster steps then run with a real token of that ServiceAccount,
exactly as a flow-run pod would: release slot and state lock (Leases), a version served, a canary at 25 %, the
promotion, the old version retired, the pin key read, `k8s status`. What the Role does not grant is refused (the
seal key through the API, other Secrets, another namespace).

No kubelet: FakeKubelet (tests/kubeapi.py) marks Deployments Available, with the admin's credentials."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from canaryflow.core import locks
from canaryflow.core.settings import Settings
from canaryflow.core.state import Route
from canaryflow.release import cluster
from canaryflow.release.converge import converge
from canaryflow.services import Services
from deployments.kubernetes import pipeline
from deployments.kubernetes.lease import LeaseLocks
from tests.kubeapi import cluster_services

pytestmark = [pytest.mark.integration, pytest.mark.kube]
MODEL = "churn"


@pytest.fixture(scope="module")
def admin(kube_api: Any) -> Any:
    from kubernetes import config

    return config.new_client_from_config(str(kube_api.kubeconfig))


@pytest.fixture(scope="module")
def namespace(admin: Any) -> str:
    name = f"pipeline-{uuid.uuid4().hex[:6]}"
    first = pipeline.init(admin, name)
    assert first == [f"Namespace {name}: applied", f"ServiceAccount {name}/canaryflow-release: applied",
                     f"Role {name}/canaryflow-release: applied", f"RoleBinding {name}/canaryflow-release: applied",
                     f"Secret {name}/canaryflow-seal-key: created with a random seal_key",
                     f"Secret {name}/canaryflow-pin-key: created with a random pin-key"]
    return name


def _secret(admin: Any, namespace: str, name: str, key: str) -> str:
    from kubernetes import client

    return base64.b64decode(client.CoreV1Api(admin).read_namespaced_secret(name, namespace).data[key]).decode()


def test_init_is_safe_again_and_keeps_the_keys(admin: Any, namespace: str) -> None:
    seal_key = _secret(admin, namespace, pipeline.SEAL_SECRET, pipeline.SEAL_SECRET_KEY)
    pin_key = _secret(admin, namespace, "canaryflow-pin-key", "pin-key")
    assert len(seal_key) >= 32 and len(pin_key) >= 32 and seal_key != pin_key
    again = pipeline.init(admin, namespace)
    assert again[-2:] == [f"Secret {namespace}/canaryflow-seal-key: exists, kept",
                          f"Secret {namespace}/canaryflow-pin-key: exists, kept"]
    assert _secret(admin, namespace, pipeline.SEAL_SECRET, pipeline.SEAL_SECRET_KEY) == seal_key  # never rotated
    assert all(seal_key not in line and pin_key not in line for line in again)  # never printed


@pytest.fixture(scope="module")
def release_kubeconfig(admin: Any, namespace: str, kube_api: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubeconfig with a real token of the ServiceAccount canaryflow-release (TokenRequest), what a flow-run pod
    mounts."""
    from kubernetes import client

    token = client.CoreV1Api(admin).create_namespaced_service_account_token(
        pipeline.SERVICE_ACCOUNT, namespace, {"spec": {"expirationSeconds": 3600}}).status.token
    path = tmp_path_factory.mktemp("release-sa") / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: envtest\n  cluster:\n    server: {kube_api.url}\n    insecure-skip-tls-verify: true\n"
        f"users:\n- name: release\n  user:\n    token: {token}\n"
        "contexts:\n- name: release\n  context:\n    cluster: envtest\n    user: release\n"
        "current-context: release\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def svc(admin: Any, namespace: str, release_kubeconfig: Path, tmp_path: Path) -> Iterator[Services]:
    settings = Settings(platform="kubernetes", state_dir=tmp_path / "state",
                        kubernetes={"kubeconfig": str(release_kubeconfig), "namespace": namespace,
                                    "gpus_per_pod": 0, "rollout_timeout_s": 30})
    with cluster_services(settings, admin, MODEL) as services:
        yield services


def test_a_release_runs_with_the_release_service_accounts_token(svc: Services, admin: Any, namespace: str) -> None:
    assert isinstance(svc.locks, LeaseLocks)
    assert svc.backend.healthy()  # a namespaced Role cannot read the Namespace: the Deployments' read answers
    with locks.release_slot(svc, MODEL, 30), locks.hold(svc, MODEL, "ramp"):
        converge(svc, MODEL, Route("1"))
        converge(svc, MODEL, Route("1", "2", 25.0))
        assert svc.router.route(MODEL) == Route("1", "2", 25.0)
        pin = svc.router.pin_credentials()  # the pin key Secret, read by name
        assert list(pin.values()) == [_secret(admin, namespace, "canaryflow-pin-key", "pin-key")]
        converge(svc, MODEL, Route("2"))
        svc.backend.unregister(MODEL, "1")
    rows = cluster.status(svc)
    assert [(r["model"], [v["version"] for v in r["versions"]], r["default"]) for r in rows] == [(MODEL, ["2"], "2")]


def test_what_the_role_does_not_grant_is_refused(svc: Services, namespace: str) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = svc.backend.api
    core = client.CoreV1Api(api)
    refused = {
        "read the seal key through the API": lambda: core.read_namespaced_secret(pipeline.SEAL_SECRET, namespace),
        "list Secrets": lambda: core.list_namespaced_secret(namespace),
        "create a Secret": lambda: core.create_namespaced_secret(namespace, {"metadata": {"name": "x"}}),
        "touch another namespace": lambda: client.AppsV1Api(api).list_namespaced_deployment("default"),
        "read Pods' logs": lambda: core.read_namespaced_pod_log("any", namespace),
        "delete its own namespace": lambda: core.delete_namespace(namespace),
    }
    for what, call in refused.items():
        with pytest.raises(ApiException) as err:
            call()
        assert err.value.status == 403, what
    review = client.AuthorizationV1Api(api).create_self_subject_access_review({"spec": {"resourceAttributes": {
        "namespace": namespace, "verb": "create", "resource": "services", "subresource": "proxy"}}})
    assert review.status.allowed  # the canary's replay through the service proxy


def test_canaryflow_k8s_init_as_a_user_runs_it(kube_api: Any, admin: Any, tmp_path: Path) -> None:
    """The CLI command: settings from the environment, a fresh namespace prepared, no key on the screen."""
    import os
    import subprocess
    import sys

    namespace = f"init-{uuid.uuid4().hex[:6]}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("CANARYFLOW_")}
    env.update({"CANARYFLOW_STATE_DIR": str(tmp_path / "state"),
                "CANARYFLOW_KUBERNETES__KUBECONFIG": str(kube_api.kubeconfig),
                "CANARYFLOW_KUBERNETES__NAMESPACE": namespace})
    done = subprocess.run([str(Path(sys.executable).parent / "canaryflow"), "k8s", "init"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"- Role {namespace}/canaryflow-release: applied" in done.stdout
    assert f"- Secret {namespace}/canaryflow-seal-key: created with a random seal_key" in done.stdout
    seal_key = _secret(admin, namespace, pipeline.SEAL_SECRET, pipeline.SEAL_SECRET_KEY)
    assert seal_key not in done.stdout + done.stderr
