"""The kubernetes platform behind the release's interfaces, on a real kube-apiserver: Services built from settings
(platform=kubernetes) give KubernetesBackend + GatewayApiRouter, and the release's own converge() serves a version,
ramps a canary (its HPA following its share) and promotes it; `canaryflow k8s status` reports it.

No kubelet and no controllers run here: a thread stands in for them and reports every Deployment Available once
the API server has stored it (its status subresource, patched as the deployment controller would)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from canaryflow.core.paths import StatePaths
from canaryflow.core.settings import Settings
from canaryflow.core.state import Route
from canaryflow.release import cluster
from canaryflow.release.converge import converge
from canaryflow.services import Services
from deployments.kubernetes import objects as o
from deployments.kubernetes.gateway import GatewayApiRouter
from deployments.prometheus import PrometheusMetricsSource
from tests.kubeapi import cluster_services

pytestmark = [pytest.mark.integration, pytest.mark.kube]
MODEL = "churn"


@pytest.fixture
def svc(kube_api: Any, tmp_path: Path) -> Iterator[Services]:
    from kubernetes import client, config

    namespace = f"platform-{uuid.uuid4().hex[:6]}"
    settings = Settings(platform="kubernetes", state_dir=tmp_path / "state",
                        kubernetes={"kubeconfig": str(kube_api.kubeconfig), "namespace": namespace,
                                    "gpus_per_pod": 0, "rollout_timeout_s": 30})
    api = config.new_client_from_config(str(kube_api.kubeconfig))
    client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
    with cluster_services(settings, api, MODEL) as services:
        yield services


def _hpa_min(svc: Services, version: str) -> int:
    from kubernetes import client

    hpa = client.AutoscalingV2Api(svc.backend.api).read_namespaced_horizontal_pod_autoscaler(
        o.object_name(MODEL, version), svc.settings.kubernetes.namespace)
    return hpa.spec.min_replicas


def test_the_release_interfaces_serve_ramp_and_promote_on_a_cluster(svc: Services) -> None:
    # the platform's choices, built from settings (only the backend was given: its archive source is a stub)
    assert isinstance(svc.router, GatewayApiRouter) and isinstance(svc.metrics, PrometheusMetricsSource)
    assert svc.backend.healthy()

    changes = converge(svc, MODEL, Route("1"))
    assert svc.backend.versions(MODEL) == ["1"] and svc.router.route(MODEL) == Route("1")
    assert any("re-registered" in line for line in changes)

    converge(svc, MODEL, Route("1", "2", 25.0))  # the ramp's step: canary registered, 25 % of traffic
    assert svc.router.route(MODEL) == Route("1", "2", 25.0)
    assert _hpa_min(svc, "2") == 1 and _hpa_min(svc, "1") == svc.settings.kubernetes.hpa.min_replicas
    rows = {r["model"]: r for r in cluster.status(svc)}[MODEL]
    assert [(v["version"], v["weight"], v["ready"]) for v in rows["versions"]] == [("1", 75.0, 2), ("2", 25.0, 2)]
    assert rows["default"] == "1"

    converge(svc, MODEL, Route("2"))  # promoted: all traffic, full replica bounds
    assert svc.router.route(MODEL) == Route("2") and svc.backend.default_version(MODEL) == "2"
    assert _hpa_min(svc, "2") == svc.settings.kubernetes.hpa.min_replicas
    svc.backend.unregister(MODEL, "1")  # what the ramp does after retire_grace_s
    assert svc.backend.versions(MODEL) == ["2"]
    assert [v["version"] for v in cluster.status(svc)[0]["versions"]] == ["2"]


def test_the_cluster_commands_refuse_the_local_platform(tmp_path: Path) -> None:
    from canaryflow.core.errors import ConfigError

    with pytest.raises(ConfigError, match="CANARYFLOW_PLATFORM=kubernetes"):
        cluster.status(Services(Settings(state_dir=tmp_path)))


def test_canaryflow_k8s_status_reads_the_cluster(svc: Services) -> None:
    """The CLI command, as a user runs it: settings from the environment, the HTTPRoutes and Deployments read
    back from the API server."""
    import json
    import os
    import subprocess
    import sys

    converge(svc, MODEL, Route("1"))
    k = svc.settings.kubernetes
    env = {key: value for key, value in os.environ.items() if not key.startswith("CANARYFLOW_")}
    env.update({"CANARYFLOW_PLATFORM": "kubernetes", "CANARYFLOW_STATE_DIR": str(svc.settings.state_dir),
                "CANARYFLOW_KUBERNETES__KUBECONFIG": str(k.kubeconfig), "CANARYFLOW_KUBERNETES__NAMESPACE":
                k.namespace})
    done = subprocess.run([str(Path(sys.executable).parent / "canaryflow"), "k8s", "status", "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert [(r["model"], r["default"], [(v["version"], v["weight"], v["ready"]) for v in r["versions"]])
            for r in rows] == [(MODEL, "1", [("1", 100.0, 2)])]


def test_the_bridges_canary_metrics_read_the_httproutes(svc: Services) -> None:
    """On Kubernetes the canary series (alert CanaryflowCanaryStuck, the dashboard's weight panel) come from the
    HTTPRoutes the API server holds, not from a local routes.json; the last change from canaryflow's last write."""
    from prometheus_client.parser import text_string_to_metric_families
    from starlette.testclient import TestClient

    from canaryflow.intake.bridge import create_app

    class NoLauncher:
        def launch(self, *args: Any, **kwargs: Any) -> None:
            raise AssertionError("no webhook in this test")

    converge(svc, MODEL, Route("1"))
    before = time.time() - 2  # managedFields times have whole seconds
    converge(svc, MODEL, Route("1", "2", 25.0))
    app = create_app(svc.settings, launcher=NoLauncher(), secret="s" * 32, feedback_token="t" * 32)
    with TestClient(app) as http:
        answer = http.get("/metrics")
    assert answer.status_code == 200, answer.text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(answer.text) for s in family.samples}
    assert samples[("canaryflow_canary_weight", (("model", MODEL), ("version", "2")))] == 25.0
    assert samples[("canaryflow_canary_phase", (("model", MODEL), ("phase", "progressing"), ("version", "2")))] == 1
    assert before <= samples[("canaryflow_canary_last_change_timestamp_seconds", (("model", MODEL),))] <= time.time()
    assert not StatePaths(svc.settings.state_dir).router_state.exists()  # nothing local was read or written
