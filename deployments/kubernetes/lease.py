"""The model locks on a cluster: one ``coordination.k8s.io/v1`` Lease per model and kind (state lock, release slot).

Locally a model's state lock and its release slot are ``flock`` s under the state dir (canaryflow/core/locks.py);
on a cluster every flow run is its own pod with its own emptyDir, so a file lock excludes nothing. A Lease does:

- acquire: create the Lease holding it, or take over one that is free (no holder) or expired; every write carries
  the ``resourceVersion`` it read, so of two pods racing for it one wins and the other gets a 409 and waits;
- hold: a daemon thread renews ``renewTime`` every third of ``leaseDurationSeconds``; the block that holds it runs
  undisturbed. A holder that could not renew for a whole duration (API server unreachable, pod frozen) has lost it:
  that is logged as an error, and the next write it makes under the lock is its own responsibility (the ramp's
  status writes are compare-and-set: they refuse a stale writer anyway);
- release: clear ``holderIdentity`` (the Lease object stays, to be reused);
- expiry: a killed holder's Lease is free once it has gone unrenewed for ``leaseDurationSeconds``, judged the way
  client-go's leader election judges it: on this process's monotonic clock, from when this process first saw that
  record (so the pods' clock skew does not matter), or sooner when its ``renewTime`` is more than twice the
  duration old on the wall clock (a holder long dead before we looked). ``leaseTransitions`` counts these
  takeovers (a free Lease taken is not one).

The Lease name is derived from the model name's sha256 (a model name is untrusted: it never becomes a name
itself); the name, shortened, is an annotation for a reader of ``kubectl get leases``. Re-entrant per thread like
the file locks (a rollback that aborts a ramp takes the state lock twice). Waits are bounded: past ``timeout_s`` a
:class:`~canaryflow.core.locks.LockTimeout` names the holder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from canaryflow.core.locks import RELEASE_SLOT, STATE_LOCK, LockTimeout, ReentrantLocks
from deployments.kubernetes.apply import api_error, parse_time

_log = logging.getLogger(__name__)
_NAME_PREFIX = {STATE_LOCK: "canaryflow-state-", RELEASE_SLOT: "canaryflow-release-"}
MODEL_ANNOTATION = "canaryflow.io/model"
_POLL_S = 0.2


def lease_name(kind: str, model: str) -> str:
    """A valid, collision-free Lease name for ``model``'s lock of ``kind``."""
    return _NAME_PREFIX[kind] + hashlib.sha256(model.encode()).hexdigest()[:40]


def _now() -> datetime:
    return datetime.now(UTC)


def _micro_time(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Held:
    """One held Lease: what this process wrote last, and the thread that renews it."""

    def __init__(self, locks: LeaseLocks, name: str, identity: str, resource_version: str) -> None:
        self.locks, self.name, self.identity = locks, name, identity
        self.resource_version = resource_version
        self.renewed = time.monotonic()
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"canaryflow-lease-{name[-8:]}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        interval = self.locks.lease_s / 3
        while not self._stop.wait(interval):
            self.renew()

    def renew(self) -> bool:
        """One renewal; False (and logged) when the Lease is no longer ours."""
        try:
            lease = self.locks.read(self.name)
            holder = getattr(lease.spec, "holder_identity", None) if lease is not None else None
            if lease is None or holder != self.identity:
                self._lose(f"it is now held by {holder!r}" if lease is not None else "it was deleted")
                return False
            lease.spec.renew_time = _micro_time(_now())
            lease.spec.lease_duration_seconds = self.locks.lease_s
            self.resource_version = self.locks.replace(self.name, lease).metadata.resource_version
            self.renewed = time.monotonic()
            return True
        except Exception as exc:  # noqa: BLE001 - a failed renewal is retried until the lease runs out
            if time.monotonic() - self.renewed > self.locks.lease_s:
                self._lose(f"no renewal for {self.locks.lease_s} s ({exc})")
            else:
                _log.warning("could not renew Lease %s (retrying): %s", self.name, exc)
            return False

    def _lose(self, why: str) -> None:
        if not self.lost:
            self.lost = True
            _log.error("lost Lease %s/%s (%s): %s; another run may now hold this lock", self.locks.namespace,
                       self.name, self.locks.kind, why)
        self._stop.set()

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.locks.lease_s)
        if self.lost:
            return
        try:
            lease = self.locks.read(self.name)
            if lease is None or getattr(lease.spec, "holder_identity", None) != self.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.renew_time = _micro_time(_now())
            self.locks.replace(self.name, lease)
        except Exception as exc:  # noqa: BLE001 - an unreleased Lease frees itself when it expires
            _log.warning("could not release Lease %s (it expires in %d s): %s", self.name, self.locks.lease_s, exc)


class LeaseLocks(ReentrantLocks):
    """:class:`~canaryflow.core.locks.ModelLocks` backed by Leases in ``namespace``."""

    def __init__(self, api_client: Any, namespace: str, kind: str = STATE_LOCK, timeout_s: float = 180.0,
                 lease_s: int = 30, identity: str | None = None) -> None:
        if kind not in _NAME_PREFIX:
            raise ValueError(f"kind {kind!r} is not one of {sorted(_NAME_PREFIX)}")
        if lease_s < 3:
            raise ValueError("lease_s must be at least 3 s (renewed every third of it)")
        from kubernetes import client

        super().__init__()
        self.api = client.CoordinationV1Api(api_client)
        self.namespace, self.kind = namespace, kind
        self.timeout_s, self.lease_s = timeout_s, int(lease_s)
        self.identity = identity or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._observed: dict[str, tuple[tuple[Any, Any], float]] = {}

    # -- the API -----------------------------------------------------------------------------------------------
    def read(self, name: str) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.read_namespaced_lease(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise api_error(exc, f"read Lease {self.namespace}/{name}") from exc

    def replace(self, name: str, lease: Any) -> Any:
        """Write ``lease`` back; its ``metadata.resourceVersion`` makes it a compare-and-set (409 if stale)."""
        spec = lease.spec
        for field in ("acquire_time", "renew_time"):  # MicroTime wants the 6 fraction digits isoformat can drop
            value = getattr(spec, field)
            if isinstance(value, datetime):
                setattr(spec, field, _micro_time(value.astimezone(UTC)))
        return self.api.replace_namespaced_lease(name, self.namespace, lease)

    # -- the lock (ReentrantLocks.hold) -----------------------------------------------------------------------
    def _enter(self, model: str, why: str) -> _Held:
        return self._acquire(model, why)

    def _exit(self, lease: _Held) -> None:
        lease.release()

    def _acquire(self, model: str, why: str) -> _Held:
        name = lease_name(self.kind, model)
        identity = f"{self.identity}/{threading.get_ident()}"
        started = time.monotonic()
        holder: str | None = None
        while True:
            got = self._try(name, model, identity)
            if isinstance(got, _Held):
                return got
            holder = got or holder
            waited = time.monotonic() - started
            if waited >= self.timeout_s:
                raise LockTimeout(
                    f"waited {waited:.1f} s for the {self.kind} of model {model[:120]!r} (Lease "
                    f"{self.namespace}/{name}, held by {holder!r}) to {why or 'change its serving state'}; limit "
                    f"{self.timeout_s:g} s. "
                    + ("Another release of the model holds it" if self.kind == RELEASE_SLOT else
                       "Another release step (ramp analysis, rollback, reconcile, retire) holds it")
                    + f"; a holder that died frees it {self.lease_s} s after its last renewal") from None
            time.sleep(_POLL_S)

    def _try(self, name: str, model: str, identity: str) -> _Held | str | None:
        """The held Lease, or the current holder's identity (None: lost a race; try again)."""
        from kubernetes.client.exceptions import ApiException

        now = _now()
        lease = self.read(name)
        try:
            if lease is None:
                body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": name, "namespace": self.namespace,
                                     "labels": {"app.kubernetes.io/managed-by": "canaryflow",
                                                "canaryflow.io/lock": self.kind.replace(" ", "-")},
                                     "annotations": {MODEL_ANNOTATION: model[:253]}},
                        "spec": {"holderIdentity": identity, "leaseDurationSeconds": self.lease_s,
                                 "acquireTime": _micro_time(now), "renewTime": _micro_time(now),
                                 "leaseTransitions": 0}}
                created = self.api.create_namespaced_lease(self.namespace, body)
                return _Held(self, name, identity, created.metadata.resource_version)
            spec = lease.spec
            holder = spec.holder_identity
            if holder and not self._expired(name, lease, now):
                return holder
            spec.holder_identity = identity
            spec.lease_duration_seconds = self.lease_s
            spec.acquire_time = spec.renew_time = _micro_time(now)
            spec.lease_transitions = (spec.lease_transitions or 0) + (1 if holder else 0)
            if holder:
                _log.warning("took over Lease %s/%s (%s of %s) from %r: not renewed for %d s", self.namespace, name,
                             self.kind, model[:80], holder, self.lease_s)
            replaced = self.replace(name, lease)
            self._observed.pop(name, None)
            return _Held(self, name, identity, replaced.metadata.resource_version)
        except ApiException as exc:
            if exc.status == 409:  # another pod created or took it between our read and our write
                return None
            raise api_error(exc, f"acquire Lease {self.namespace}/{name}") from exc

    def _expired(self, name: str, lease: Any, now: datetime) -> bool:
        spec = lease.spec
        duration = spec.lease_duration_seconds or self.lease_s
        record = (spec.holder_identity, lease.metadata.resource_version)
        seen = self._observed.get(name)
        if seen is None or seen[0] != record:
            self._observed[name] = seen = (record, time.monotonic())
        if time.monotonic() - seen[1] > duration:
            return True
        renewed = parse_time(spec.renew_time)
        return renewed is not None and (now - renewed).total_seconds() > 2 * duration
