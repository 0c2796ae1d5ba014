"""release(model_name, version): a registered MLflow version -> served by TorchServe behind the router.

Started by the webhook bridge (one run per MLflow delivery), by reconcile, or by hand. Steps: begin, fetch, then the
gates contract -> shape -> data -> drift -> quality -> optimization (the chosen variant is what gets served), archive,
stage (register + warm-up + smoke test), load test, then the canary ramp against the champion (none for a first
release), then promote and retire the old champion. Anything that fails leaves the champion serving and tags the
version with the gate (or the canary checks) and the reason. A ramp left half-way by a crashed run resumes from its
persisted status when the release is run again.

Outcomes are Prefect states (canaryflow/release/story.py names them): Completed "Released" (or "Skipped",
"Superseded"), Failed "Rejected" / "RolledBack" / "Failed" with the headline as the message and no traceback. The
run's result is always {"status", "reason"}. Only an unexpected error (a bug, an outage) is raised, after the same
cleanup, so Prefect shows its traceback.
"""

from __future__ import annotations

import logging
import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from canaryflow.core import locks
from canaryflow.core.errors import CanaryflowError, CanaryRolledBack, Refused
from canaryflow.core.state import ReleaseStatus
from canaryflow.release import narrate
from canaryflow.release import story as tale
from canaryflow.release.ramp import Heartbeat
from canaryflow.release.steps import UNFINISHED, Ending, ReleaseState, ending, expected, needs_canary, skip
from canaryflow.services import get_services
from deployments.canary import Action, CanaryStatus, Phase
from tasks import canary as c
from tasks import gates as g
from tasks import release_steps as t
from tasks.outcomes import unwrap
from tasks.report import artifact_key, release_summary


@flow(name="release", log_prints=True)
def release(model_name: str, version: str, allow_older: bool = False) -> dict[str, str]:
    """Release one model version; the run's result is {"status", "reason"} and its state is named after the
    status (see the module doc). A version older than the champion is refused (tagged ``skipped``) unless
    ``allow_older`` (a person asked for it)."""
    _quiet_engine_log()
    svc = get_services()
    with locks.release_slot(svc, model_name, svc.settings.release.slot_wait_s):  # one release per model at a time
        outcome, message = _release(model_name, str(version), allow_older)
    return as_state(outcome, message)  # type: ignore[return-value] - a state whose data is the dict


def as_state(outcome: dict[str, str], message: str = "") -> State:
    """The terminal state of a release run: Failed for rejected / rolled back / failed, Completed otherwise, named
    after the outcome, the headline (or the reason) as its message. A Completed run's result is {"status",
    "reason"}; a Failed run's is a :class:`ReleaseEnded` carrying that dict as ``.outcome`` (Prefect raises a
    failed run's result when the process ends; an exception is what it can raise, and :class:`QuietOutcome` keeps
    that expected raise out of the run's log)."""
    name, text = tale.state_name(outcome["status"]), (message or outcome["reason"])[:2000]
    if outcome["status"] in tale.FAILED_STATES:
        return Failed(name=name, message=text, data=ReleaseEnded(text, outcome))
    return Completed(name=name, message=text, data=outcome)


class ReleaseEnded(CanaryflowError):
    """A release that ended rejected, rolled back or failed: an outcome, not an error (the run's Failed state)."""

    def __init__(self, headline: str, outcome: dict[str, str]) -> None:
        super().__init__(headline)
        self.outcome = {"status": str(outcome["status"]), "reason": str(outcome["reason"])}

    def __reduce__(self) -> tuple[type, tuple[str, dict[str, str]]]:  # results may be pickled
        return type(self), (str(self), self.outcome)


class QuietOutcome(logging.Filter):
    """Drops the flow engine's "Engine execution exited with unexpected exception" traceback when the exception is
    the :class:`ReleaseEnded` of an expected outcome (the engine raises a failed run's result when the process
    ends); any other exception is logged as before."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, ReleaseEnded)


def _quiet_engine_log() -> None:
    logger = logging.getLogger("prefect.flow_runs")
    if not any(isinstance(f, QuietOutcome) for f in logger.filters):
        logger.addFilter(QuietOutcome())


def _release(model_name: str, version: str, allow_older: bool) -> tuple[dict[str, str], str]:
    log = get_run_logger()
    try:
        st = unwrap(t.begin(model_name, version))
    except Refused as exc:  # a name or policy a registry user wrote: tagged rejected by begin
        return {"status": ReleaseStatus.REJECTED, "reason": str(exc)}, ""
    skipped = skip(st, allow_older)
    if skipped is not None:
        log.warning("v%s of %s: nothing to release: %s", st.version, st.model, skipped.reason)
        if skipped.status is ReleaseStatus.SKIPPED:
            t.finish(st, skipped.status, skipped.reason)
        return {"status": skipped.status, "reason": skipped.reason}, ""
    end, error, headline = UNFINISHED, None, ""
    svc = get_services()
    beat = Heartbeat(svc, st.model, st.version, svc.settings.reconcile.heartbeat_s).start()  # reconcile's liveness
    try:
        resume = unwrap(c.pending(st))
        if resume is None:
            gates(st)
        else:
            log.info("resuming the canary of v%s at %s%% (gates passed in an earlier run)", st.version,
                     resume.weight)
            if resume.phase is Phase.BAKING:  # promoted already: the champion alias names the candidate
                st.champion = resume.champion
        if needs_canary(st):
            ramp(st)
        end = Ending(ReleaseStatus.RELEASED, t.promote(st))
    except Exception as exc:
        end = ending(exc)
        error = None if expected(exc) else exc  # an outcome ends in a named state; an error keeps its traceback
    finally:
        beat.stop()
        if not end.owns_state:  # a duplicate run lost the ramp to another: the winner records the outcome
            log.warning("release of %s v%s stops without touching its state: %s", st.model, st.version, end.reason)
        else:
            reason = end.reason
            if end.status != ReleaseStatus.RELEASED:
                log.warning("release of %s v%s %s: %s", st.model, st.version, end.status, reason)
                reason = t.stop(st, reason)
            t.finish(st, end.status, reason)
            story = narrate.story_of(svc, st, end.status, reason)
            headline = story.headline()
            log.info("%s", headline)
            release_summary(st, end.status, reason, story)
    if error is not None:
        raise error
    if end.status == ReleaseStatus.RELEASED and st.champion and st.champion != st.version:
        log.info(c.retire(st.model, st.champion, st.policy.canary.retire_grace_s))
    return {"status": end.status, "reason": end.reason}, headline


def gates(st: ReleaseState) -> None:
    """Every gate up to a staged, load-tested candidate; raises GateFailed at the first that fails (its task run
    ends in a named Failed state, see tasks/outcomes.py)."""
    model_dir = unwrap(t.fetch(st))
    unwrap(g.contract(st, model_dir))
    try:  # the gates that run the model's own code share one sandboxed process
        unwrap(t.shape(st, model_dir))
        release_data = unwrap(g.data(st, model_dir))
        unwrap(g.drift(st, release_data))
        unwrap(g.quality(st, model_dir, release_data))
        bundle = unwrap(g.optimize(st, model_dir, release_data))
    finally:
        st.close_sandbox()
    mar = unwrap(t.archive(st, bundle))
    unwrap(t.stage(st, mar, model_dir))
    unwrap(g.load_test(st, release_data.features(release_data.holdout)))


def ramp(st: ReleaseState) -> CanaryStatus:
    """Move live traffic onto the candidate step by step until the controller promotes or rolls back."""
    log = get_run_logger()
    policy = st.policy.canary
    status = c.start(st)
    progress = create_progress_artifact(status.weight, key=f"{artifact_key(st.model, st.version)}-progress",
                                        description=f"canary of {st.model} v{st.version}: candidate traffic %")
    top = status.weight
    try:
        while True:
            time.sleep(policy.interval_s)
            measured = status.weight
            decision = unwrap(c.analyse(st, status, status.iterations + 1))
            status = decision.status
            top = max(top, measured, status.weight if not status.done else 0.0)
            if decision.action is Action.ROLLBACK:
                # the bar keeps the share the candidate reached; the description says it is off live traffic now
                update_progress_artifact(progress, measured, description=(
                    f"canary of {st.model} v{st.version}: rolled back at analysis {status.iterations} "
                    f"({measured:g}% measured, highest {top:g}%); candidate now at 0%"))
                raise CanaryRolledBack("; ".join(decision.reasons))
            update_progress_artifact(progress, status.weight, description=(
                f"canary of {st.model} v{st.version}: {status.weight:g}% after analysis {status.iterations} "
                f"({decision.action.value})"))
            if decision.action is Action.PROMOTE:
                return status
            if decision.action is Action.BAKE:
                log.info("v%s promoted; watching it for %g s with v%s still registered", st.version,
                         policy.bake_s, status.champion)
    finally:
        c.report(st)
