"""The canary ramp of a release as plain steps: start or resume, analyse-and-apply, promote, roll back, retire.

The controller (deployments/canary.py) decides; these functions apply its decisions to the router, TorchServe and
the registry, and persist the status as JSON in the candidate version's ``canaryflow.canary`` tag *after* the
router change, so a crash in between leaves a router ahead of the tag, which reconcile repairs to the tag.
Every analysis is recorded: MLflow metrics with the analysis number as step, and a JSON line in the release's
work dir (for the table artifact and the PNG timeline).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

from canaryflow.core import locks, seal
from canaryflow.core.errors import MetricsSourceError
from canaryflow.core.locks import StatusConflict
from canaryflow.core.state import ReleaseStatus, Route, Tag
from canaryflow.release import ramp_report, replay
from canaryflow.release.converge import DELETE, converge, refuses_promotion
from canaryflow.release.steps import ReleaseState
from canaryflow.services import Services
from deployments import canary as ctl
from deployments.metrics import FLUSH_DELAY_S, MetricsSource
from validation.results import judged


def load_status(svc: Services, model: str, version: str) -> ctl.CanaryStatus | None:
    """The persisted ramp status of a version, or None when it never started a ramp or its tag does not carry
    the pipeline's seal (forged or edited by a registry user: logged, never acted on)."""
    return _read(svc, model, version)[0]


def _read(svc: Services, model: str, version: str) -> tuple[ctl.CanaryStatus | None, bool]:
    """(the verified status or None, whether a tag was there that did not verify)."""
    raw = svc.registry.get_version(model, version).tags.get(Tag.CANARY)
    if not raw:
        return None, False
    body = seal.open_json(svc.paths, model, version, raw)
    return (ctl.CanaryStatus.from_json(body), False) if body is not None else (None, True)


def save_status(svc: Services, model: str, status: ctl.CanaryStatus) -> ctl.CanaryStatus:
    """Compare-and-set: persist ``status`` if the persisted one still has the generation ``status`` was read
    from; returns what was written (generation + 1). Raises :class:`StatusConflict` (with the persisted status)
    when someone else wrote in between."""
    with locks.hold(svc, model, f"save the ramp status of v{status.candidate}"):
        persisted, forged = _read(svc, model, status.candidate)
        # a forged tag says nothing about who owns the ramp: the writer holding the real status overwrites it
        current = persisted.generation if persisted is not None else status.generation if forged else 0
        if current != status.generation:
            raise StatusConflict(
                f"ramp status of {model} v{status.candidate} changed under this writer: persisted generation "
                f"{current} ({persisted.phase.value if persisted else 'none'}), written from generation "
                f"{status.generation}; re-read it before acting", persisted)
        saved = replace(status, generation=current + 1)
        tags = {Tag.CANARY: seal.seal_json(svc.paths, model, saved.candidate, saved.to_json())}
        if saved.heartbeat_at:
            tags[Tag.HEARTBEAT] = f"{saved.heartbeat_at:.3f}"
        svc.registry.set_tags(model, saved.candidate, tags)
        return saved


def heartbeat(svc: Services, model: str, version: str, now: float | None = None) -> float:
    """The release flow is alive: write ``canaryflow.heartbeat`` (epoch s) on the version being released."""
    now = time.time() if now is None else now
    svc.registry.set_tags(model, version, {Tag.HEARTBEAT: f"{now:.3f}"})
    return now


def last_heartbeat(tags: dict[str, str]) -> float:
    """The latest sign of life a release flow left on a version's tags (0.0: none)."""
    beats = [0.0]
    try:
        beats.append(float(tags.get(Tag.HEARTBEAT) or 0.0))
    except ValueError:
        pass  # a user-writable tag: garbage means no signal
    raw = tags.get(Tag.CANARY)
    if raw:
        try:
            beats.append(float(ctl.CanaryStatus.from_json(raw).heartbeat_at))
        except (ValueError, TypeError, KeyError):
            pass
    return max(beats)


class Heartbeat:
    """Writes the heartbeat of one release every ``every_s`` from a daemon thread, for the life of the flow
    process: a killed process stops beating, which is what reconcile looks for."""

    def __init__(self, svc: Services, model: str, version: str, every_s: float) -> None:
        self.svc, self.model, self.version, self.every_s = svc, model, version, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{version}", daemon=True)

    def start(self) -> Heartbeat:
        heartbeat(self.svc, self.model, self.version)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                heartbeat(self.svc, self.model, self.version)
            except Exception:  # noqa: BLE001 - a missed beat is retried next time; the flow must not die of it
                continue

    def stop(self) -> None:
        self._stop.set()


def desired_route(status: ctl.CanaryStatus) -> Route:
    """What the router serves in a ramp's state."""
    if status.phase in (ctl.Phase.PROMOTED, ctl.Phase.BAKING):
        return Route(status.candidate)
    if status.phase is ctl.Phase.ROLLED_BACK:
        return Route(status.champion)
    if status.shadow:
        return Route(status.champion, status.candidate, 100.0, shadow=True)
    return Route(status.champion, status.candidate, status.weight)


def apply_route(svc: Services, model: str, status: ctl.CanaryStatus) -> None:
    """Make serving match what ``status`` says."""
    converge(svc, model, desired_route(status))


def pending(svc: Services, st: ReleaseState) -> ctl.CanaryStatus | None:
    """A ramp of this candidate left half-way that can resume: same champion, candidate still on TorchServe."""
    status = load_status(svc, st.model, st.version)
    if status is None or status.done or not _same_ramp(status, st):
        return None
    try:
        registered = st.version in svc.backend.versions(st.model)
    except Exception:
        registered = False
    return status if registered else None


def _same_ramp(status: ctl.CanaryStatus, st: ReleaseState) -> bool:
    """The persisted ramp is this release's: same champion, or a bake whose promotion already moved the alias."""
    return status.champion == st.champion or (status.phase is ctl.Phase.BAKING and st.champion == st.version)


def promote_for_bake(svc: Services, model: str, status: ctl.CanaryStatus) -> ctl.CanaryStatus:
    """At 100%: the candidate becomes the champion (route, TorchServe default, aliases) while the bake watches it;
    the previous champion stays registered, and is the ``previous`` alias. Returns the status with the alias it
    replaced, so an undo restores it."""
    status = replace(status, previous=svc.registry.alias_version(model, svc.settings.release.previous_alias))
    converge(svc, model, Route(status.candidate), champion=status.candidate, previous=status.champion)
    return status


def undo_bake(svc: Services, model: str, status: ctl.CanaryStatus) -> None:
    """A bake that failed: the previous champion serves again, as champion, before anything else happens."""
    converge(svc, model, Route(status.champion), champion=status.champion, previous=status.previous or DELETE)


def start_or_resume(svc: Services, st: ReleaseState) -> ctl.CanaryStatus:
    """Resume the persisted ramp of this candidate, or start a new one against the current champion; returns the
    persisted status (apply, save and tag happen under the model's state lock)."""
    with locks.hold(svc, st.model, f"start the ramp of v{st.version}"):
        return _start_or_resume(svc, st)


def _start_or_resume(svc: Services, st: ReleaseState) -> ctl.CanaryStatus:
    persisted = status = load_status(svc, st.model, st.version)
    if status is None or status.done or not _same_ramp(status, st):
        status = replace(ctl.start(st.champion or "", st.version, st.policy.canary, time.time()),
                         generation=persisted.generation if persisted else 0)
        st.notes.append(f"canary started at {status.weight:g}%{' (shadow)' if status.shadow else ''}")
    else:
        st.notes.append(f"canary resumed at {status.weight:g}% after {status.iterations} analyses")
    apply_route(svc, st.model, status)
    status = save_status(svc, st.model, replace(status, heartbeat_at=time.time()))
    svc.registry.set_tags(st.model, st.version, {Tag.STATUS: ReleaseStatus.CANARY,
                                                 Tag.REASON: f"canary at {status.weight:g}%"})
    return status


def analyse(svc: Services, st: ReleaseState, status: ctl.CanaryStatus,
            source: MetricsSource | None = None, now: float | None = None) -> ctl.Decision:
    """Measure the step's window, decide, apply the decision, persist and record it, all under the model's state
    lock: a rollback that landed before it is seen here and nothing is re-applied."""
    with locks.hold(svc, st.model, f"analyse the ramp of v{st.version}"):
        return _analyse(svc, st, status, source, now)


def _analyse(svc: Services, st: ReleaseState, status: ctl.CanaryStatus,
             source: MetricsSource | None, now: float | None) -> ctl.Decision:
    persisted, forged = _read(svc, st.model, st.version)
    if forged:  # a registry user wrote the tag: carry on from this run's own status, which the save restores
        persisted = status
    if persisted is not None and persisted.done and not status.done:
        # someone else ended the ramp (a manual rollback): respect it
        return ctl.Decision(ctl.Action.ROLLBACK if persisted.phase is ctl.Phase.ROLLED_BACK else ctl.Action.PROMOTE,
                            persisted, [], persisted.reasons or [f"ramp ended elsewhere: {persisted.phase.value}"])
    if persisted is None or persisted.generation != status.generation:
        raise StatusConflict(f"ramp status of {st.model} v{st.version} is at generation "
                             f"{persisted.generation if persisted else 'none'}, this run holds {status.generation}: "
                             "another writer owns the ramp; this run stops without touching the router", persisted)
    now = time.time() if now is None else now
    m = measure(svc, st, status, source or svc.metrics, now)
    decision = apply(svc, st, status, ctl.decide(status, m, st.policy.canary), now)
    ramp_report.record(svc, st, decision, m.window, now, measured_weight=status.weight)
    if decision.status.done:
        # not "weight": gate numbers go to MLflow as "<gate>.<key>" at step 0, and canary.weight is the ramp's series
        weights = [line.get("measured_weight", 0.0) for line in ramp_report.read_timeline(st)]
        st.results.append(judged("canary", decision.action is ctl.Action.PROMOTE, "; ".join(decision.reasons),
                                 {"analyses": decision.status.iterations, "decided_at_weight": status.weight,
                                  "max_weight": max([status.weight, *weights]),
                                  "failed_analyses": decision.status.failed_checks},
                                 {"steps": st.policy.canary.steps}))
    return decision


def retire(svc: Services, model: str, version: str, grace_s: float) -> str:
    """Unregister a former champion from TorchServe after the grace period, unless it serves again."""
    if grace_s > 0:
        time.sleep(grace_s)
    with locks.hold(svc, model, f"retire v{version}"):  # check and unregister with no rollback in between
        route = svc.router.routes().get(model, {})
        if version in (route.get("stable"), route.get("canary")):
            return f"v{version} is routed again; kept"
        try:
            svc.backend.unregister(model, version)
        except Exception as exc:
            return f"retiring v{version} failed: {exc}"
    return f"v{version} retired from TorchServe after {grace_s:g} s (its .mar stays in the model store)"


def measure(svc: Services, st: ReleaseState, status: ctl.CanaryStatus, source: MetricsSource,
            now: float) -> ctl.Measurements:
    """The step's window from the metrics source (an unreadable source is measured as such, not as a model
    failure) and, with the replay on, the same live rows answered by both versions out of band: what a split
    alone cannot compare."""
    pairs = replay.collect(svc, st, status, now) if st.policy.canary.replay else None
    try:
        return ctl.Measurements(source.window(st.model, status.step_started_at, now - FLUSH_DELAY_S), now,
                                pairs=pairs)
    except MetricsSourceError as exc:
        return ctl.Measurements(None, now, str(exc), pairs=pairs)


def apply(svc: Services, st: ReleaseState, before: ctl.CanaryStatus, decision: ctl.Decision,
          now: float) -> ctl.Decision:
    """Make serving match the decision (a bake promotes, a failed bake is undone, a step moves the split; a hold
    changes nothing) and persist the new status; returns the decision with the status as saved. A chaos build that
    reaches promotion is rolled back instead: fault injection never serves as champion."""
    if decision.action in (ctl.Action.BAKE, ctl.Action.PROMOTE) and refuses_promotion(svc, st.model, st.version):
        decision = ctl.veto(decision, f"v{st.version} is a chaos build (fault injection): never promoted "
                                      "(canary.chaos_may_promote is off); rolled back")
    if decision.action is ctl.Action.BAKE:
        decision = replace(decision, status=promote_for_bake(svc, st.model, decision.status))
    elif decision.action is ctl.Action.ROLLBACK and before.phase is ctl.Phase.BAKING:
        undo_bake(svc, st.model, decision.status)
    elif decision.action is not ctl.Action.HOLD:
        apply_route(svc, st.model, decision.status)
    return replace(decision, status=save_status(svc, st.model, replace(decision.status, heartbeat_at=now)))
