"""The shared in-memory fakes of the release's interfaces (one model server, one router, one registry, one
orchestrator), checked against the Protocols they stand in for by tests/unit/test_fakes.py. Build services with
:func:`fake_services`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from canaryflow.core import seal
from canaryflow.core.errors import OrchestrationError, RegistryError, ServingError
from canaryflow.core.paths import StatePaths
from canaryflow.core.registry import VersionInfo
from canaryflow.core.settings import Settings
from canaryflow.core.state import Route
from canaryflow.services import Services
from deployments.metrics import VersionWindow, Window

MODEL = "m"  # the model most unit tests release


@dataclass
class FakeRegistry:
    """Versions, aliases and tags of registered models; release runs are recorded, not stored."""

    versions: dict[str, VersionInfo] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    model_tag: dict[str, str] = field(default_factory=dict)
    tag_log: list[tuple[str, dict]] = field(default_factory=list)
    steps: list[tuple[int, dict]] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    logged: list[dict] = field(default_factory=list)
    finished: dict[str, str] = field(default_factory=dict)
    run_tags: dict[str, dict[str, str]] = field(default_factory=dict)

    def get_version(self, name: str, version: str) -> VersionInfo:
        if version not in self.versions:
            raise RegistryError(f"model {name!r} version {version} is not in the registry")
        return self.versions[version]

    def list_models(self) -> list[str]:
        return sorted({v.name for v in self.versions.values()}) or ["m"]

    def list_versions(self, name: str) -> list[VersionInfo]:
        return [v for v in self.versions.values() if v.name == name]

    def alias_version(self, name: str, alias: str) -> str | None:
        return self.aliases.get(alias)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.aliases[alias] = version

    def delete_alias(self, name: str, alias: str) -> None:
        self.aliases.pop(alias, None)

    def set_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        self.tag_log.append((version, tags))
        if version in self.versions:
            v = self.versions[version]
            self.versions[version] = replace(v, tags={**v.tags, **tags})

    def model_tags(self, name: str) -> dict[str, str]:
        return self.model_tag

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        self.model_tag[key] = value

    def model_meta(self, name: str, version: str, dst: Path) -> Any:
        raise RegistryError("the fake registry holds no model files")

    def download(self, name: str, version: str, dst: Path) -> Path:
        raise RegistryError("the fake registry holds no model files")

    def release_run(self, experiment: str, name: str, version: str) -> str:
        return f"run-{version}"

    def log_to_run(self, run_id: str, *, params: dict[str, Any] | None = None,
                   metrics: dict[str, float] | None = None, files: list[Path] | None = None,
                   artifact_path: str | None = None) -> None:
        self.logged.append({"run": run_id, "params": params, "metrics": metrics, "files": files})

    def log_step(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        self.steps.append((step, metrics))

    def record_run(self, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, str]) -> str:
        self.runs.append({"name": run_name, **params})
        return "run"

    def run_url(self, run_id: str) -> str:
        return f"http://mlflow/#/runs/{run_id}"

    def finish_run(self, run_id: str, status: str) -> None:
        self.finished[run_id] = status

    def annotate_run(self, run_id: str, tags: dict[str, str]) -> None:
        self.run_tags.setdefault(run_id, {}).update(tags)

    def describe_version(self, name: str, version: str, description: str) -> None:
        if version in self.versions:
            self.versions[version] = replace(self.versions[version], description=description)


@dataclass
class FakeBackend:
    """A model server. ``registered`` and ``default`` are those of model ``m`` (most tests serve one model);
    other models' versions and defaults live in ``others`` and ``defaults``. Faults: ``up`` False, the first
    ``slow_pings`` pings unanswered (a server still starting), ``broken`` versions (``"model vX"``, or ``"*"`` for
    all) refused at registration. ``log`` lists every registration as (model, version, archive name); ``answer``
    (version, row) -> {"class_index", "probabilities"} gives it an inference API, ``replay_fail`` a version whose
    inference fails."""

    registered: set[str] = field(default_factory=set)
    default: str | None = None
    up: bool = True
    others: dict[str, set[str]] = field(default_factory=dict)
    defaults: dict[str, str] = field(default_factory=dict)
    slow_pings: int = 0
    pings: int = 0
    broken: set[str] = field(default_factory=set)
    log: list[tuple[str, str, str]] = field(default_factory=list)
    answer: Callable[[str, list[float]], dict[str, Any]] | None = None
    replay_fail: str | None = None
    replays: list[tuple[str, int]] = field(default_factory=list)

    def _of(self, model: str) -> set[str]:
        return self.registered if model == MODEL else self.others.setdefault(model, set())

    def healthy(self) -> bool:
        self.pings += 1
        return self.up and self.pings > self.slow_pings

    def versions(self, model: str) -> list[str]:
        return sorted(self._of(model))

    def register(self, model: str, version: str, archive: Path) -> bool:
        if version in self._of(model):
            return False
        self.log.append((model, version, archive.name))
        if "*" in self.broken or f"{model} v{version}" in self.broken:
            raise ServingError(f"registering {model} v{version} failed: HTTP 507 worker died")
        self._of(model).add(version)
        return True

    def unregister(self, model: str, version: str) -> None:
        self._of(model).discard(version)

    def tune(self, model: str, version: str, archive: Path, config: Any) -> bool:
        return False

    def serving_config(self, model: str, version: str) -> None:
        return None  # like a cluster: no per-version serving settings to try (tuning needs locust + a router)

    def set_default(self, model: str, version: str) -> None:
        if version not in self._of(model):
            raise ServingError(f"{model} v{version} is not registered")
        self.defaults[model] = version
        if model == MODEL:
            self.default = version

    def default_version(self, model: str) -> str | None:
        return self.default if model == MODEL else self.defaults.get(model)

    def replay(self, model: str, version: str, rows: list[list[float]]) -> list[dict[str, Any]]:
        self.replays.append((version, len(rows)))
        if self.answer is None:
            raise ServingError("the fake backend has no inference API")
        if version == self.replay_fail:
            raise ServingError(f"v{version} answered 503")
        return [self.answer(version, row) for row in rows]


@dataclass
class FakeRouter:
    """Routes per model, in the router's stored form; ``changes`` counts the applied changes."""

    table: dict[str, dict] = field(default_factory=dict)
    changes: int = 0
    refreshed: int = 0
    stale: bool = False  # the live config holds an old backend key (a backend restart nobody followed up)

    def routes(self) -> dict[str, dict]:
        return {k: dict(v) for k, v in self.table.items()}

    def route(self, model: str) -> Route | None:
        return Route.of(self.table.get(model))

    def set_route(self, model: str, version: str) -> None:
        self.table[model] = {"stable": version}
        self.changes += 1

    def set_split(self, model: str, stable: str, canary: str, weight: float, shadow: bool = False) -> None:
        self.table[model] = {"stable": stable, "canary": canary, "weight": weight, "shadow": shadow}
        self.changes += 1

    def clear_canary(self, model: str) -> None:
        if model in self.table:
            self.table[model] = {"stable": self.table[model]["stable"]}
            self.changes += 1

    def remove_route(self, model: str) -> None:
        if self.table.pop(model, None) is not None:
            self.changes += 1

    def refresh(self) -> None:
        self.refreshed += 1
        self.stale = False

    def credentials_stale(self) -> bool:
        return self.stale

    def pin_credentials(self) -> dict[str, str]:
        return {}


@dataclass
class FakeLauncher:
    """Release flow runs in memory; ``fail`` makes every call an unreachable orchestrator."""

    runs: list[dict] = field(default_factory=list)
    started: list[tuple[str, str, str]] = field(default_factory=list)
    crashed: list[tuple[str, str]] = field(default_factory=list)
    fail: bool = False

    @property
    def calls(self) -> list[tuple[str, str, str]]:
        return self.started

    def start_release(self, model_name: str, version: str, idempotency_key: str, allow_older: bool = False) -> str:
        self.started.append((model_name, version, idempotency_key))
        if self.fail:
            raise OrchestrationError("cannot reach the Prefect API: connection refused")
        self.runs.append({"parameters": {"model_name": model_name, "version": version}, "state_type": "SCHEDULED"})
        return "run-123"

    def list_flow_runs(self, model_name: str | None = None, version: str | None = None) -> list[dict[str, Any]]:
        return [dict(r) for r in self.runs if model_name in (None, r["parameters"]["model_name"])
                and version in (None, r["parameters"]["version"])]

    def mark_crashed(self, run_id: str, message: str) -> None:
        self.crashed.append((run_id, message))
        for r in self.runs:
            if r.get("id") == run_id:
                r["state_type"] = "CRASHED"

    def healthy(self) -> bool:
        return not self.fail


def fake_services(tmp_path: Path, registry: FakeRegistry | None = None, backend: FakeBackend | None = None,
                  router: FakeRouter | None = None, launcher: FakeLauncher | None = None,
                  settings: Settings | None = None, metrics: Any = None) -> Services:
    """Real :class:`Services` over the fakes, with its state under ``tmp_path``."""
    settings = (settings or Settings()).model_copy(update={"state_dir": tmp_path})
    StatePaths(tmp_path).model_store.mkdir(parents=True, exist_ok=True)
    return Services(settings, registry=registry or FakeRegistry(), backend=backend or FakeBackend(),
                    router=router or FakeRouter(), launcher=launcher or FakeLauncher(), metrics=metrics)


def sealed(svc: Services, model: str = MODEL) -> Services:
    """What the pipeline would have left behind for the registry's ``previous`` and ``champion`` aliases (made
    champion in that order): an archive in the model store for every version, and the seals."""
    for version in svc.registry.versions:
        archive = svc.paths.model_store / f"{model}_v{version}.mar"
        if not archive.exists():
            archive.write_bytes(f"mar of v{version}".encode())
    for alias in ("previous", "champion"):
        version = svc.registry.aliases.get(alias)
        if version:
            archive = svc.paths.model_store / f"{model}_v{version}.mar"
            if not archive.exists():
                archive.write_bytes(f"mar of v{version}".encode())
            seal.seal_champion(svc.registry, svc.paths, model, version, archive)
    svc.registry.tag_log.clear()
    return svc


class WindowSource:
    """A MetricsSource answering one prepared window: the champion healthy (200 requests), the candidate with
    ``cand_errors`` of its 60 requests failed."""

    def __init__(self, cand_errors: int = 0, champion: str = "1", candidate: str = "2") -> None:
        self.cand_errors, self.champion, self.candidate = cand_errors, champion, candidate

    def window(self, model: str, start: float, end: float) -> Window:
        def vw(v: str, n: int, errors: int = 0) -> VersionWindow:
            return VersionWindow(v, n, errors, [5.0 + (i % 5) * 0.1 for i in range(n)], {"0": n // 2, "1": n - n // 2},
                                 [0.9] * n)
        return Window(model, start, end, {self.champion: vw(self.champion, 200),
                                          self.candidate: vw(self.candidate, 60, self.cand_errors)})
