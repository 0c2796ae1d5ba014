"""The pure Kubernetes builders (deployments/kubernetes/objects.py, pod.py, manifests.py): names from hostile
model names, GPU vs CPU pods, HPA defaults, the canary's share bounds, NetworkPolicy peers, and the checked-in
serving_manifests/ matching what the builders render."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from canaryflow.core.settings import HpaSettings, KubernetesSettings, Settings
from deployments.kubernetes import manifests, pod
from deployments.kubernetes import objects as o

ROOT = Path(__file__).resolve().parents[2]
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
REF = o.ArchiveRef("iris", "3", "https://mlflow.example/a/iris_v3.mar", "ab" * 32)


def settings(**kube: object) -> Settings:
    return Settings.model_construct(kubernetes=KubernetesSettings(**kube))


def objects_by_kind(s: Settings, ref: o.ArchiveRef = REF) -> dict[str, dict]:
    return {obj["kind"]: obj for obj in pod.version_objects(s, ref, "serving")}


@pytest.mark.parametrize("model", ["iris", "Iris", "a" * 64, "x.y_z-", "9lives", "my_model.v2", "A-B", "a--b"])
def test_names_are_dns_labels_and_distinct_for_hostile_model_names(model: str) -> None:
    name = o.object_name(model, "12")
    assert DNS_1035.match(name) and len(name) <= 63
    assert LABEL.match(o.label_value(model)) and len(o.label_value(model)) <= 63
    assert DNS_1035.match(o.state_name(model)) and len(o.state_name(model)) <= 63
    if name != f"ts-{model}-v12":  # changed -> hashed, so e.g. "Iris" and "iris" never share objects
        assert re.search(r"-[0-9a-f]{8}$", name)


def test_names_that_would_collide_after_cleaning_differ() -> None:
    assert o.object_name("Iris", "1") != o.object_name("iris", "1")
    assert o.object_name("a.b", "1") != o.object_name("a-b", "1") != o.object_name("a_b", "1")
    assert o.object_name("a" * 64, "1") != o.object_name("a" * 63, "1")
    assert o.object_name("iris", "1") == "ts-iris-v1"  # a clean name stays readable


def test_every_object_carries_the_labels_and_exact_names() -> None:
    for obj in objects_by_kind(settings()).values():
        meta = obj["metadata"]
        assert meta["name"] == "ts-iris-v3" and meta["namespace"] == "serving"
        assert meta["labels"] == {"app.kubernetes.io/name": "torchserve", "app.kubernetes.io/part-of": "canaryflow",
                                  "canaryflow.io/model": "iris", "canaryflow.io/version": "3"}
        assert meta["annotations"][o.MODEL_ANNOTATION] == "iris"
        assert meta["annotations"][o.VERSION_ANNOTATION] == "3"


def test_config_keeps_token_auth_loopback_and_the_one_archive() -> None:
    props = dict(line.split("=", 1) for line in
                 o.config_properties(settings(gpus_per_pod=2), "iris", "3").splitlines())
    assert "disable_token_authorization" not in props and "disable_token_auth" not in props
    assert props["inference_address"] == "http://127.0.0.1:18080"
    assert props["management_address"] == "http://127.0.0.1:18081"
    assert props["enable_model_api"] == "false" and props["metrics_mode"] == "prometheus"
    assert props["allowed_urls"] == "file:///model-store/.*" and props["load_models"] == "iris_v3.mar"
    assert props["number_of_gpu"] == "2" and props["default_workers_per_model"] == "1"


def test_torchserve_logs_to_stdout_at_the_local_stacks_levels() -> None:
    """A pod's log is its stdout and its root filesystem read-only: the local stack's logger levels (nothing per
    request), one Console appender, and TorchServe pointed at it."""
    import xml.etree.ElementTree as ET

    def loggers(root: ET.Element) -> list[tuple[str | None, str | None]]:
        return [(e.get("name"), e.get("level")) for e in root.iterfind("Loggers/*")]

    local, console = ET.fromstring(pod.LOG4J_FILE.read_text()), ET.fromstring(pod.log4j_console())
    assert loggers(console) == loggers(local) and ("org.pytorch.serve.wlm.WorkerThread", "warn") in loggers(local)
    assert [(a.tag, a.get("target")) for a in console.iterfind("Appenders/*")] == [("Console", "SYSTEM_OUT")]
    assert {r.get("ref") for r in console.iter("AppenderRef")} == {"console"}
    config_map = objects_by_kind(settings())["ConfigMap"]
    assert config_map["data"]["log4j2.xml"] == pod.log4j_console()
    props = dict(line.split("=", 1) for line in config_map["data"]["config.properties"].splitlines())
    assert "-Dlog4j.configurationFile=file:///config/log4j2.xml" in props["vmargs"].split()
    assert {"-Xms512m", "-Xmx512m"} <= set(props["vmargs"].split())  # a fixed heap: see ServingSettings.jvm_options


def test_gpu_pod_gets_the_gpu_limit_and_placement_from_settings() -> None:
    tol = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    s = settings(gpus_per_pod=2, tolerations=tol, node_selector={"gpu": "a100"},
                 affinity={"nodeAffinity": {}})
    spec = objects_by_kind(s)["Deployment"]["spec"]["template"]["spec"]
    ts = next(c for c in spec["containers"] if c["name"] == "torchserve")
    assert ts["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert spec["tolerations"] == tol and spec["nodeSelector"] == {"gpu": "a100"}
    assert spec["affinity"] == {"nodeAffinity": {}}


def test_cpu_pod_has_no_gpu_anything() -> None:
    dep = objects_by_kind(settings(gpus_per_pod=0))["Deployment"]
    spec = dep["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(dep) and "tolerations" not in spec and "nodeSelector" not in spec


def test_pod_is_hardened_and_probed_through_the_proxy() -> None:
    dep = objects_by_kind(settings())["Deployment"]
    spec = dep["spec"]["template"]["spec"]
    assert "replicas" not in dep["spec"]  # the HPA owns it
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == pod.UID
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec["containers"] + spec["initContainers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        assert sc["capabilities"] == {"drop": ["ALL"]}
    proxy = next(c for c in spec["containers"] if c["name"] == "keyproxy")
    assert {p["name"]: p["containerPort"] for p in proxy["ports"]} == {"inference": 8080, "metrics": 8082}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert proxy[probe]["httpGet"] == {"path": "/ping", "port": "inference"}
    ts = next(c for c in spec["containers"] if c["name"] == "torchserve")
    assert "ports" not in ts  # nothing of TorchServe's is a pod port; management stays on loopback
    fetch = spec["initContainers"][0]
    env = {e["name"]: e["value"] for e in fetch["env"]}
    assert env["ARCHIVE_SHA256"] == REF.sha256 and env["ARCHIVE_URL"] == REF.url


def test_mlflow_secret_is_referenced_by_name_only() -> None:
    dep = pod.deployment(settings(), REF, "serving", mlflow_auth_secret="mlflow-auth")
    fetch = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert fetch["envFrom"] == [{"secretRef": {"name": "mlflow-auth"}}]


def test_hpa_defaults_follow_the_serving_guides() -> None:
    hpa = objects_by_kind(settings())["HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    targets = {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in hpa["metrics"]}
    assert targets == {"cpu": 70, "memory": 80}
    assert hpa["behavior"]["scaleUp"]["policies"] == [{"type": "Percent", "value": 100, "periodSeconds": 15}]
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300


def test_hpa_adds_the_request_rate_metric_when_set() -> None:
    s = settings(hpa=HpaSettings(requests_per_pod=12.5, requests_metric="rps"))
    pods = objects_by_kind(s)["HorizontalPodAutoscaler"]["spec"]["metrics"][-1]
    assert pods == {"type": "Pods", "pods": {"metric": {"name": "rps"},
                                             "target": {"type": "AverageValue", "averageValue": "12500m"}}}


@pytest.mark.parametrize(("percent", "bounds"), [(0, (1, 1)), (5, (1, 1)), (25, (1, 3)), (50, (1, 5)),
                                                 (75, (2, 8)), (100, (2, 10))])
def test_canary_replicas_follow_its_traffic_share(percent: float, bounds: tuple[int, int]) -> None:
    assert o.share_bounds(HpaSettings(), percent) == bounds


def test_network_policy_peers() -> None:
    s = settings(gateway_namespace="gw", monitoring_namespace="mon")
    rules = objects_by_kind(s)["NetworkPolicy"]["spec"]["ingress"]
    assert rules[0]["ports"] == [{"protocol": "TCP", "port": "inference"}]
    assert rules[0]["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}},
                                 "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gw"}}}]
    assert rules[1]["ports"] == [{"protocol": "TCP", "port": "metrics"}]
    assert rules[1]["from"][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}
    same = objects_by_kind(settings())["NetworkPolicy"]["spec"]["ingress"]
    assert "namespaceSelector" not in same[0]["from"][0]  # the gateway in our own namespace
    assert same[1]["from"][0]["namespaceSelector"] == {}  # Prometheus in any namespace
    assert len(same) == 2  # nothing else may connect


def test_pdb_allows_one_eviction_at_a_time() -> None:
    pdb = objects_by_kind(settings())["PodDisruptionBudget"]["spec"]
    assert pdb == {"maxUnavailable": 1, "selector": {"matchLabels": o.selector("iris", "3")}}


def test_checked_in_manifests_match_the_builders() -> None:
    """serving_manifests/ is generated: regenerate with `python -m deployments.kubernetes.manifests
    serving_manifests` after changing the builders."""
    for rel, text in manifests.render().items():
        assert (ROOT / "serving_manifests" / rel).read_text() == text, f"{rel} is stale"
    generated = {ROOT / "serving_manifests" / rel for rel in manifests.render()}
    for folder in ("base", "overlays", "pipeline"):
        extra = [p for p in (ROOT / "serving_manifests" / folder).rglob("*.yaml") if p not in generated]
        assert extra == [], "hand-written files in a generated folder"


@pytest.mark.parametrize("pretty", [True, False])
def test_keyproxy_reads_the_inference_key(tmp_path: Path, pretty: bool) -> None:
    keys = {"management": ("m4NaGe", "2026-12-06T13:00:00Z"), "inference": ("Inf3r_nc-e", "2026-12-06T13:00:00Z"),
            "API": ("ApiKey1", None)}
    parts = []
    for name, (key, exp) in keys.items():
        body = f'"key": "{key}"' + (f', "expiration time": "{exp}"' if exp else "")
        parts.append(f'"{name}": {{{body}}}')
    text = ("{\n  " + ",\n  ".join(parts) + "\n}\n") if pretty else "{" + ",".join(parts) + "}"
    (tmp_path / "key_file.json").write_text(text)
    script = tmp_path / "keyproxy.sh"
    script.write_text(pod.config_data(settings(), "iris", "3")["keyproxy.sh"].replace("/keys/", f"{tmp_path}/"))
    for name, (key, _) in keys.items():
        out = subprocess.run(["sh", str(script), "key", name], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == key
