"""Prefect task wrappers of the release steps in canaryflow.release.steps (a few lines each)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from canaryflow.model.packaging import Bundle
from canaryflow.release import narrate, steps
from canaryflow.services import get_services
from deployments.archive import Archive
from tasks.outcomes import gate_task
from validation.results import GateResult


@task(name="begin", cache_policy=NO_CACHE)
@gate_task
def begin(model: str, version: str) -> steps.ReleaseState:
    return steps.begin(get_services(), model, version)


@task(name="fetch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3)
def fetch(st: steps.ReleaseState) -> Path:
    return steps.fetch(get_services(), st)


@task(name="shape-gate", cache_policy=NO_CACHE)
@gate_task
def shape(st: steps.ReleaseState, model_dir: Path) -> GateResult:
    return steps.shape(st, model_dir)


@task(name="archive", cache_policy=NO_CACHE)
def archive(st: steps.ReleaseState, bundle: Bundle) -> Archive:
    return steps.archive(get_services(), st, bundle)


@task(name="stage", cache_policy=NO_CACHE)
@gate_task
def stage(st: steps.ReleaseState, mar: Archive, model_dir: Path) -> GateResult:
    return steps.stage(get_services(), st, mar, model_dir)


@task(name="promote", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3)
def promote(st: steps.ReleaseState) -> str:
    return steps.promote(get_services(), st)


@task(name="stop", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3)
def stop(st: steps.ReleaseState, reason: str) -> str:
    return steps.stop(get_services(), st, reason)


@task(name="finish", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3)
def finish(st: steps.ReleaseState, status: str, reason: str) -> None:
    svc = get_services()
    steps.finish(svc, st, status, reason)
    narrate.tell(svc, st, status, reason)
