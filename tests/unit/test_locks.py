"""Per-model state lock (canaryflow.locks), the compare-and-set status write, and a rollback racing a ramp.

Interleavings are forced with events, never sleeps: a spy lock says when a thread found the lock taken, and fakes
block inside a locked section until the test lets them go.
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from test_ramp_ops import Source, info, released, services, state

from canaryflow.core.locks import FileLocks, LockTimeout, StatusConflict, lock_file_name
from canaryflow.core.state import Tag
from canaryflow.release import ramp, rollback
from deployments.canary import Action, Phase
from deployments.metrics import Window

WAIT_S = 30.0  # generous bound on waiting for an event: only reached when the code under test is broken


class SpyLocks(FileLocks):
    """File locks that set ``contended`` when an acquisition finds the lock taken (then wait as usual)."""

    def __init__(self, directory: Path, timeout_s: float = WAIT_S) -> None:
        super().__init__(directory, timeout_s)
        self.contended = threading.Event()

    def _acquire(self, fd: int, model: str, why: str, path: Path) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            self.contended.set()
        super()._acquire(fd, model, why, path)


class Worker(threading.Thread):
    """Runs ``fn`` and keeps its result or exception."""

    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by finish()
            self.error = exc

    def finish(self) -> object:
        self.join(WAIT_S)
        assert not self.is_alive(), "worker did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def test_the_lock_serializes_two_threads(tmp_path: Path) -> None:
    locks = SpyLocks(tmp_path / "locks")
    order: list[str] = []
    a_in, a_go = threading.Event(), threading.Event()

    def a() -> None:
        with locks.hold("m"):
            order.append("a in")
            a_in.set()
            assert a_go.wait(WAIT_S)
            order.append("a out")

    def b() -> None:
        with locks.hold("m"):
            order.append("b in")

    ta = Worker(a)
    ta.start()
    assert a_in.wait(WAIT_S)
    tb = Worker(b)
    tb.start()
    assert locks.contended.wait(WAIT_S)  # b is waiting for a's lock
    with pytest.raises(LockTimeout, match=r"model 'm'.*limit 0 s"):
        with FileLocks(tmp_path / "locks", timeout_s=0).hold("m"):  # another holder (another process) waits too
            pass
    with FileLocks(tmp_path / "locks", timeout_s=0).hold("other model"):  # models are independent
        pass
    a_go.set()
    ta.finish()
    tb.finish()
    assert order == ["a in", "a out", "b in"]


def test_the_lock_is_reentrant_in_one_thread(tmp_path: Path) -> None:
    locks = FileLocks(tmp_path / "locks", timeout_s=0)
    with locks.hold("m"), locks.hold("m"):
        with pytest.raises(LockTimeout):
            with FileLocks(tmp_path / "locks", timeout_s=0).hold("m"):
                pass
    with FileLocks(tmp_path / "locks", timeout_s=0).hold("m"):  # released after the outer block
        pass


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b", "..", "", "x" * 500, "mod\x00el", "é model"])
def test_lock_files_stay_in_their_directory_whatever_the_model_name(tmp_path: Path, name: str) -> None:
    locks = FileLocks(tmp_path / "locks", timeout_s=0)
    path = locks.path(name)
    assert path.parent == tmp_path / "locks" and "/" not in path.name and len(path.name) < 100
    assert lock_file_name(name) != lock_file_name(name + "_")  # the hash keeps near-identical names apart
    with locks.hold(name):
        assert path.exists()


def test_a_status_write_from_a_stale_read_is_refused(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": released("1"), "2": info("2")}, champion="1")
    st = state(svc, tmp_path)
    status = ramp.start_or_resume(svc, st)
    first, second = ramp.load_status(svc, "m", "2"), ramp.load_status(svc, "m", "2")
    saved = ramp.save_status(svc, "m", replace(first, weight=50.0))
    assert saved.generation == status.generation + 1
    with pytest.raises(StatusConflict, match="persisted generation 2.*written from generation 1") as err:
        ramp.save_status(svc, "m", replace(second, phase=Phase.ROLLED_BACK))
    assert err.value.persisted == saved and ramp.load_status(svc, "m", "2") == saved
    with pytest.raises(StatusConflict):  # a ramp analysis holding an old status stops before touching the router
        ramp.analyse(svc, st, status, source=Source(), now=status.started_at + 30)
    assert svc.router.table["m"]["weight"] == 10.0


class BlockingSource(Source):
    """A metrics source that blocks inside the analysis (under the lock) until released."""

    def __init__(self) -> None:
        super().__init__()
        self.inside, self.go = threading.Event(), threading.Event()

    def window(self, model: str, start: float, end: float) -> Window:
        self.inside.set()
        assert self.go.wait(WAIT_S)
        return super().window(model, start, end)


def ramping(tmp_path: Path):  # noqa: ANN201 - (svc, st, status)
    svc = services(tmp_path, {"1": released("1"), "2": info("2")}, champion="1", previous="1")
    svc.locks = SpyLocks(tmp_path / "locks")
    st = state(svc, tmp_path)
    return svc, st, ramp.start_or_resume(svc, st)


def test_a_rollback_landing_during_an_analysis_wins(tmp_path: Path) -> None:
    svc, st, status = ramping(tmp_path)
    source = BlockingSource()
    analysis = Worker(lambda: ramp.analyse(svc, st, status, source=source, now=status.started_at + 30))
    analysis.start()
    assert source.inside.wait(WAIT_S)  # the analysis measured the window, holding the lock
    rb = Worker(lambda: rollback.rollback(svc, "m", "1", "operator", "alice"))
    rb.start()
    assert svc.locks.contended.wait(WAIT_S)  # the rollback waits for the analysis to finish
    source.go.set()
    decision = analysis.finish()
    assert decision.action is Action.ADVANCE  # the analysis finished first, consistently
    rb.finish()
    assert svc.router.table["m"] == {"stable": "1"} and "2" not in svc.backend.registered
    assert ramp.load_status(svc, "m", "2").phase is Phase.ROLLED_BACK
    changes = svc.router.changes
    after = ramp.analyse(svc, st, decision.status, source=Source(), now=status.started_at + 60)
    assert after.action is Action.ROLLBACK and "operator" in after.reasons[0]
    assert svc.router.changes == changes and svc.router.table["m"] == {"stable": "1"}  # no split re-applied
    assert ramp.load_status(svc, "m", "2").phase is Phase.ROLLED_BACK


def test_an_analysis_landing_during_a_rollback_stops_without_applying(tmp_path: Path) -> None:
    svc, st, status = ramping(tmp_path)
    inside, go = threading.Event(), threading.Event()
    unregister = svc.backend.unregister

    def blocking_unregister(model: str, version: str) -> None:
        inside.set()
        assert go.wait(WAIT_S)
        unregister(model, version)

    svc.backend.unregister = blocking_unregister
    rb = Worker(lambda: rollback.rollback(svc, "m", "1", "freeze", "bob"))
    rb.start()
    assert inside.wait(WAIT_S)  # the rollback routed the champion back and is taking the candidate off TorchServe
    analysis = Worker(lambda: ramp.analyse(svc, st, status, source=Source(), now=status.started_at + 30))
    analysis.start()
    assert svc.locks.contended.wait(WAIT_S)  # the analysis waits for the rollback
    changes = svc.router.changes
    go.set()
    rb.finish()
    decision = analysis.finish()
    assert decision.action is Action.ROLLBACK and "freeze" in decision.reasons[0]
    assert svc.router.changes == changes and svc.router.table["m"] == {"stable": "1"}
    assert svc.registry.versions["2"].tags[Tag.STATUS] == "rolled_back" and "2" not in svc.backend.registered
    assert ramp.load_status(svc, "m", "2").phase is Phase.ROLLED_BACK


def test_retire_checks_and_unregisters_under_the_lock(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": released("1"), "2": released("2")}, route={"stable": "2"}, champion="2")
    svc.locks = FileLocks(tmp_path / "locks", timeout_s=0)
    with FileLocks(tmp_path / "locks").hold("m"):  # a rollback in another process: retire waits, never slips in
        with pytest.raises(LockTimeout, match="retire v1"):
            ramp.retire(svc, "m", "1", 0)
    assert "1" in svc.backend.registered
    assert ramp.retire(svc, "m", "1", 0).startswith("v1 retired") and "1" not in svc.backend.registered
    assert ramp.retire(svc, "m", "2", 0) == "v2 is routed again; kept"


def test_releases_of_one_model_take_turns_and_a_killed_run_frees_its_slot_at_once(tmp_path: Path) -> None:
    """The release slot (canaryflow.core.locks.release_slot): a release of another model goes on beside it, a second
    release of the same model waits (here: gives up), and the moment the holder's process is killed the next
    release gets it (no lease to run out: the run reconcile starts after a crash does not wait)."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from canaryflow.core.locks import release_slot

    svc = SimpleNamespace(paths=SimpleNamespace(root=tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, types; from pathlib import Path; from canaryflow.core.locks import release_slot\n"
        f"svc = types.SimpleNamespace(paths=types.SimpleNamespace(root=Path({str(tmp_path)!r})))\n"
        "with release_slot(svc, 'iris?', 5):\n    print('held', flush=True); sys.stdin.read()\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # holds it until killed (or its stdin closes)
    try:
        assert holder.stdout.readline().strip() == "held"
        with release_slot(svc, "iris", 5):  # another model (a name one character apart) is not blocked
            pass
        with pytest.raises(LockTimeout, match="release slot of model 'iris\\?'.*Another release of the model"), \
                release_slot(svc, "iris?", 0.2):
            pass
    finally:
        holder.kill()
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()
    with release_slot(svc, "iris?", WAIT_S):  # freed by the kernel when the holder died
        pass
