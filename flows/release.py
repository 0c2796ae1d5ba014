"""release(model_name, version): a registered MLflow version -> served by TorchServe behind the router.

Started by the webhook bridge (one run per MLflow delivery) or by hand. Steps: begin, fetch, then the gates
contract -> shape -> data -> drift -> quality -> optimization (the chosen variant is what gets served), archive,
stage (register + warm-up + smoke test), load test, promote. The canary ramp will slot in before promote.
Anything that fails leaves the champion serving and tags the version with the gate and its reason.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from canaryflow.errors import GateFailed
from canaryflow.release import already_released
from tasks import gates as g
from tasks import release_steps as t
from tasks.report import release_summary


@flow(name="release", log_prints=True)
def release(model_name: str, version: str) -> dict[str, str]:
    """Release one model version; returns {"status", "reason"}."""
    log = get_run_logger()
    st = t.begin(model_name, str(version))
    if already_released(st):
        log.info("v%s of %s is already the released champion; nothing to do", st.version, st.model)
        return {"status": "released", "reason": "already released"}
    status, reason = "failed", "release did not finish"
    try:
        model_dir = t.fetch(st)
        g.contract(st, model_dir)
        t.shape(st, model_dir)
        release_data = g.data(st, model_dir)
        g.drift(st, release_data)
        g.quality(st, model_dir, release_data)
        bundle = g.optimize(st, model_dir, release_data)
        mar = t.archive(st, bundle)
        t.stage(st, mar, model_dir)
        g.load_test(st, release_data.features(release_data.holdout))
        status, reason = "released", t.promote(st)
    except GateFailed as exc:
        status, reason = "rejected", str(exc)
        raise
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if status != "released":
            log.error("release of %s v%s %s: %s", st.model, st.version, status, reason)
            reason = t.stop(st, reason)
        t.finish(st, status, reason)
        release_summary(st, status, reason)
    return {"status": status, "reason": reason}
