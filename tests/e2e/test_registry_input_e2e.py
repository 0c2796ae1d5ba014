"""What a registry user writes is untrusted, on the real stack: a model named like a served one plus ``?`` is
refused at the bridge and tagged rejected by reconcile while the served model keeps answering; a per-model
policy with a misspelled or operator-only key is refused at the release's first step with the key named.

(The suite's stack lets policies loosen, as its own test models need; tests/unit/test_registry_input_unit.py proves a
loosening policy is refused with the default setting.)"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from mlflow import MlflowClient

from canaryflow.core.state import Tag
from canaryflow.local.demo import register_model, wait_for_release
from canaryflow.release import reconcile
from canaryflow.services import Services
from tests.integration.test_batch_inference import MODEL, release_model

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def served(stack) -> str:
    """A served champion: the batch tests' model, released once per session stack."""
    return release_model(stack)


def _answer(stack) -> httpx.Response:
    return httpx.post(f"{stack.settings.router_url}/predictions/{MODEL}", json={"inputs": [[1.0] * 30]}, timeout=30)


def test_a_name_with_a_query_mark_is_refused_and_the_served_model_keeps_answering(stack, served: str) -> None:
    bad = f"{MODEL}?"
    version, _, _ = register_model(stack.settings.mlflow_uri, name=bad, seed=1)  # MLflow accepts it; its webhook fires
    log = stack.paths.logs / "bridge.log"
    deadline = time.monotonic() + 60
    while f"model={bad} version={version} outcome=refused" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "the bridge never refused the delivery"
        time.sleep(0.5)
    svc = Services(stack.settings)
    assert svc.launcher.list_flow_runs(bad) == []  # never became a flow run
    actions = reconcile.reconcile(svc, svc.launcher)
    tags = MlflowClient(stack.settings.mlflow_uri).get_model_version(bad, version).tags
    assert tags[Tag.STATUS] == "rejected" and "is not allowed" in tags[Tag.REASON], (tags, actions)
    assert svc.backend.versions(MODEL) == [served]  # `DELETE /models/<model>?/1` never hit <model>
    resp = _answer(stack)
    assert resp.status_code == 200 and resp.json()["model_version"] == served


@pytest.mark.parametrize(("name", "policy", "reason"), [
    ("input-typo", {"gates": {"quality_mni": 0.99}}, "gates.quality_mni is not a setting"),
    ("input-chaos", {"canary": {"allow_chaos": True}}, "canary.allow_chaos is set by the operator only"),
])
def test_a_policy_key_that_is_not_allowed_is_refused_with_its_name(stack, served: str, name: str, policy: dict,
                                                                 reason: str) -> None:
    client = MlflowClient(stack.settings.mlflow_uri)
    client.create_registered_model(name, tags={Tag.POLICY: json.dumps(policy)})
    version, _, _ = register_model(stack.settings.mlflow_uri, name=name, seed=2)
    outcome = wait_for_release(stack.settings.mlflow_uri, name, version, timeout_s=300)
    assert outcome.status == "rejected" and reason in outcome.reason, outcome
    assert Services(stack.settings).backend.versions(name) == []  # nothing staged
    assert _answer(stack).status_code == 200
