"""Per-model serialization of state changes: the ramp, a rollback, reconcile's repairs and a retirement of one
model never interleave.

Locally the lock is an ``fcntl.flock`` on ``<state>/locks/<slug>-<sha256>.lock`` (the model name is untrusted: it
never becomes a path itself). On Kubernetes, where every flow run is a pod of its own, a Lease per model implements
the same :class:`ModelLocks` protocol (deployments/kubernetes/lease.py); the platform chooses (canaryflow/services.py,
``Services.locks`` and ``Services.release_slots``). Waits are bounded: past ``timeout_s`` a :class:`LockTimeout`
says who waited for what and for how long.

The lock is re-entrant per thread (a rollback that aborts a ramp takes it twice); two threads, or two processes,
holding the same model's lock exclude each other, because each acquisition opens its own file description.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from canaryflow.core.errors import CanaryflowError
from canaryflow.core.paths import model_file_name

DEFAULT_TIMEOUT_S = 180.0  # above TorchServe's 120 s registration timeout: a rollback may register a version
_POLL_S = 0.05
STATE_LOCK = "state lock"
RELEASE_SLOT = "release slot"


class LockTimeout(CanaryflowError):
    """Another release step held the model's lock for longer than the wait allowed."""


class StatusConflict(CanaryflowError):
    """A ramp status write lost a compare-and-set: someone else wrote the status since the writer read it."""

    def __init__(self, message: str, persisted: Any = None) -> None:
        super().__init__(message)
        self.persisted = persisted


class ModelLocks(Protocol):
    """A mutual-exclusion lock per registered model (a file lock locally, a Lease on Kubernetes)."""

    def hold(self, model: str, why: str = "") -> AbstractContextManager[None]: ...


def lock_file_name(model: str) -> str:
    """A file name for ``model`` that cannot escape the lock directory or collide with another model's."""
    return model_file_name(model, ".lock")


class ReentrantLocks:
    """Per-thread re-entrancy around one acquire/release pair per model: a subclass says how to take the lock
    (:meth:`_enter`, returning a handle, raising :class:`LockTimeout`) and how to give it back (:meth:`_exit`)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _held(self) -> dict[str, int]:
        if not hasattr(self._local, "held"):
            self._local.held = {}
        return self._local.held

    @contextmanager
    def hold(self, model: str, why: str = "") -> Iterator[None]:
        """Hold ``model``'s lock for the ``with`` block; raises :class:`LockTimeout` when the wait is too long."""
        held = self._held()
        if held.get(model):
            held[model] += 1
            try:
                yield
            finally:
                held[model] -= 1
            return
        handle = self._enter(model, why)
        held[model] = 1
        try:
            yield
        finally:
            held.pop(model, None)
            self._exit(handle)

    def _enter(self, model: str, why: str) -> Any:
        raise NotImplementedError

    def _exit(self, handle: Any) -> None:
        raise NotImplementedError


class FileLocks(ReentrantLocks):
    """``fcntl.flock`` locks under one directory; re-entrant within a thread, exclusive across threads and
    processes."""

    def __init__(self, directory: Path, timeout_s: float = DEFAULT_TIMEOUT_S, kind: str = STATE_LOCK) -> None:
        super().__init__()
        self.directory = directory
        self.timeout_s = timeout_s
        self.kind = kind

    def path(self, model: str) -> Path:
        return self.directory / lock_file_name(model)

    def _enter(self, model: str, why: str) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(model)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._acquire(fd, model, why, path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _exit(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _acquire(self, fd: int, model: str, why: str, path: Path) -> None:
        started = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited >= self.timeout_s:
                    raise LockTimeout(
                        f"waited {waited:.1f} s for the {self.kind} of model {model!r} ({path}) to "
                        f"{why or 'change its serving state'}; limit {self.timeout_s:g} s. "
                        + ("Another release of the model holds it" if self.kind == RELEASE_SLOT else
                           "Another release step (ramp analysis, rollback, reconcile, retire) holds it")
                        + "; retry when it is done") from None
                time.sleep(_POLL_S)


_shared: dict[tuple[Path, float, str], FileLocks] = {}
_shared_guard = threading.Lock()


def file_locks(state_root: Path, kind: str = STATE_LOCK, timeout_s: float = DEFAULT_TIMEOUT_S) -> FileLocks:
    """The local locks of ``kind`` under a state dir, one instance per directory and timeout (so re-entrancy is
    seen across callers in the same process). The release slots are flocks apart from the state locks
    (``<state>/locks/releases/``): the kernel frees one the moment a killed run's process dies, so the run reconcile
    starts next does not wait for a lease to expire."""
    directory = state_root / "locks" if kind == STATE_LOCK else state_root / "locks" / "releases"
    key = (directory, float(timeout_s), kind)
    with _shared_guard:
        if key not in _shared:
            _shared[key] = FileLocks(*key)
        return _shared[key]


def model_locks(svc: Any) -> ModelLocks:
    """The state locks of a set of services: ``svc.locks`` (the platform's: files or Leases) when it has them, else
    file locks under the state dir (unit tests' fakes)."""
    locks = getattr(svc, "locks", None)
    if locks is not None:
        return locks
    settings = getattr(svc, "settings", None)
    timeout = getattr(getattr(settings, "reconcile", None), "lock_timeout_s", DEFAULT_TIMEOUT_S)
    return file_locks(svc.paths.root, STATE_LOCK, timeout)


def release_slot(svc: Any, model: str, timeout_s: float) -> AbstractContextManager[None]:
    """One release of ``model`` at a time, held for the whole release run; other models' releases go on beside it.
    The platform's slots (``svc.release_slots(timeout_s)``: a file lock locally, a Lease on Kubernetes), else a file
    lock under the state dir. Raises :class:`LockTimeout` after ``timeout_s``."""
    slots = getattr(svc, "release_slots", None)
    provider = slots(timeout_s) if slots is not None else file_locks(svc.paths.root, RELEASE_SLOT, timeout_s)
    return provider.hold(model, "release it")


def hold(svc: Any, model: str, why: str = "") -> AbstractContextManager[None]:
    """Shorthand: hold ``model``'s state lock of ``svc``."""
    return model_locks(svc).hold(model, why)
