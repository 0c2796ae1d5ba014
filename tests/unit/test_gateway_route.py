"""The Gateway API HTTPRoute of a model, built and read back without a server (deployments/kubernetes/
gateway_route.py): weights in basis points, rule order, pins that need the pin key, shadow mirror, safe names,
and the objects checked against the v1.6.1 standard CRD's schema offline."""

from __future__ import annotations

import hashlib

import pytest
import yaml

from canaryflow.core.errors import ServingError
from deployments.kubernetes import gateway_route as gr
from tests.kubeapi import CRDS

KEY = "pin-key-123"


def service(model: str, version: str) -> str:
    """A Service name per version, as the backend's naming gives one (hashed when the model name is not plain)."""
    plain = model if gr._DNS_LABEL.match(model) else hashlib.sha256(model.encode()).hexdigest()[:12]
    return f"ts-{plain}-v{version}"


TARGET = gr.RouteTarget(namespace="ml", gateway_name="gw", service_name=service, hostnames=["models.example.com"])
CRD = CRDS / "gateway.networking.k8s.io_httproutes.yaml"


def build(route: dict, model: str = "iris", target: gr.RouteTarget = TARGET) -> dict:
    return gr.build_httproute(model, route, target, KEY)


def rules(obj: dict) -> dict[str, dict]:
    return {rule["name"]: rule for rule in obj["spec"]["rules"]}


def weights(rule: dict) -> dict[str, int]:
    return {ref["name"]: ref["weight"] for ref in rule["backendRefs"]}


def test_weights_are_basis_points_summing_to_the_total_at_every_hundredth_of_a_percent() -> None:
    for step in range(1, 10_001):  # 0.01 % .. 100 %
        weight = step / 100
        stable, canary = gr.basis_points(weight)
        assert stable + canary == gr.WEIGHT_SCALE and canary == step
        assert gr.percent(stable, canary) == weight
    assert gr.basis_points(0.01) == (9999, 1)
    assert gr.basis_points(99.99) == (1, 9999)


def test_split_rule_weights_and_rule_order() -> None:
    obj = build({"stable": "1", "canary": "2", "weight": 12.34})
    assert [r["name"] for r in obj["spec"]["rules"]] == ["pin-stable", "pin-canary", "traffic"]
    assert weights(rules(obj)["traffic"]) == {"ts-iris-v1": 8766, "ts-iris-v2": 1234}
    assert [r["name"] for r in build({"stable": "1"})["spec"]["rules"]] == ["pin-stable", "traffic"]
    assert weights(rules(build({"stable": "1"}))["traffic"]) == {"ts-iris-v1": 10000}
    full = rules(build({"stable": "1", "canary": "2", "weight": 100}))["traffic"]
    assert weights(full) == {"ts-iris-v1": 0, "ts-iris-v2": 10000}  # stable stays listed: it reads back


def test_metadata_parent_and_hostnames() -> None:
    target = gr.RouteTarget(namespace="ml", gateway_name="gw", gateway_namespace="infra",
                            service_name=TARGET.service_name, service_port=9000)
    obj = build({"stable": "1"}, target=target)
    assert obj["metadata"]["labels"] == {"app.kubernetes.io/part-of": "canaryflow", "canaryflow.io/model": "iris"}
    assert obj["metadata"]["annotations"][gr.MODEL_ANNOTATION] == "iris"
    assert obj["spec"]["parentRefs"] == [{"group": gr.GROUP, "kind": "Gateway", "name": "gw", "namespace": "infra"}]
    assert "hostnames" not in obj["spec"]
    assert build({"stable": "1"})["spec"]["hostnames"] == ["models.example.com"]
    assert rules(obj)["traffic"]["backendRefs"][0]["port"] == 9000


def test_a_pin_needs_the_pin_key_and_versioned_paths_are_not_routed() -> None:
    obj = build({"stable": "1", "canary": "2", "weight": 5})
    pin = {"X-Model-Version": "2", "X-Canaryflow-Pin-Key": KEY}
    assert gr.rule_for(obj, "/predictions/iris", pin) == "pin-canary"
    assert gr.rule_for(obj, "/predictions/iris/", {k.lower(): v for k, v in pin.items()}) == "pin-canary"
    assert gr.rule_for(obj, "/predictions/iris", {**pin, "X-Model-Version": "1"}) == "pin-stable"
    # without the key, or with a wrong one: the unpinned traffic, never the pinned version
    assert gr.rule_for(obj, "/predictions/iris", {"X-Model-Version": "2"}) == "traffic"
    assert gr.rule_for(obj, "/predictions/iris", {**pin, "X-Canaryflow-Pin-Key": "guess"}) == "traffic"
    # a version that is not routed cannot be pinned even with the key
    assert gr.rule_for(obj, "/predictions/iris", {**pin, "X-Model-Version": "3"}) == "traffic"
    # the versioned path (any version) and other models' paths match no rule: the gateway answers 404
    for path in ("/predictions/iris/2", "/predictions/iris/3", "/predictions/iris/1/x", "/predictions/irisx",
                 "/predictions", "/models/iris"):
        assert gr.rule_for(obj, path, pin) is None, path
    pin_filter = rules(obj)["pin-canary"]["filters"][0]["requestHeaderModifier"]
    assert pin_filter["set"] == [{"name": "x-canaryflow-pinned", "value": "1"}]
    assert "X-Canaryflow-Pin-Key" in pin_filter["remove"]
    traffic_filter = rules(obj)["traffic"]["filters"][0]["requestHeaderModifier"]
    assert {"X-Model-Version", "X-Canaryflow-Pin-Key", "x-canaryflow-pinned", "x-canaryflow-replay",
            "describe", "explain"} <= set(traffic_filter["remove"]) and "set" not in traffic_filter


def test_rule_for_follows_gateway_precedence() -> None:
    obj = {"spec": {"rules": [
        {"name": "root", "matches": [{"path": {"type": "PathPrefix", "value": "/"}}]},
        {"name": "long", "matches": [{"path": {"type": "PathPrefix", "value": "/a/b"}}]},
        {"name": "exact", "matches": [{"path": {"type": "Exact", "value": "/a/b"}}]}]}}
    assert gr.rule_for(obj, "/a/b", {}) == "exact"
    assert gr.rule_for(obj, "/a/b/c", {}) == "long"
    assert gr.rule_for(obj, "/a/bc", {}) == "root"  # prefixes match whole path elements


def test_shadow_mirrors_every_request_to_the_canary() -> None:
    obj = build({"stable": "1", "canary": "2", "weight": 25, "shadow": True})
    traffic = rules(obj)["traffic"]
    assert weights(traffic) == {"ts-iris-v1": 10000}
    (mirror,) = [f for f in traffic["filters"] if f["type"] == "RequestMirror"]
    assert mirror["requestMirror"] == {"backendRef": {"group": "", "kind": "Service", "name": "ts-iris-v2",
                                                      "port": 8080}}  # no percent/fraction: every request
    assert not any(f["type"] == "RequestMirror" for f in rules(obj)["pin-canary"]["filters"])
    assert obj["metadata"]["annotations"][gr.SHADOW_WEIGHT_ANNOTATION] == "25"


@pytest.mark.parametrize("route", [
    {"stable": "1"},
    {"stable": "1", "canary": "2", "weight": 5.0, "shadow": False},
    {"stable": "7", "canary": "8", "weight": 0.01, "shadow": False},
    {"stable": "1", "canary": "2", "weight": 100.0, "shadow": False},
    {"stable": "1", "canary": "2", "weight": 33.33, "shadow": True},
    {"stable": "1", "canary": "2", "weight": 0.0, "shadow": True},
    {"stable": "1", "canary": "2", "shadow": True},
])
def test_parse_reads_back_what_was_built(route: dict) -> None:
    assert gr.parse_httproute(build(route, model="Iris_2.b")) == ("Iris_2.b", route)


def test_parse_refuses_foreign_or_edited_routes() -> None:
    obj = build({"stable": "1", "canary": "2", "weight": 5})
    foreign = {**obj, "metadata": {**obj["metadata"], "annotations": {}}}
    with pytest.raises(ServingError, match="annotation"):
        gr.parse_httproute(foreign)
    renamed = {**obj, "metadata": {**obj["metadata"], "name": "other"}}
    with pytest.raises(ServingError, match="annotation"):
        gr.parse_httproute(renamed)
    edited = {**obj, "spec": {**obj["spec"], "rules": obj["spec"]["rules"][:2]}}
    with pytest.raises(ServingError, match="does not hold the rules"):
        gr.parse_httproute(edited)


def test_object_names_are_safe_and_distinct() -> None:
    assert gr.object_name("iris") == "iris"
    names = {gr.object_name(m) for m in ("iris", "Iris", "iris_v2", "iris.v2", "iris-v2")}
    assert len(names) == 5
    long = "A" * 64
    for model in ("Iris", "iris_v2", long, "9" + "_" * 63):
        name = gr.object_name(model)
        assert gr._DNS_LABEL.match(name) and len(name) <= 63 and name != model, name
    assert gr._LABEL_VALUE.match(gr.label_value(long)) and gr.label_value("Iris_2.b") == "Iris_2.b"
    for hostile in ("iris?", "a/b", "x'y", "", "-iris", "a" * 65, "a..b"):
        with pytest.raises(ServingError, match="not allowed"):
            gr.object_name(hostile)
        with pytest.raises(ServingError):
            build({"stable": "1"}, model=hostile)


def test_bad_inputs_are_refused_before_anything_is_built() -> None:
    bad_service = gr.RouteTarget(namespace="ml", gateway_name="gw", service_name=lambda m, v: f"TS_{m}")
    with pytest.raises(ServingError, match="DNS-1123"):
        build({"stable": "1"}, target=bad_service)
    with pytest.raises(ServingError, match="pin key"):
        gr.build_httproute("iris", {"stable": "1"}, TARGET, "")
    with pytest.raises(ServingError, match="2 decimals"):
        build({"stable": "1", "canary": "2", "weight": 0.001})
    with pytest.raises(ServingError, match="out of range"):
        build({"stable": "1", "canary": "2", "weight": 0})
    with pytest.raises(ServingError, match="does not match"):
        build({"stable": "1 2"})


def test_session_persistence_only_on_a_live_split_when_enabled() -> None:
    sticky = gr.RouteTarget(namespace="ml", gateway_name="gw", service_name=TARGET.service_name,
                            session_persistence=True)
    split = rules(build({"stable": "1", "canary": "2", "weight": 5}, target=sticky))
    assert split["traffic"]["sessionPersistence"] == {"type": "Cookie", "sessionName": gr.SESSION_COOKIE}
    assert all("sessionPersistence" not in r for r in (split["pin-stable"], split["pin-canary"]))
    for route in ({"stable": "1"}, {"stable": "1", "canary": "2", "shadow": True}):
        assert "sessionPersistence" not in rules(build(route, target=sticky))["traffic"]
    assert "sessionPersistence" not in rules(build({"stable": "1", "canary": "2", "weight": 5}))["traffic"]


def test_built_routes_validate_against_the_standard_crd_schema() -> None:
    """The OpenAPI part offline (patterns, enums, bounds); the API server also runs the CEL rules
    (tests/integration/test_gateway_router.py)."""
    import jsonschema

    crd = yaml.safe_load(CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = v1["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for route in ({"stable": "1"}, {"stable": "1", "canary": "2", "weight": 0.01},
                  {"stable": "1", "canary": "2", "weight": 50, "shadow": True}):
        jsonschema.validate(build(route, model="A" * 64)["spec"], schema)
    bad = build({"stable": "1"})
    bad["spec"]["rules"][0]["backendRefs"][0]["weight"] = 1_000_001
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad["spec"], schema)
