"""The release's canary ramp (canaryflow/release/ramp.py) on the kubernetes platform against a real kube-apiserver:
the real KubernetesBackend, GatewayApiRouter and Lease locks, with a fake registry and a prepared metrics window
(tests/unit/fakes.py: no MLflow, and no pods to send traffic to). HTTPRoute weights move through the steps, the
candidate is promoted, the old champion retired (its objects deleted); a failing candidate is rolled back and the
champion's route restored. No kubelet: FakeKubelet (tests/kubeapi.py) marks Deployments Available."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from canaryflow.core import seal
from canaryflow.core.registry import VersionInfo
from canaryflow.core.settings import CanarySettings, Settings
from canaryflow.core.state import Route, Tag
from canaryflow.release import ramp, steps
from canaryflow.release.converge import converge
from canaryflow.release.steps import ReleaseState
from canaryflow.services import Services
from deployments.canary import Action, Phase
from deployments.kubernetes.lease import LeaseLocks
from tests.kubeapi import cluster_services
from tests.unit.fakes import FakeRegistry, WindowSource, sealed

pytestmark = [pytest.mark.integration, pytest.mark.kube]
MODEL = "m"  # the fakes' model


def _info(version: str, **tags: str) -> VersionInfo:
    return VersionInfo(MODEL, version, f"models:/{MODEL}/{version}", None, dict(tags), [],
                       int((time.time() - 3600) * 1000))


@pytest.fixture
def svc(kube_api: Any, tmp_path: Path) -> Iterator[Services]:
    from kubernetes import client, config

    namespace = f"ramp-{uuid.uuid4().hex[:6]}"
    settings = Settings(platform="kubernetes", state_dir=tmp_path / "state",
                        kubernetes={"kubeconfig": str(kube_api.kubeconfig), "namespace": namespace,
                                    "gpus_per_pod": 0, "rollout_timeout_s": 30, "lease_s": 15})
    admin = config.new_client_from_config(str(kube_api.kubeconfig))
    client.CoreV1Api(admin).create_namespace({"metadata": {"name": namespace}})
    with cluster_services(settings, admin, MODEL, versions=("1", "2", "3")) as real:
        registry = FakeRegistry({"1": _info("1", **{Tag.STATUS: "released"}), "2": _info("2"), "3": _info("3")},
                                {"champion": "1"})
        yield sealed(Services(settings, registry=registry, backend=real.backend))


def _state(svc: Services, version: str, champion: str, tmp_path: Path) -> ReleaseState:
    # replay off: no pods answer here (the pairwise replay through the service proxy has its own test)
    policy = svc.settings.model_copy(update={"canary": CanarySettings(steps=[10, 50, 100], min_requests=20,
                                                                      replay=False, bake_s=0)})
    return ReleaseState(MODEL, version, f"run-{version}", tmp_path / f"work-{version}", champion,
                        svc.registry.versions[version], policy=policy)


def _ramp(svc: Services, st: ReleaseState, source: WindowSource) -> tuple[list[Route | None], Any]:
    """Start the ramp and analyse until it ends; the route the API server held after each step."""
    status = ramp.start_or_resume(svc, st)
    seen = [svc.router.route(MODEL)]
    decision = None
    for i in range(1, 8):
        decision = ramp.analyse(svc, st, status, source=source, now=status.started_at + 30 * i)
        seen.append(svc.router.route(MODEL))
        status = decision.status
        if status.done:
            break
    return seen, decision


def test_a_ramp_moves_the_httproute_promotes_and_retires_then_a_bad_one_is_rolled_back(
        svc: Services, tmp_path: Path) -> None:
    assert isinstance(svc.locks, LeaseLocks)  # the ramp's state lock is a Lease here
    converge(svc, MODEL, Route("1"))  # v1 serves (its release)

    st = _state(svc, "2", "1", tmp_path)
    seen, decision = _ramp(svc, st, WindowSource(champion="1", candidate="2"))
    assert decision.action is Action.PROMOTE
    assert seen == [Route("1", "2", 10.0), Route("1", "2", 50.0), Route("2")]
    assert steps.promote(svc, st) == "serving as champion, replacing v1"  # what the release flow does next
    assert svc.backend.default_version(MODEL) == "2" and seal.trusted_champion(svc.registry, svc.paths, MODEL) == "2"
    assert ramp.retire(svc, MODEL, "1", 0).startswith("v1 retired")
    assert svc.backend.versions(MODEL) == ["2"]  # v1's Deployment, Service, HPA, ... deleted

    failing = WindowSource(cand_errors=30, champion="2", candidate="3")
    seen, decision = _ramp(svc, _state(svc, "3", "2", tmp_path), failing)
    assert decision.action is Action.ROLLBACK and decision.status.phase is Phase.ROLLED_BACK
    assert seen[0] == Route("2", "3", 10.0) and seen[-1] == Route("2")  # the champion's route restored
    assert svc.backend.default_version(MODEL) == "2" and seal.trusted_champion(svc.registry, svc.paths, MODEL) == "2"
