"""Prefect task wrappers of the manual and scheduled operations: rollback and reconcile (a few lines each)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from canaryflow.release import reconcile as rc
from canaryflow.release import rollback as rb
from canaryflow.services import get_services


@task(name="rollback", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=3)
def rollback(model_name: str, to_version: str | None, reason: str, requested_by: str) -> dict[str, str]:
    return rb.rollback(get_services(), model_name, to_version, reason, requested_by)


@task(name="reconcile", cache_policy=NO_CACHE)
def reconcile_pass() -> list[str]:
    svc = get_services()
    return rc.reconcile(svc, svc.launcher)
