"""The flows can run on a Kubernetes work pool: our base job template (deployments/templates/
prefect-kubernetes-job-template.json) is accepted by the real Prefect server as a `kubernetes` pool, and the Job
that prefect-kubernetes' worker code builds from it for a release run is accepted by a real kube-apiserver
(server-side dry run). No kubelet here: the Job never runs, so the flow inside it has never run on a cluster."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.kube]
TEMPLATE = Path(__file__).resolve().parents[2] / "deployments" / "templates" / "prefect-kubernetes-job-template.json"
POOL = "canaryflow-k8s-test"


def _job_manifest(image: str) -> dict:
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(TEMPLATE.read_text())
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, {"image": image}))
    run = FlowRun(id=uuid.uuid4(), name="release-iris-v3", flow_id=uuid.uuid4(),
                  parameters={"model_name": "iris", "version": "3"})
    config.prepare_for_flow_run(run)
    return config.job_manifest


def test_the_template_is_a_kubernetes_pool_on_the_real_prefect_server(stack) -> None:
    prefect = str(Path(sys.executable).parent / "prefect")
    env = {"PREFECT_API_URL": stack.settings.prefect_api_url, "PATH": str(Path(sys.executable).parent)}
    done = subprocess.run([prefect, "work-pool", "create", POOL, "--type", "kubernetes", "--base-job-template",
                           str(TEMPLATE), "--overwrite"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    pool = httpx.get(f"{stack.settings.prefect_api_url}/work_pools/{POOL}", timeout=10).json()
    assert pool["type"] == "kubernetes"
    defaults = pool["base_job_template"]["variables"]["properties"]
    assert defaults["env"]["default"]["CANARYFLOW_PLATFORM"] == "kubernetes"
    assert defaults["backoff_limit"]["default"] == 0
    httpx.delete(f"{stack.settings.prefect_api_url}/work_pools/{POOL}", timeout=10)


def test_the_job_the_worker_builds_is_accepted_by_a_real_api_server(stack, kube_api) -> None:
    from kubernetes import config, dynamic
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Prefect's worker code resolves template references through the API: the stack's server, not a temporary one.
    # A settings context, not the environment: a context left by an earlier prefect_test_harness in this process
    # would hide an environment variable, and the client would start a temporary server of its own.
    with temporary_settings(updates={PREFECT_API_URL: stack.settings.prefect_api_url}):
        manifest = _job_manifest("registry.example.com/canaryflow:1.0")
    spec = manifest["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {e["name"]: e["value"] for e in container["env"] if "value" in e}["CANARYFLOW_PLATFORM"] == "kubernetes"
    assert manifest["spec"]["backoffLimit"] == 0
    assert container["args"] == ["prefect", "flow-run", "execute"]  # the run's id comes in PREFECT__FLOW_RUN_ID

    api = config.new_client_from_config(str(kube_api.kubeconfig))
    dyn = dynamic.DynamicClient(api)
    namespace = manifest["metadata"]["namespace"]
    dyn.resources.get(api_version="v1", kind="Namespace").server_side_apply(
        body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}, field_manager="test")
    jobs = dyn.resources.get(api_version="batch/v1", kind="Job")
    created = jobs.create(body=manifest, namespace=namespace, dry_run="All")
    assert created.metadata.name.startswith(manifest["metadata"]["generateName"])
    # the API server defaulted and validated it: the pod template kept our hardening
    pod = created.spec.template.spec
    assert pod.containers[0].securityContext.capabilities.drop == ["ALL"]
    assert {v.name for v in pod.volumes} >= {"tmp", "state", "seal-key"}
    # every flow run seals with the one key of the namespace (a Secret, read-only), not a key of its own emptyDir
    from deployments.kubernetes import pipeline

    seal = next(v for v in pod.volumes if v.name == "seal-key").secret
    assert (seal.secretName, seal.defaultMode) == (pipeline.SEAL_SECRET, 0o400)
    mount = next(m for m in pod.containers[0].volumeMounts if m.name == "seal-key")
    assert mount.readOnly and mount.mountPath == pipeline.SEAL_MOUNT
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CANARYFLOW_SEAL_KEY_FILE"] == f"{pipeline.SEAL_MOUNT}/{seal.items[0].path}"
    assert spec["serviceAccountName"] == pipeline.SERVICE_ACCOUNT
