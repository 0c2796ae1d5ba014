"""serving_manifests/: both overlays render with `kubectl kustomize`, pass `kubernetes-validate --strict` for
Kubernetes 1.30, and are accepted by a real kube-apiserver (`kubectl apply --server-side --dry-run=server`)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OVERLAYS = ROOT / "serving_manifests" / "overlays"
KUBERNETES_VERSION = "1.30.0"  # stated in serving_manifests/README.md


def render(overlay: str, tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    out = subprocess.run([str(BIN / "kubectl"), "kustomize", str(OVERLAYS / overlay)], capture_output=True,
                         text=True, check=True, timeout=60)
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(out.stdout)
    return path, [d for d in yaml.safe_load_all(out.stdout) if d]


def torchserve(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    dep = next(d for d in docs if d["kind"] == "Deployment")
    spec = dep["spec"]["template"]["spec"]
    return spec, next(c for c in spec["containers"] if c["name"] == "torchserve")


@pytest.mark.integration
@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlay_renders_and_validates_strictly(overlay: str, tmp_path: Path) -> None:
    path, docs = render(overlay, tmp_path)
    # one served version + the monitoring component (alert and recording rules, dashboard: two ConfigMaps)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "ConfigMap", "ConfigMap", "Deployment",
                                               "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget",
                                               "Service"]
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"} >= {
        "canaryflow-prometheus-rules", "canaryflow-grafana-dashboard"}
    done = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == 8
    spec, ts = torchserve(docs)
    config = next(d["data"]["config.properties"] for d in docs if "config.properties" in d.get("data", {}))
    if overlay == "gpu":
        assert ts["resources"]["limits"] == {"memory": "4Gi", "nvidia.com/gpu": "1"}
        assert ts["image"].endswith("-gpu") and "number_of_gpu=1\n" in config
        assert spec["tolerations"][0]["key"] == "nvidia.com/gpu" and spec["nodeSelector"]
    else:
        assert "nvidia.com/gpu" not in ts["resources"]["limits"] and "tolerations" not in spec
        assert ts["image"].endswith("-cpu") and "number_of_gpu=0\n" in config


@pytest.mark.kube
@pytest.mark.integration
@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlay_is_accepted_by_the_api_server(overlay: str, tmp_path: Path, kube_api: Any) -> None:
    namespace = f"manifests-{uuid.uuid4().hex[:6]}"
    kubectl = [str(BIN / "kubectl"), "--kubeconfig", str(kube_api.kubeconfig)]
    subprocess.run([*kubectl, "create", "namespace", namespace], check=True, capture_output=True, timeout=30)
    path, _ = render(overlay, tmp_path)
    done = subprocess.run([*kubectl, "apply", "--server-side", "--dry-run=server", "--field-manager", "canaryflow",
                           "-n", namespace, "-f", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("serverside-applied (server dry run)") == 8, done.stdout


@pytest.mark.kube
@pytest.mark.integration
def test_the_pipeline_objects_validate_and_are_accepted(tmp_path: Path, kube_api: Any) -> None:
    """serving_manifests/pipeline: the flow runs' ServiceAccount, Role and RoleBinding (what `canaryflow k8s init`
    applies), strictly valid and accepted by the API server with RBAC on."""
    out = subprocess.run([str(BIN / "kubectl"), "kustomize", str(ROOT / "serving_manifests" / "pipeline")],
                         capture_output=True, text=True, check=True, timeout=60)
    path = tmp_path / "pipeline.yaml"
    path.write_text(out.stdout)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert [d["kind"] for d in docs] == ["ServiceAccount", "Role", "RoleBinding"]
    assert all(d["metadata"]["namespace"] == "canaryflow" for d in docs)
    done = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.count("passed") == 3, done.stdout + done.stderr
    kubectl = [str(BIN / "kubectl"), "--kubeconfig", str(kube_api.kubeconfig)]
    namespace = subprocess.run([*kubectl, "create", "namespace", "canaryflow", "--dry-run=client", "-o", "yaml"],
                               capture_output=True, text=True, check=True, timeout=30).stdout
    subprocess.run([*kubectl, "apply", "--server-side", "-f", "-"], input=namespace, capture_output=True, text=True,
                   check=True, timeout=30)
    done = subprocess.run([*kubectl, "apply", "--server-side", "--dry-run=server", "--field-manager", "canaryflow",
                           "-f", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("serverside-applied (server dry run)") == 3, done.stdout
