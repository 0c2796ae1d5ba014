"""Prefect task wrappers of the release gates in canaryflow.release.gates (a few lines each). Each logs its
result in one line; a refusal ends the task run as a named Failed state (tasks/outcomes.py), read back by the flow
with ``unwrap``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from canaryflow.model.datasets import ReleaseData
from canaryflow.model.packaging import Bundle
from canaryflow.release import gates
from canaryflow.release.steps import ReleaseState
from canaryflow.services import get_services
from tasks.outcomes import gate_task
from validation.results import GateResult


@task(name="contract-gate", cache_policy=NO_CACHE)
@gate_task
def contract(st: ReleaseState, model_dir: Path) -> GateResult:
    return gates.contract(get_services(), st, model_dir)


@task(name="data-gate", cache_policy=NO_CACHE)
@gate_task
def data(st: ReleaseState, model_dir: Path) -> ReleaseData:
    return gates.data(get_services(), st, model_dir)


@task(name="drift-gate", cache_policy=NO_CACHE)
@gate_task
def drift(st: ReleaseState, release_data: ReleaseData) -> GateResult:
    return gates.drift(get_services(), st, release_data)


@task(name="quality-gate", cache_policy=NO_CACHE)
@gate_task
def quality(st: ReleaseState, model_dir: Path, release_data: ReleaseData) -> GateResult:
    return gates.quality(get_services(), st, model_dir, release_data)


@task(name="optimize", cache_policy=NO_CACHE)
@gate_task
def optimize(st: ReleaseState, model_dir: Path, release_data: ReleaseData) -> Bundle:
    return gates.optimize(get_services(), st, model_dir, release_data)


@task(name="load-test", cache_policy=NO_CACHE)
@gate_task
def load_test(st: ReleaseState, rows: np.ndarray) -> GateResult:
    return gates.load_test(get_services(), st, rows)
