"""release(model_name, version): a registered MLflow version -> served by TorchServe behind the router.

Started by the webhook bridge (one run per MLflow delivery) or by hand. Steps: begin, fetch, package
(export + shape gate), archive, stage (register + warm-up + smoke test), promote. The gates of later
releases (contract, data, drift, quality, optimization, load test) and the canary ramp slot in between
stage and promote. Anything that fails leaves the champion serving and tags the version with the reason.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from canaryflow.errors import GateFailed
from canaryflow.release import already_released
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
        bundle = t.package(st, model_dir)
        mar = t.archive(st, bundle)
        t.stage(st, mar, model_dir)
        t.promote(st)
        status, reason = "released", f"v{st.version} is now champion"
    except GateFailed as exc:
        status, reason = "rejected", str(exc)
        raise
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if status != "released":
            log.error("release of %s v%s %s: %s", st.model, st.version, status, reason)
            t.stop(st, status, reason)
        t.finish(st, status)
        release_summary(st, status, reason)
    return {"status": status, "reason": reason}
