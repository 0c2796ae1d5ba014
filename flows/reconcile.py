"""reconcile(): catch missed webhooks, finish or roll back half-way releases, repair the router.

An interval deployment (prefect.yaml); safe to run by hand at any time. See canaryflow/release/reconcile.py.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from canaryflow.intake.launcher import PrefectLauncher
from canaryflow.release import reconcile as rc
from canaryflow.services import get_services


@task(name="reconcile", cache_policy=NO_CACHE)
def reconcile_pass() -> list[str]:
    svc = get_services()
    launcher = PrefectLauncher(svc.settings.prefect_api_url, svc.settings.prefect.release_deployment)
    return rc.reconcile(svc, launcher)


@flow(name="reconcile", log_prints=True)
def reconcile() -> list[str]:
    """One reconcile pass; returns (and logs) every action taken."""
    log = get_run_logger()
    actions = reconcile_pass()
    for line in actions:
        log.info(line)
    if actions:
        create_markdown_artifact(key="reconcile-last-actions", markdown="# Reconcile\n\n" +
                                 "\n".join(f"- {a}" for a in actions), description="what the last reconcile did")
    else:
        log.info("nothing to reconcile")
    return actions
