"""Prefect task wrappers of the canary ramp in canaryflow.release.ramp (a few lines each)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.states import Failed

from canaryflow.release import ramp, ramp_report
from canaryflow.release.steps import ReleaseState
from canaryflow.services import get_services
from deployments.canary import Action, CanaryStatus, Decision
from tasks.report import artifact_key
from validation.results import Outcome


@task(name="canary-pending", cache_policy=NO_CACHE)
def pending(st: ReleaseState) -> CanaryStatus | None:
    return ramp.pending(get_services(), st)


@task(name="canary-start", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3)
def start(st: ReleaseState) -> CanaryStatus:
    return ramp.start_or_resume(get_services(), st)


@task(name="canary-analysis", cache_policy=NO_CACHE, task_run_name="canary-analysis-{number}")
def analyse(st: ReleaseState, status: CanaryStatus, number: int) -> Decision | State:
    """Analysis ``number`` (1-based, as in the logs and the MLflow steps). Its result is logged in one line; when
    checks failed the task run ends in a Failed state named after the decision (``ChecksFailed`` while holding,
    ``RolledBack`` at the end), no traceback: the flow reads the decision back with ``unwrap``."""
    decision = ramp.analyse(get_services(), st, status)
    line = ramp_report.decision_line(decision, status.weight)
    failed = [c for c in decision.checks if c.outcome is Outcome.FAILED]
    if decision.action is Action.ROLLBACK or failed:
        get_run_logger().warning("%s", line)
        name = "RolledBack" if decision.action is Action.ROLLBACK else "ChecksFailed"
        return Failed(name=name, message=line[:2000], data=decision)
    get_run_logger().info("%s", line)
    return decision


@task(name="retire", cache_policy=NO_CACHE)
def retire(model: str, version: str, grace_s: float) -> str:
    return ramp.retire(get_services(), model, version, grace_s)


@task(name="canary-report", cache_policy=NO_CACHE)
def report(st: ReleaseState) -> None:
    """Timeline PNG into the release run, every check as a Prefect table."""
    svc = get_services()
    png = ramp_report.write_timeline_png(st, st.workdir / "canary_timeline.png")
    files = [p for p in (png, ramp_report.timeline_file(st)) if p is not None and p.exists()]
    svc.registry.log_to_run(st.run_id, files=files, artifact_path="canary")
    rows = ramp_report.checks_table(st)
    if rows:
        create_table_artifact(table=rows, key=f"{artifact_key(st.model, st.version)}-canary",
                              description=f"canary analyses of {st.model} v{st.version}")
