"""GatewayApiRouter against a real kube-apiserver with the Gateway API v1.6.1 standard CRDs (fixture ``kube_api``):
every change is one server-side apply that updates the HTTPRoute in place, the server's schema and CEL rules and
field-manager conflicts surface as typed errors, and the routes read back from the server. No Gateway
implementation runs here: which rule a request would take is checked with gateway_route.rule_for on the object the
server stored."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, config

from canaryflow.core.errors import ConfigError, ServingError
from canaryflow.core.settings import Settings
from canaryflow.core.state import Route
from deployments.kubernetes import gateway_route as gr
from deployments.kubernetes.gateway import GatewayApiRouter, SecretPinKey

pytestmark = [pytest.mark.kube, pytest.mark.integration]
KEY = "test-pin-key"
_namespaces = itertools.count()


def service(model: str, version: str) -> str:
    """One Service per version, as the backend names them (hashed when the model name is not a DNS label)."""
    plain = model if gr._DNS_LABEL.match(model) else hashlib.sha256(model.encode()).hexdigest()[:12]
    return f"ts-{plain}-v{version}"


@pytest.fixture(scope="module")
def api(kube_api: Any) -> client.ApiClient:
    return config.new_client_from_config(str(kube_api.kubeconfig))


@pytest.fixture
def namespace(api: client.ApiClient) -> Iterator[str]:
    """A namespace of this test's own (deleted after; without a controller manager it stays Terminating)."""
    name = f"gw-router-{next(_namespaces)}"
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


def make_router(api: client.ApiClient, namespace: str, key: str = KEY, **k8s: Any) -> GatewayApiRouter:
    settings = Settings(kubernetes={"namespace": namespace, "gateway_name": "canaryflow", **k8s})
    return GatewayApiRouter(settings, service, api=api, pin_key_provider=lambda: key)


def stored(api: client.ApiClient, namespace: str, model: str) -> dict[str, Any]:
    return client.CustomObjectsApi(api).get_namespaced_custom_object(
        gr.GROUP, gr.VERSION, namespace, gr.PLURAL, gr.object_name(model))


def httproutes(api: client.ApiClient, namespace: str) -> list[str]:
    listed = client.CustomObjectsApi(api).list_namespaced_custom_object(gr.GROUP, gr.VERSION, namespace, gr.PLURAL)
    return [item["metadata"]["name"] for item in listed["items"]]


def traffic_weights(obj: dict[str, Any]) -> dict[str, int]:
    (rule,) = [r for r in obj["spec"]["rules"] if r["name"] == gr.TRAFFIC_RULE]
    return {ref["name"]: ref["weight"] for ref in rule["backendRefs"]}


def test_weight_changes_update_the_same_httproute_in_place(api: client.ApiClient, namespace: str) -> None:
    router = make_router(api, namespace)
    router.set_route("iris", "1")
    first = stored(api, namespace, "iris")["metadata"]
    uid, versions = first["uid"], [first["resourceVersion"]]
    assert router.route("iris") == Route("1")
    for weight in (5, 25, 50, 100):
        router.set_split("iris", "1", "2", weight)
        obj = stored(api, namespace, "iris")
        assert obj["metadata"]["uid"] == uid  # never deleted and created again
        versions.append(obj["metadata"]["resourceVersion"])
        assert traffic_weights(obj) == {"ts-iris-v1": 10_000 - weight * 100, "ts-iris-v2": weight * 100}
        assert router.route("iris") == Route("1", "2", float(weight))
    router.clear_canary("iris")
    obj = stored(api, namespace, "iris")
    assert obj["metadata"]["uid"] == uid and traffic_weights(obj) == {"ts-iris-v1": 10_000}
    versions.append(obj["metadata"]["resourceVersion"])
    assert len(set(versions)) == len(versions) == 6
    assert router.route("iris") == Route("1")
    # our field manager owns the spec: the next apply is ours alone
    managers = {entry["manager"] for entry in obj["metadata"]["managedFields"]}
    assert managers == {"canaryflow"}


def test_server_refusal_is_a_serving_error_and_the_route_stays(api: client.ApiClient, namespace: str) -> None:
    make_router(api, namespace).set_split("iris", "1", "2", 5)
    before = stored(api, namespace, "iris")["metadata"]["resourceVersion"]
    # a hostname the CRD's pattern refuses: only the server knows (settings do not check it)
    bad = make_router(api, namespace, hostnames=["Not_A.Host"])
    with pytest.raises(ServingError, match=r"\[dry run\]: HTTP 422 .*hostnames"):
        bad.set_split("iris", "1", "2", 25)
    assert stored(api, namespace, "iris")["metadata"]["resourceVersion"] == before
    assert make_router(api, namespace).route("iris") == Route("1", "2", 5.0)


def test_shadow_is_a_request_mirror_to_the_canary(api: client.ApiClient, namespace: str) -> None:
    router = make_router(api, namespace)
    router.set_split("iris", "3", "4", 10, shadow=True)
    obj = stored(api, namespace, "iris")
    (rule,) = [r for r in obj["spec"]["rules"] if r["name"] == gr.TRAFFIC_RULE]
    mirrors = [f["requestMirror"] for f in rule["filters"] if f["type"] == "RequestMirror"]
    assert [m["backendRef"]["name"] for m in mirrors] == ["ts-iris-v4"]
    assert traffic_weights(obj) == {"ts-iris-v3": 10_000}
    assert router.route("iris") == Route("3", "4", 10.0, True)
    router.set_split("iris", "3", "4", 10)  # shadow -> live split: the mirror is gone
    (rule,) = [r for r in stored(api, namespace, "iris")["spec"]["rules"] if r["name"] == gr.TRAFFIC_RULE]
    assert not [f for f in rule["filters"] if f["type"] == "RequestMirror"]


def test_pins_need_the_pipelines_pin_key(api: client.ApiClient, namespace: str) -> None:
    router = make_router(api, namespace)
    router.set_split("iris", "1", "2", 5)
    obj = stored(api, namespace, "iris")
    creds = router.pin_credentials()
    assert creds == {"X-Canaryflow-Pin-Key": KEY}
    assert gr.rule_for(obj, "/predictions/iris", {"X-Model-Version": "2", **creds}) == "pin-canary"
    assert gr.rule_for(obj, "/predictions/iris", {"X-Model-Version": "1", **creds}) == "pin-stable"
    assert gr.rule_for(obj, "/predictions/iris", {"X-Model-Version": "2"}) == "traffic"
    assert gr.rule_for(obj, "/predictions/iris", {"X-Model-Version": "2", "X-Canaryflow-Pin-Key": "x"}) == "traffic"
    assert gr.rule_for(obj, "/predictions/iris/2", {"X-Model-Version": "2", **creds}) is None
    # a new pin key goes live with refresh; the old one stops pinning
    new = make_router(api, namespace, key="rotated-key")
    assert new.credentials_stale() is False
    new.refresh()
    obj = stored(api, namespace, "iris")
    assert gr.rule_for(obj, "/predictions/iris", {"X-Model-Version": "2", **creds}) == "traffic"
    assert gr.rule_for(obj, "/predictions/iris", {"X-Model-Version": "2", **new.pin_credentials()}) == "pin-canary"


def test_routes_round_trip_and_remove_deletes(api: client.ApiClient, namespace: str) -> None:
    router = make_router(api, namespace)
    assert router.routes() == {} and router.route("iris") is None
    router.set_route("iris", "1")
    router.set_split("Wine_Quality.v2", "3", "4", 12.34)
    router.set_split("cats", "5", "6", 0, shadow=True)
    assert router.routes() == {
        "Wine_Quality.v2": {"stable": "3", "canary": "4", "weight": 12.34, "shadow": False},
        "cats": {"stable": "5", "canary": "6", "weight": 0.0, "shadow": True},
        "iris": {"stable": "1"},
    }
    assert router.route("Wine_Quality.v2") == Route("3", "4", 12.34)
    router.remove_route("iris")
    assert gr.object_name("iris") not in httproutes(api, namespace)
    assert router.route("iris") is None and set(router.routes()) == {"Wine_Quality.v2", "cats"}
    router.remove_route("iris")  # a no-op now
    router.clear_canary("iris")  # a no-op without a route


def test_hostile_model_names(api: client.ApiClient, namespace: str) -> None:
    router = make_router(api, namespace)
    for hostile in ("iris?", "a/b", "x" * 65, "../etc"):
        with pytest.raises(ServingError, match="not allowed|does not match"):
            router.set_route(hostile, "1")
    assert httproutes(api, namespace) == []  # refused before anything was sent
    long = "Model_" + "x" * 58  # 64 characters: allowed, but no DNS label
    router.set_split(long, "1", "2", 50)
    (name,) = httproutes(api, namespace)
    assert name == gr.object_name(long) and len(name) <= 63 and name != long
    assert router.route(long) == Route("1", "2", 50.0) and list(router.routes()) == [long]


def test_a_field_owned_by_another_manager_is_a_conflict_naming_it(api: client.ApiClient, namespace: str) -> None:
    router = make_router(api, namespace)
    router.set_split("iris", "1", "2", 5)
    theirs = stored(api, namespace, "iris")
    body = {"apiVersion": theirs["apiVersion"], "kind": theirs["kind"],
            "metadata": {"name": theirs["metadata"]["name"]},
            "spec": {"parentRefs": theirs["spec"]["parentRefs"], "rules": theirs["spec"]["rules"]}}
    body["spec"]["rules"][-1]["backendRefs"][0]["weight"] = 1  # someone moves traffic by hand
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        gr.GROUP, gr.VERSION, namespace, gr.PLURAL, theirs["metadata"]["name"], body, field_manager="kubectl-edit",
        force=True, _content_type="application/apply-patch+yaml")
    with pytest.raises(ServingError, match=r'field manager conflict with kubectl-edit'):
        router.set_split("iris", "1", "2", 25)
    assert traffic_weights(stored(api, namespace, "iris"))["ts-iris-v1"] == 1  # nothing of ours went through


def test_session_persistence_needs_the_experimental_crd(api: client.ApiClient, namespace: str) -> None:
    make_router(api, namespace).set_split("iris", "1", "2", 5)
    sticky = make_router(api, namespace, session_persistence=True)
    with pytest.raises(ServingError, match="experimental channel"):
        sticky.set_split("iris", "1", "2", 25)
    assert make_router(api, namespace).route("iris") == Route("1", "2", 5.0)
    sticky.set_route("iris", "2")  # no split, no sessionPersistence: the standard CRD takes it
    assert sticky.route("iris") == Route("2")


def test_default_pin_key_lives_in_a_secret(api: client.ApiClient, namespace: str) -> None:
    settings = Settings(kubernetes={"namespace": namespace})
    first = GatewayApiRouter(settings, service, api=api)
    key = first.pin_credentials()["X-Canaryflow-Pin-Key"]
    assert len(key) >= 32
    assert GatewayApiRouter(settings, service, api=api).pin_credentials()["X-Canaryflow-Pin-Key"] == key
    assert SecretPinKey(api, namespace)() == key
    first.set_route("iris", "1")
    obj = stored(api, namespace, "iris")
    assert gr.rule_for(obj, "/predictions/iris", {"X-Model-Version": "1", "X-Canaryflow-Pin-Key": key}) == "pin-stable"


def test_client_built_from_the_settings_kubeconfig(kube_api: Any, namespace: str) -> None:
    settings = Settings(kubernetes={"namespace": namespace, "kubeconfig": str(kube_api.kubeconfig)})
    router = GatewayApiRouter(settings, service, pin_key_provider=lambda: KEY)
    router.set_route("iris", "1")
    assert router.route("iris") == Route("1")
    missing = Settings(kubernetes={"namespace": namespace, "kubeconfig": str(kube_api.kubeconfig) + ".missing"})
    with pytest.raises(ConfigError, match="no Kubernetes cluster configured"):
        GatewayApiRouter(missing, service, pin_key_provider=lambda: KEY).route("iris")
