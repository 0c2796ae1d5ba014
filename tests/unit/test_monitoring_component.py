"""The monitoring kustomize Component (serving_manifests/components/monitoring): rendered offline with
``kubectl kustomize`` from a throwaway overlay, as an overlay includes it, and validated with
``kubernetes-validate --strict``; its ConfigMaps carry the rule file and the dashboard byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPONENT = ROOT / "serving_manifests" / "components" / "monitoring"
BIN = ROOT / ".venv" / "bin"
# The oldest and newest schemas kubernetes-validate has (the test API server is v1.24; ConfigMap is v1 in all).
KUBERNETES_VERSIONS = ("1.25.0", "1.37.0")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    overlay = tmp_path_factory.mktemp("overlay")
    # kustomize takes only relative paths to components
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "canaryflow",
        "components": [os.path.relpath(COMPONENT, overlay)]}))
    done = subprocess.run([str(BIN / "kubectl"), "kustomize", str(overlay)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    out = overlay / "rendered.yaml"
    out.write_text(done.stdout)
    return out, [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def test_it_is_a_component() -> None:
    kustomization = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Component"
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"


def test_the_configmaps_carry_the_files(rendered: tuple[Path, list[dict]]) -> None:
    objects = {(o["kind"], o["metadata"]["name"]): o for o in rendered[1]}
    assert set(objects) == {("ConfigMap", "canaryflow-prometheus-rules"), ("ConfigMap", "canaryflow-grafana-dashboard")}
    rules = objects[("ConfigMap", "canaryflow-prometheus-rules")]
    assert rules["data"] == {name: (COMPONENT / name).read_text()
                             for name in ("canaryflow-rules.yaml", "canaryflow-recording-rules.yaml")}
    board = objects[("ConfigMap", "canaryflow-grafana-dashboard")]
    dashboard = json.loads((COMPONENT / "grafana-dashboard.json").read_text())
    assert json.loads(board["data"]["canaryflow.json"]) == dashboard
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"  # what the Grafana sidecar looks for
    for obj in objects.values():
        assert obj["metadata"]["namespace"] == "canaryflow"  # the overlay's namespace applies


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_validate_strict(rendered: tuple[Path, list[dict]], version: str) -> None:
    done = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", version, str(rendered[0])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == 2, done.stdout
