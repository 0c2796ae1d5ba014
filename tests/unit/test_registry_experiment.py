"""The release and batch experiments are got-or-created by every run that needs them; two releases starting
together on a fresh stack raced there (CI: one flow failed with RESOURCE_ALREADY_EXISTS before tagging its
version, and nothing released it). Checked on MLflow's own SQL store, the one `canaryflow up` serves."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from canaryflow.core.registry import MlflowRegistry, experiment_id

NAME = "canaryflow-releases"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> MlflowClient:
    root = tmp_path_factory.mktemp("mlflow")
    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


class StaleRead:
    """The real client, but its first ``get_experiment_by_name`` answers what it read before another release
    created the experiment: nothing."""

    def __init__(self, real: MlflowClient) -> None:
        self.real, self.stale = real, True

    def get_experiment_by_name(self, name: str) -> object:
        if self.stale:
            self.stale = False
            return None
        return self.real.get_experiment_by_name(name)

    def __getattr__(self, attr: str) -> object:
        return getattr(self.real, attr)


def test_the_loser_of_the_create_race_uses_the_winners_experiment(client: MlflowClient) -> None:
    name = f"{NAME}-race"
    winner = client.create_experiment(name)
    with pytest.raises(MlflowException) as lost:  # what the loser's create meets on this store
        client.create_experiment(name)
    assert lost.value.error_code == "RESOURCE_ALREADY_EXISTS"
    assert experiment_id(StaleRead(client), name) == winner


def test_an_experiment_deleted_in_the_ui_is_restored_and_its_runs_kept(client: MlflowClient) -> None:
    name = f"{NAME}-deleted"
    first = experiment_id(client, name)
    run = client.create_run(first).info.run_id
    client.delete_experiment(first)
    assert experiment_id(client, name) == first
    assert client.get_experiment(first).lifecycle_stage == "active"
    assert client.get_run(run).info.experiment_id == first


def test_release_runs_of_two_models_starting_together_on_a_new_experiment(tmp_path: Path) -> None:
    registry = MlflowRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    registry.client = StaleRead(registry.client)
    other = registry.client.real.create_experiment(NAME)  # the other release created it after our read
    run = registry.release_run(NAME, "drill-model", "1")
    assert registry.client.real.get_run(run).info.experiment_id == other
    assert registry.release_run(NAME, "drill-model", "1") == run  # a re-run reuses its run
