"""release(model_name, version): a registered MLflow version -> served by TorchServe behind the router.

Started by the webhook bridge (one run per MLflow delivery), by reconcile, or by hand. Steps: begin, fetch, then the
gates contract -> shape -> data -> drift -> quality -> optimization (the chosen variant is what gets served), archive,
stage (register + warm-up + smoke test), load test, then the canary ramp against the champion (none for a first
release), then promote and retire the old champion. Anything that fails leaves the champion serving and tags the
version with the gate (or the canary checks) and the reason. A ramp left half-way by a crashed run resumes from its
persisted status when the release is run again.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from canaryflow.core import locks
from canaryflow.core.errors import CanaryRolledBack
from canaryflow.core.state import ReleaseStatus
from canaryflow.release.ramp import Heartbeat
from canaryflow.release.steps import UNFINISHED, Ending, ReleaseState, ending, needs_canary, skip
from canaryflow.services import get_services
from deployments.canary import Action, CanaryStatus, Phase
from tasks import canary as c
from tasks import gates as g
from tasks import release_steps as t
from tasks.report import artifact_key, release_summary


@flow(name="release", log_prints=True)
def release(model_name: str, version: str, allow_older: bool = False) -> dict[str, str]:
    """Release one model version; returns {"status", "reason"}. A version older than the champion is refused
    (tagged ``skipped``) unless ``allow_older`` (a person asked for it)."""
    svc = get_services()
    with locks.release_slot(svc, model_name, svc.settings.release.slot_wait_s):  # one release per model at a time
        return _release(model_name, str(version), allow_older)


def _release(model_name: str, version: str, allow_older: bool) -> dict[str, str]:
    log = get_run_logger()
    st = t.begin(model_name, version)
    skipped = skip(st, allow_older)
    if skipped is not None:
        log.warning("v%s of %s: nothing to release: %s", st.version, st.model, skipped.reason)
        if skipped.status is ReleaseStatus.SKIPPED:
            t.finish(st, skipped.status, skipped.reason)
        return {"status": skipped.status, "reason": skipped.reason}
    end = UNFINISHED
    svc = get_services()
    beat = Heartbeat(svc, st.model, st.version, svc.settings.reconcile.heartbeat_s).start()  # reconcile's liveness
    try:
        resume = c.pending(st)
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
        raise
    finally:
        beat.stop()
        if not end.owns_state:  # a duplicate run lost the ramp to another: the winner records the outcome
            log.warning("release of %s v%s stops without touching its state: %s", st.model, st.version, end.reason)
        else:
            reason = end.reason
            if end.status != ReleaseStatus.RELEASED:
                log.error("release of %s v%s %s: %s", st.model, st.version, end.status, reason)
                reason = t.stop(st, reason)
            t.finish(st, end.status, reason)
            release_summary(st, end.status, reason)
    if st.champion and st.champion != st.version:
        log.info(c.retire(st.model, st.champion, st.policy.canary.retire_grace_s))
    return {"status": end.status, "reason": end.reason}


def gates(st: ReleaseState) -> None:
    """Every gate up to a staged, load-tested candidate; raises GateFailed at the first that fails."""
    model_dir = t.fetch(st)
    g.contract(st, model_dir)
    try:  # the gates that run the model's own code share one sandboxed process
        t.shape(st, model_dir)
        release_data = g.data(st, model_dir)
        g.drift(st, release_data)
        g.quality(st, model_dir, release_data)
        bundle = g.optimize(st, model_dir, release_data)
    finally:
        st.close_sandbox()
    mar = t.archive(st, bundle)
    t.stage(st, mar, model_dir)
    g.load_test(st, release_data.features(release_data.holdout))


def ramp(st: ReleaseState) -> CanaryStatus:
    """Move live traffic onto the candidate step by step until the controller promotes or rolls back."""
    log = get_run_logger()
    policy = st.policy.canary
    status = c.start(st)
    progress = create_progress_artifact(status.weight, key=f"{artifact_key(st.model, st.version)}-progress",
                                        description=f"canary of {st.model} v{st.version}: candidate traffic %")
    try:
        while True:
            time.sleep(policy.interval_s)
            decision = c.analyse(st, status)
            status = decision.status
            log.info("canary analysis %d: %s at %g%%: %s", status.iterations, decision.action.value, status.weight,
                     "; ".join(decision.reasons))
            update_progress_artifact(progress, status.weight)
            if decision.action is Action.ROLLBACK:
                raise CanaryRolledBack("; ".join(decision.reasons))
            if decision.action is Action.PROMOTE:
                return status
            if decision.action is Action.BAKE:
                log.info("v%s promoted; watching it for %g s with v%s still registered", st.version,
                         policy.bake_s, status.champion)
    finally:
        c.report(st)
