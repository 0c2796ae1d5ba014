"""What a registry user writes is untrusted, on the real stack: a model named like a served one plus ``?`` is
refused at the bridge and tagged rejected by reconcile while the served model keeps answering; a per-model
policy with a misspelled or operator-only key is refused at the release's first step with the key named.

(The suite's stack lets policies loosen, as its own test models need; tests/unit/test_registry_input_unit.py proves a
loosening policy is refused with the default setting.)"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from canaryflow.core.state import Tag
from canaryflow.local.demo import pinned_requirements, register_model, wait_for_release
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


def test_a_forged_champion_alias_and_canary_tag_change_nothing_and_are_reported(stack, served: str) -> None:
    """A registry user points ``champion`` at a rejected version and writes a "promoted at 100%" ramp status on
    it: reconcile routes nothing to it, reports the forged alias, and the served model keeps answering."""
    name = "input-forged"
    client = MlflowClient(stack.settings.mlflow_uri)
    client.create_registered_model(name, tags={Tag.POLICY: json.dumps({"gates": {"quality_mni": 1}})})
    version, _, _ = register_model(stack.settings.mlflow_uri, name=name, seed=3)
    assert wait_for_release(stack.settings.mlflow_uri, name, version, timeout_s=300).status == "rejected"
    client.set_registered_model_alias(name, "champion", version)
    client.set_model_version_tag(name, version, Tag.STATUS, "canary")
    client.set_model_version_tag(name, version, Tag.CANARY, json.dumps(
        {"champion": version, "candidate": version, "phase": "progressing", "step": 2, "weight": 100.0,
         "started_at": time.time(), "step_started_at": time.time(), "generation": 7}))
    svc = Services(stack.settings)
    runs = len(svc.launcher.list_flow_runs(name))
    try:
        actions = reconcile.reconcile(svc, svc.launcher)
    finally:
        client.delete_registered_model_alias(name, "champion")
        client.set_model_version_tag(name, version, Tag.STATUS, "rejected")
    assert any(f"alias 'champion' names v{version} but the pipeline's champion is none" in a for a in actions), \
        actions
    assert any(f"{name} v{version}: its ramp status does not carry the pipeline's seal" in a for a in actions), \
        actions
    assert svc.router.route(name) is None and svc.backend.versions(name) == []  # nothing routed, nothing registered
    assert len(svc.launcher.list_flow_runs(name)) == runs  # no release started to "resume" the forged ramp
    assert svc.router.route(MODEL).stable == served and _answer(stack).status_code == 200


SNOOP = '''
import os, socket
import mlflow
from mlflow.pyfunc import PythonModel

PROBES = {probes!r}


class Snoop(PythonModel):
    def predict(self, context, model_input, params=None):
        seen = []
        for path in PROBES:
            try:
                open(path, "rb").read()
                seen.append("READ")
            except OSError as exc:
                seen.append(type(exc).__name__)
        env = sorted(k for k in os.environ if k.startswith(("CANARYFLOW", "PREFECT", "MLFLOW")))
        s = socket.socket()
        s.settimeout(5)
        net = s.connect_ex(("127.0.0.1", {port}))
        raise RuntimeError(f"snoop secrets={{sorted(set(seen))}} env={{env}} connect={{net}} uid={{os.getuid()}}")


mlflow.models.set_model(Snoop())
'''


def test_a_models_own_code_cannot_read_the_stacks_secrets(stack, tmp_path) -> None:
    """A registered model whose code, once loaded by the gates, reads every secret of the stack, lists the
    pipeline's environment and calls MLflow: the shape gate hears what it saw. Run as root (CI, this machine):
    every secret is a PermissionError, the environment is empty, MLflow is unreachable, it runs as nobody."""
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    p = stack.paths
    probes = [str(x) for x in (p.seal_key, p.pin_key, p.webhook_secret, p.fernet_key, p.torchserve_keys,
                               p.root / "mlflow.db")]
    assert all(Path(x).exists() for x in probes[:5]), probes
    code = tmp_path / "snoop.py"
    code.write_text(SNOOP.format(probes=probes, port=stack.settings.ports.mlflow))
    name = "input-snoop"
    mlflow.set_tracking_uri(stack.settings.mlflow_uri)
    with mlflow.start_run(run_name="snoop"):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), registered_model_name=name,
                                       signature=ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32),
                                                                                          (-1, 4))])),
                                       pip_requirements=pinned_requirements("mlflow", "numpy"))
    version = str(info.registered_model_version)
    outcome = wait_for_release(stack.settings.mlflow_uri, name, version, timeout_s=300)
    assert outcome.status == "rejected" and "snoop" in outcome.reason, outcome
    assert "env=[]" in outcome.reason and "connect=0" not in outcome.reason, outcome.reason
    if os.geteuid() == 0:
        assert "secrets=['PermissionError']" in outcome.reason and "uid=65534" in outcome.reason, outcome.reason
