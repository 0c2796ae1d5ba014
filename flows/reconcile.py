"""reconcile(): catch missed webhooks, finish or roll back half-way releases, repair the router.

An interval deployment (prefect.yaml); safe to run by hand at any time. See canaryflow/release/reconcile.py.
A pass that did nothing is quiet: its run ends Completed "Idle", tagged ``reconcile-noop``, and the idle runs
before it are deleted (tasks/housekeeping.py), so the runs list shows releases and the reconciles that acted.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from tasks.housekeeping import quiet_idle_run
from tasks.operations import reconcile_pass


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
        return actions
    quiet_idle_run()
    return Completed(name="Idle", message="nothing to reconcile", data=actions)  # type: ignore[return-value]
