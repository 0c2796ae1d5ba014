"""Adaptive batching's bookkeeping in TorchServeClient: a batched version is registered twice (unbatched under its
name, batched under ``<model>..batched``), recorded for the router before the version answers, and removed from the
router before its twin goes. Against a stand-in for TorchServe's management API; the router's side runs on the
real nginx (tests/integration/test_router_canary.py) and the whole path on the real TorchServe
(tests/integration/test_loadtest_router.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from canaryflow.core.paths import StatePaths, write_json
from canaryflow.core.settings import ServingConfig, Settings
from deployments import torchserve
from deployments.torchserve import TorchServeClient, archive_name, batched_name, batched_twins


class Management:
    """Registrations by (name, version), as TorchServe's management API keeps them; the version comes from the
    archive (TorchServe reads it from the manifest)."""

    def __init__(self) -> None:
        self.models: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[str] = []

    def __call__(self, api: str, method: str, path: str, **kw: Any) -> httpx.Response:
        name = path.split("/")[2] if path.count("/") >= 2 else ""
        if method == "GET":
            found = [{"modelVersion": v, **cfg} for (n, v), cfg in self.models.items() if n == name]
            return httpx.Response(200, json=found) if found else httpx.Response(404, json={"code": 404})
        if method == "POST":
            params = kw["params"]
            version = re.fullmatch(r".+_v(.+)\.mar", params["url"]).group(1)
            key = (params["model_name"], version)
            self.calls.append(f"register {key[0]} v{version} {params['initial_workers']}x{params['batch_size']}")
            if key in self.models:
                return httpx.Response(409)
            self.models[key] = {"minWorkers": params["initial_workers"], "batchSize": params["batch_size"]}
            return httpx.Response(200, json={"status": "registered"})
        if method == "DELETE":
            version = path.split("/")[3]
            self.calls.append(f"unregister {name} v{version}")
            return httpx.Response(200 if self.models.pop((name, version), None) else 404, json={})
        raise AssertionError(f"unexpected {method} {path}")


@pytest.fixture
def ts(tmp_path: Path) -> tuple[TorchServeClient, Management]:
    settings = Settings(state_dir=tmp_path / "state")
    paths = StatePaths(settings.state_dir)
    client = TorchServeClient(settings, paths)
    management = Management()
    client._call = management  # type: ignore[method-assign]
    changes: list[list[tuple[str, str, str]]] = []
    client.on_batched_change = lambda: (changes.append(batched_twins(paths)),
                                        management.calls.append("router refreshed"))
    client.changes = changes  # type: ignore[attr-defined]
    return client, management


def archive(client: TorchServeClient, version: str) -> Path:
    return client.paths.model_store / archive_name("iris", version)


def measured(client: TorchServeClient, version: str, config: ServingConfig) -> None:
    path = client._tuning_file("iris", version)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, config.model_dump())


def test_a_batched_version_is_registered_twice_and_routed_to_its_twin(ts: tuple) -> None:
    client, management = ts
    measured(client, "2", ServingConfig(workers=2, batch_size=8, max_batch_delay_ms=1))
    assert client.register("iris", "2", archive(client, "2")) is True
    assert management.calls == ["register iris..batched v2 2x8", "router refreshed", "register iris v2 1x1"]
    assert management.models == {("iris..batched", "2"): {"minWorkers": 2, "batchSize": 8},
                                 ("iris", "2"): {"minWorkers": 1, "batchSize": 1}}
    # the router knew the twin before the version answered (a version is routed only after it registered)
    assert client.changes == [[("iris", "2", "iris..batched")]]
    assert client.batched_config("iris", "2") == ServingConfig(workers=2, batch_size=8, max_batch_delay_ms=1)
    assert client.register("iris", "2", archive(client, "2")) is False  # already there: nothing new
    assert len(client.changes) == 1 and management.calls[-1] == "register iris v2 1x1"


def test_the_router_lets_go_of_the_twin_before_it_is_unregistered(ts: tuple) -> None:
    client, management = ts
    measured(client, "2", ServingConfig(workers=1, batch_size=4))
    client.register("iris", "2", archive(client, "2"))
    management.calls.clear()
    client.unregister("iris", "2")
    assert management.calls == ["router refreshed", "unregister iris..batched v2", "unregister iris v2"]
    assert client.changes[-1] == [] and management.models == {} and batched_twins(client.paths) == []
    assert client.serving_config("iris", "2") == ServingConfig.of(client.settings.serving)  # forgotten too
    client.unregister("iris", "2")  # idempotent: nothing left, nothing refreshed
    assert management.calls[-2:] == ["unregister iris..batched v2", "unregister iris v2"]


def test_a_registration_cut_short_is_completed_by_the_next(ts: tuple) -> None:
    """A crash after the twin registered (what the flow's re-run or reconcile meets): the next register finds the
    twin, records it and registers the version, without a second twin."""
    client, management = ts
    measured(client, "3", ServingConfig(workers=1, batch_size=8))
    management.models[("iris..batched", "3")] = {"minWorkers": 1, "batchSize": 8}
    assert client.register("iris", "3", archive(client, "3")) is True
    assert management.calls == ["router refreshed", "register iris v3 1x1"]
    assert batched_twins(client.paths) == [("iris", "3", "iris..batched")]


def test_tuning_to_another_setting_replaces_both_registrations(ts: tuple) -> None:
    client, management = ts
    client.register("iris", "4", archive(client, "4"))  # serving.*: no batching, no twin
    assert management.models == {("iris", "4"): {"minWorkers": 1, "batchSize": 1}} and client.changes == []
    client.tune("iris", "4", archive(client, "4"), ServingConfig(workers=1, batch_size=8))
    assert set(management.models) == {("iris", "4"), ("iris..batched", "4")}
    client.tune("iris", "4", archive(client, "4"), ServingConfig(workers=2, batch_size=1))
    assert management.models == {("iris", "4"): {"minWorkers": 2, "batchSize": 1}}
    assert batched_twins(client.paths) == [] and client.changes[-1] == []


def test_without_adaptive_batching_a_batched_version_is_one_registration(ts: tuple) -> None:
    client, management = ts
    client.settings.serving.adaptive_batching = False
    measured(client, "5", ServingConfig(workers=1, batch_size=8))
    client.register("iris", "5", archive(client, "5"))
    assert management.models == {("iris", "5"): {"minWorkers": 1, "batchSize": 8}} and client.changes == []
    assert client.batched_config("iris", "5") is None


def test_turning_adaptive_batching_off_drops_a_twin_at_the_next_registration(ts: tuple) -> None:
    """After a TorchServe restart with adaptive batching turned off, the re-registration (keywatch, reconcile)
    must not leave the router sending overlapping requests to a twin that is no longer registered."""
    client, management = ts
    measured(client, "6", ServingConfig(workers=1, batch_size=8))
    client.register("iris", "6", archive(client, "6"))
    management.models.clear()  # TorchServe restarted: nothing registered, the record is still there
    client.settings.serving.adaptive_batching = False
    management.calls.clear()
    assert client.register("iris", "6", archive(client, "6")) is True
    assert management.calls == ["router refreshed", "unregister iris..batched v6", "register iris v6 1x8"]
    assert batched_twins(client.paths) == [] and client.changes[-1] == []


def test_only_records_the_client_writes_reach_the_router(tmp_path: Path) -> None:
    """The records live in the stack's owner-only state dir; still, the router only takes a name the rule allows,
    with the twin's name derived from it, never one read from the file."""
    paths = StatePaths(tmp_path)
    folder = paths.torchserve_dir / "batched"
    folder.mkdir(parents=True)
    write_json(folder / "a.json", {"model": "iris", "version": "1", "name": "iris..batched"})
    write_json(folder / "b.json", {"model": "iris", "version": "2", "name": "other"})
    write_json(folder / "c.json", {"model": "a b", "version": "1", "name": "a b..batched"})
    write_json(folder / "d.json", ["iris", "3"])
    (folder / "e.json").write_text("{not json")
    assert batched_twins(paths) == [("iris", "1", "iris..batched")]
    assert batched_name("iris") == "iris" + torchserve.BATCHED_SUFFIX
