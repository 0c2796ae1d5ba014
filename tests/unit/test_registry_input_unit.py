"""What a registry user writes is untrusted: the name rule at every entry, escaped URLs and filters, and a
per-model policy that may only tighten the operator's settings."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from fakes import FakeBackend, FakeLauncher, FakeRegistry, FakeRouter, fake_services

from canaryflow.core.errors import ConfigError, Refused, RegistryError
from canaryflow.core.names import name_problem
from canaryflow.core.paths import StatePaths
from canaryflow.core.policy import RULES, apply_policy
from canaryflow.core.registry import VersionInfo, _literal
from canaryflow.core.settings import Settings
from canaryflow.core.state import Tag
from canaryflow.release import reconcile, steps
from deployments import torchserve


@pytest.mark.parametrize(("model", "version", "ok"), [
    ("iris", "3", True), ("breast-cancer_v2.1", "12", True), ("a" * 64, "1", True),
    ("iris?", "1", False), ("iris#x", "1", False), ("a/b", "1", False), ("../etc", "1", False), ("x'y", "1", False),
    ("-lead", "1", False), ("a..b", "1", False), ("", "1", False), ("a" * 65, "1", False), ("ok", "1?", False),
    ("ok", "../1", False), ("ok", "", False), ("iris", None, True),
])
def test_the_name_rule(model: str, version: str | None, ok: bool) -> None:
    problem = name_problem(model, version)
    assert (problem is None) is ok, problem
    if not ok:
        assert "not allowed" in problem


def test_management_paths_quote_every_segment(tmp_path: Path) -> None:
    seen: list[str] = []
    client = torchserve.TorchServeClient.__new__(torchserve.TorchServeClient)
    client._call = lambda api, method, path, **kw: (seen.append(path), httpx.Response(200, json={}))[1]
    client.paths = StatePaths(tmp_path)  # where a version's measured serving settings would be forgotten
    client.unregister("iris?", "3")
    client.set_default("a/b", "1#x")
    assert seen == ["/models/iris%3F..batched/3", "/models/iris%3F/3", "/models/a%2Fb/1%23x/set-default"]


@pytest.mark.parametrize("value", ["x'y", 'x"y', "x\\y", "x\ny"])
def test_mlflow_filter_values_with_quotes_are_refused(value: str) -> None:
    with pytest.raises(RegistryError, match="cannot go into an MLflow search filter"):
        _literal(value)
    assert _literal("iris") == "'iris'"


def test_begin_refuses_a_bad_name_tags_it_rejected_and_touches_nothing(tmp_path: Path) -> None:
    reg = FakeRegistry({"1": VersionInfo("iris?", "1", "src", None)})
    svc = fake_services(tmp_path, reg, FakeBackend({"1"}), FakeRouter({"iris": {"stable": "1"}}))
    with pytest.raises(Refused, match="not allowed"):
        steps.begin(svc, "iris?", "1")
    assert reg.versions["1"].tags[Tag.STATUS] == "rejected" and "iris?" in reg.versions["1"].tags[Tag.REASON]
    assert svc.router.table == {"iris": {"stable": "1"}} and svc.router.changes == 0 and reg.runs == []


def test_begin_refuses_a_loosening_policy_with_the_key(tmp_path: Path) -> None:
    reg = FakeRegistry({"2": VersionInfo("m", "2", "src", None)},
                       model_tag={Tag.POLICY: json.dumps({"gates": {"quality_min": 0.1}})})
    svc = fake_services(tmp_path, reg)
    with pytest.raises(Refused, match=r"gates.quality_min = 0.1 loosens the operator's 0.7"):
        steps.begin(svc, "m", "2")
    assert reg.versions["2"].tags[Tag.STATUS] == "rejected"


def test_reconcile_rejects_versions_of_a_badly_named_model_and_goes_on(tmp_path: Path) -> None:
    reg = FakeRegistry({"1": VersionInfo("iris?", "1", "src", None)})
    svc = fake_services(tmp_path, reg, router=FakeRouter())
    actions = reconcile.reconcile(svc, FakeLauncher(), now=0)
    assert any("rejected" in a for a in actions) and reg.versions["1"].tags[Tag.STATUS] == "rejected"
    assert reconcile.reconcile(svc, FakeLauncher(), now=0) == []  # once


# -- policy ---------------------------------------------------------------------------------------------------
def policy(**sections: dict) -> str:
    return json.dumps(sections)


@pytest.mark.parametrize(("raw", "error"), [
    (policy(gates={"quality_min": 0.0}), "gates.quality_min = 0.0 loosens"),
    (policy(gates={"data_max_failed_ratio": 1}), "gates.data_max_failed_ratio = 1 loosens"),
    (policy(gates={"allow_contract_change": True}), "gates.allow_contract_change = true loosens"),
    (policy(canary={"steps": []}), "canary.steps = [] loosens"),
    (policy(canary={"replay": False}), "canary.replay = false loosens"),
    (policy(canary={"feedback": "off"}), "canary.feedback = \"off\" loosens"),
    (policy(canary={"bake_s": 0}), "canary.bake_s = 0 loosens"),
    (policy(optimization={"variants": ["tf_magic"]}), "optimization.variants"),
    (policy(gates={"quality_mni": 0.9}), "gates.quality_mni is not a setting"),
    (policy(canary={"allow_chaos": True}), "canary.allow_chaos is set by the operator only"),
    (policy(gates={"evaluation_set": "/etc/shadow"}), "gates.evaluation_set is set by the operator only"),
    (policy(loadtest={"users": 10_000}), "loadtest.users is set by the operator only"),
    (policy(reconcile={"interval_s": 1}), "may only hold the sections"),
    ("[1, 2]", "may only hold the sections"),
    ("{not json", "is not JSON"),
])
def test_a_policy_that_loosens_or_names_an_unknown_key_is_refused(raw: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        apply_policy(Settings(), raw)


def test_a_policy_may_tighten() -> None:
    out = apply_policy(Settings(), policy(gates={"quality_min": 0.9}, canary={"steps": [1, 5, 25, 50, 100],
                                                                              "feedback": "required"},
                                          optimization={"variants": ["onnx_int8"]}))
    assert out.gates.quality_min == 0.9 and out.canary.steps == [1, 5, 25, 50, 100]
    assert out.canary.feedback == "required" and out.optimization.variants == ["onnx_int8"]


def test_the_operator_can_allow_loosening_but_not_past_the_hard_caps() -> None:
    loose = Settings().model_copy(update={"release": Settings().release.model_copy(
        update={"allow_policy_loosening": True})})
    assert apply_policy(loose, policy(gates={"quality_min": 0.1})).gates.quality_min == 0.1
    with pytest.raises(ConfigError, match="less than or equal to 600"):
        apply_policy(loose, policy(canary={"interval_s": 10**6}))  # one model cannot hold the release slot
    with pytest.raises(ConfigError, match="operator only"):
        apply_policy(loose, policy(canary={"allow_chaos": True}))


def test_every_rule_names_a_real_setting() -> None:
    settings = Settings()
    for section, rules in RULES.items():
        assert set(rules) <= set(type(getattr(settings, section)).model_fields), section
