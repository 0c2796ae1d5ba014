"""Prefect task wrappers of the canary ramp in canaryflow.release.ramp (a few lines each)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from canaryflow.release import ramp, ramp_report
from canaryflow.release.steps import ReleaseState
from canaryflow.services import get_services
from deployments.canary import CanaryStatus, Decision
from tasks.report import artifact_key


@task(name="canary-pending", cache_policy=NO_CACHE)
def pending(st: ReleaseState) -> CanaryStatus | None:
    return ramp.pending(get_services(), st)


@task(name="canary-start", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3)
def start(st: ReleaseState) -> CanaryStatus:
    return ramp.start_or_resume(get_services(), st)


@task(name="canary-analysis", cache_policy=NO_CACHE, task_run_name="canary-analysis-{status.iterations}")
def analyse(st: ReleaseState, status: CanaryStatus) -> Decision:
    return ramp.analyse(get_services(), st, status)


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
