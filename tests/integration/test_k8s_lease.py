"""The model locks on a cluster (deployments/kubernetes/lease.py) against a real kube-apiserver + etcd: a Lease
per model and kind excludes other holders (other pods: other identities), is re-entrant in a thread, is renewed
while held, is released on exit, and is taken over once a killed holder stopped renewing it. The platform's
Services hand them out for platform=kubernetes (state lock and release slot).

No sleeps decide an outcome: waits are for conditions (with generous limits); the only durations are the Leases'
own, short ones (3 s) where a test needs one to run out."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from canaryflow.core import locks
from canaryflow.core.locks import RELEASE_SLOT, STATE_LOCK, LockTimeout
from canaryflow.core.settings import Settings
from canaryflow.services import Services
from deployments.kubernetes.lease import MODEL_ANNOTATION, LeaseLocks, lease_name

pytestmark = [pytest.mark.integration, pytest.mark.kube]
ROOT = Path(__file__).resolve().parents[2]


def wait_for(condition: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    done = threading.Event()
    deadline = threading.Timer(timeout_s, done.set)
    deadline.start()
    try:
        while not done.is_set():
            if value := condition():
                return value
            done.wait(0.05)
    finally:
        deadline.cancel()
    raise AssertionError(f"condition not met within {timeout_s} s")


@pytest.fixture(scope="module")
def api(kube_api: Any) -> Any:
    from kubernetes import config

    return config.new_client_from_config(str(kube_api.kubeconfig))


@pytest.fixture
def namespace(api: Any) -> str:
    from kubernetes import client

    name = f"leases-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    return name


def lease(api: Any, namespace: str, kind: str, model: str) -> Any:
    from kubernetes import client

    return client.CoordinationV1Api(api).read_namespaced_lease(lease_name(kind, model), namespace)


def test_a_held_lease_excludes_another_pod_and_is_free_after_release(api: Any, namespace: str) -> None:
    pod_a = LeaseLocks(api, namespace, STATE_LOCK, timeout_s=0, lease_s=30, identity="pod-a")
    pod_b = LeaseLocks(api, namespace, STATE_LOCK, timeout_s=0, lease_s=30, identity="pod-b")
    model = "churn/../x y"  # untrusted: never part of the object's name
    with pod_a.hold(model, "ramp"):
        stored = lease(api, namespace, STATE_LOCK, model)
        assert stored.spec.holder_identity.startswith("pod-a/") and stored.spec.lease_duration_seconds == 30
        assert stored.metadata.annotations[MODEL_ANNOTATION] == model
        with pytest.raises(LockTimeout, match=r"Lease leases-\w+/canaryflow-state-\w+, held by 'pod-a/"):
            with pod_b.hold(model, "roll back"):
                pass
        with pod_b.hold("another model"):  # models are independent
            pass
        with pod_a.hold(model):  # re-entrant in the holding thread (a rollback that aborts a ramp)
            pass
        assert lease(api, namespace, STATE_LOCK, model).spec.holder_identity.startswith("pod-a/")
    assert lease(api, namespace, STATE_LOCK, model).spec.holder_identity is None  # released on exit
    with pod_b.hold(model):
        assert lease(api, namespace, STATE_LOCK, model).spec.holder_identity.startswith("pod-b/")


def test_the_release_slot_and_the_state_lock_are_different_leases(api: Any, namespace: str) -> None:
    slot = LeaseLocks(api, namespace, RELEASE_SLOT, timeout_s=0, identity="release-run")
    state = LeaseLocks(api, namespace, STATE_LOCK, timeout_s=0, identity="reconcile")
    with slot.hold("iris"), state.hold("iris"):  # a release holds its slot while reconcile takes the state lock
        assert lease(api, namespace, RELEASE_SLOT, "iris").spec.holder_identity.startswith("release-run/")
        assert lease(api, namespace, STATE_LOCK, "iris").spec.holder_identity.startswith("reconcile/")


def test_two_threads_in_other_pods_never_hold_the_lock_at_once(api: Any, namespace: str) -> None:
    """Four contenders, each its own identity: every acquisition races on resourceVersion (a 409 loses)."""
    inside, most, errors = [0], [0], []
    guard = threading.Lock()

    def contender(n: int) -> None:
        locks_ = LeaseLocks(api, namespace, STATE_LOCK, timeout_s=120, lease_s=30, identity=f"pod-{n}")
        try:
            for _ in range(3):
                with locks_.hold("shared"):
                    with guard:
                        inside[0] += 1
                        most[0] = max(most[0], inside[0])
                    threading.Event().wait(0.02)
                    with guard:
                        inside[0] -= 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=contender, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == [] and most[0] == 1
    assert lease(api, namespace, STATE_LOCK, "shared").spec.lease_transitions == 0  # all released, none taken over


def test_a_held_lease_is_renewed_so_nobody_takes_it_over(api: Any, namespace: str) -> None:
    holder = LeaseLocks(api, namespace, STATE_LOCK, timeout_s=0, lease_s=3, identity="slow-ramp")
    other = LeaseLocks(api, namespace, STATE_LOCK, timeout_s=0, lease_s=3, identity="reconcile")
    with holder.hold("iris"):
        first = lease(api, namespace, STATE_LOCK, "iris").spec.renew_time
        wait_for(lambda: lease(api, namespace, STATE_LOCK, "iris").spec.renew_time > first)  # the renewer ran
        with pytest.raises(LockTimeout):
            with other.hold("iris"):
                pass


HOLD_AND_WAIT = """
import sys
from kubernetes import config
from deployments.kubernetes.lease import LeaseLocks
locks = LeaseLocks(config.new_client_from_config(sys.argv[1]), sys.argv[2], "release slot", timeout_s=10, lease_s=3,
                   identity="doomed-run")
with locks.hold("iris", "release it"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_killed_holders_lease_is_taken_over_after_its_duration(api: Any, namespace: str, kube_api: Any,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A release run's pod killed mid-release (OOM, node lost): nobody releases its Lease; the next run waits for
    it to go unrenewed for leaseDurationSeconds, then takes it over (counted in leaseTransitions)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_AND_WAIT, str(kube_api.kubeconfig), namespace], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert lease(api, namespace, RELEASE_SLOT, "iris").spec.holder_identity.startswith("doomed-run/")
    next_run = LeaseLocks(api, namespace, RELEASE_SLOT, timeout_s=60, lease_s=3, identity="next-run")
    with caplog.at_level(logging.WARNING, logger="deployments.kubernetes.lease"):
        with next_run.hold("iris", "release it"):
            stored = lease(api, namespace, RELEASE_SLOT, "iris")
            assert stored.spec.holder_identity.startswith("next-run/") and stored.spec.lease_transitions == 1
    assert "took over Lease" in caplog.text and "doomed-run" in caplog.text


def test_the_kubernetes_platform_locks_with_leases(api: Any, namespace: str, kube_api: Any, tmp_path: Path) -> None:
    settings = Settings(platform="kubernetes", state_dir=tmp_path / "state",
                        kubernetes={"kubeconfig": str(kube_api.kubeconfig), "namespace": namespace, "lease_s": 15})
    svc = Services(settings)
    assert isinstance(svc.locks, LeaseLocks) and svc.locks.kind == STATE_LOCK
    assert svc.locks.timeout_s == settings.reconcile.lock_timeout_s and svc.locks.lease_s == 15
    with locks.release_slot(svc, "iris", 5), locks.hold(svc, "iris", "ramp"):
        assert lease(api, namespace, RELEASE_SLOT, "iris").spec.holder_identity
        assert lease(api, namespace, STATE_LOCK, "iris").spec.holder_identity
        with locks.hold(svc, "iris", "abort the ramp"):  # re-entrant across callers in one thread
            pass
    assert not (tmp_path / "state" / "locks").exists()  # no file lock was taken
    local = Services(Settings(state_dir=tmp_path / "local"))
    with locks.hold(local, "iris"):
        assert (tmp_path / "local" / "locks").is_dir()
