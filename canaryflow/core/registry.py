"""The model registry (MLflow): versions, aliases, tags, and the release run of each version."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from canaryflow.core.errors import RegistryError
from canaryflow.core.state import Tag


@dataclass(frozen=True)
class VersionInfo:
    """What the release needs to know about one registered version."""

    name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    created_ms: int = 0  # registration time (epoch ms)
    description: str = ""  # what the MLflow UI shows on the version's page (canaryflow writes the release summary)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


class Registry(Protocol):
    """The registry operations canaryflow uses: the control plane (versions, aliases, tags) and the record (release
    runs). :class:`MlflowRegistry` is the real one; tests/unit/fakes.py has the in-memory one."""

    def get_version(self, name: str, version: str) -> VersionInfo: ...
    def list_models(self) -> list[str]: ...
    def list_versions(self, name: str) -> list[VersionInfo]: ...
    def alias_version(self, name: str, alias: str) -> str | None: ...
    def set_alias(self, name: str, alias: str, version: str) -> None: ...
    def delete_alias(self, name: str, alias: str) -> None: ...
    def set_tags(self, name: str, version: str, tags: dict[str, str]) -> None: ...
    def model_tags(self, name: str) -> dict[str, str]: ...
    def set_model_tag(self, name: str, key: str, value: str) -> None: ...
    def model_meta(self, name: str, version: str, dst: Path) -> Any: ...
    def download(self, name: str, version: str, dst: Path) -> Path: ...
    def release_run(self, experiment: str, name: str, version: str) -> str: ...
    def log_to_run(self, run_id: str, *, params: dict[str, Any] | None = None,
                   metrics: dict[str, float] | None = None, files: list[Path] | None = None,
                   artifact_path: str | None = None) -> None: ...
    def log_step(self, run_id: str, metrics: dict[str, float], step: int) -> None: ...
    def record_run(self, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, str]) -> str: ...
    def run_url(self, run_id: str) -> str: ...
    def finish_run(self, run_id: str, status: str) -> None: ...
    def annotate_run(self, run_id: str, tags: dict[str, str]) -> None: ...
    def describe_version(self, name: str, version: str, description: str) -> None: ...


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name`` on ``client`` (an ``MlflowClient``), created when missing and restored when
    someone deleted it in the UI (a deleted experiment keeps its name: no run can be created in it, nor another
    experiment of that name). Safe to race: two releases starting together both ask for the experiment the first
    time, and the loser of ``create_experiment`` (RESOURCE_ALREADY_EXISTS) reads the winner's."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return str(client.create_experiment(name))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise RegistryError(f"experiment {name!r} exists by MLflow's word but cannot be read")
    if exp.lifecycle_stage == "deleted":
        try:
            client.restore_experiment(exp.experiment_id)
        except MlflowException:  # another release restored it first, or it cannot be restored: say which
            if client.get_experiment(exp.experiment_id).lifecycle_stage == "deleted":
                raise
    return str(exp.experiment_id)


_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
"""MLflow's error codes for a model or alias that is not there (measured: unknown model, unset alias)."""


class MlflowRegistry:
    """Registry on an MLflow tracking server."""

    def __init__(self, tracking_uri: str) -> None:
        from mlflow import MlflowClient  # heavy; imported when a registry is actually used

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def get_version(self, name: str, version: str) -> VersionInfo:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(name, str(version))
        except MlflowException as exc:
            raise RegistryError(f"model {name!r} version {version} is not in the registry at "
                                f"{self.tracking_uri}: {exc.message}") from exc
        return _info(mv)

    def artifact_url(self, run_id: str, path: str) -> str:
        """HTTP(S) URL of one of a run's artifacts through the tracking server's artifact proxy (``mlflow server``
        with proxied artifacts: ``mlflow-artifacts:`` URIs), fetchable with the tracking server's credentials."""
        from urllib.parse import quote, urlsplit

        from mlflow.exceptions import MlflowException

        try:
            uri = self.client.get_run(run_id).info.artifact_uri
        except MlflowException as exc:
            raise RegistryError(f"release run {run_id!r}: {exc.message}"[:500]) from exc
        if not uri.startswith("mlflow-artifacts:"):
            raise RegistryError(f"run {run_id} stores artifacts at {uri.split(':')[0]}:, not through the tracking "
                                "server: serve them with `mlflow server --serve-artifacts` (the default) so a "
                                "cluster fetches them with the tracking server's credentials")
        base = urlsplit(uri).path.strip("/")
        return f"{self.tracking_uri.rstrip('/')}/api/2.0/mlflow-artifacts/artifacts/{quote(base)}/{quote(path)}"

    def alias_version(self, name: str, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            # Only "no such model / alias" means no version. Anything else (401 from a team's MLflow, a 5xx) read as
            # "no champion" would release a candidate with no canary against the real one.
            if exc.error_code in _NOT_FOUND:
                return None
            raise RegistryError(f"alias {alias!r} of {name[:80]!r} at {self.tracking_uri}: {exc.message}"[:500]) \
                from exc

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, str(version))

    def delete_alias(self, name: str, alias: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_registered_model_alias(name, alias)
        except MlflowException as exc:
            if exc.error_code not in _NOT_FOUND:  # not set: nothing to delete; anything else is an error
                raise RegistryError(f"deleting alias {alias!r} of {name[:80]!r}: {exc.message}"[:500]) from exc

    def list_models(self) -> list[str]:
        """Names of every registered model."""
        names, token = [], None
        while True:
            page = self.client.search_registered_models(max_results=200, page_token=token)
            names += [m.name for m in page]
            token = page.token
            if not token:
                return names

    def list_versions(self, name: str) -> list[VersionInfo]:
        """Every version of a registered model, with tags and creation time."""
        query = f"name = {_literal(name)}"
        return [_info(mv) for mv in self.client.search_model_versions(query, max_results=10000)]

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        self.client.set_registered_model_tag(name, key, value[:5000])

    def set_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        # One call per tag: the status goes last, so whoever sees a final status also sees its reason.
        for key, value in sorted(tags.items(), key=lambda kv: kv[0] == Tag.STATUS):
            self.client.set_model_version_tag(name, str(version), key, str(value)[:5000])

    def model_tags(self, name: str) -> dict[str, str]:
        """Tags of the registered model (where a per-model policy lives); RegistryError when there is none."""
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.client.get_registered_model(name).tags or {})
        except MlflowException as exc:
            raise RegistryError(f"registered model {name[:80]!r}: {exc.message}"[:500]) from exc

    def model_meta(self, name: str, version: str, dst: Path) -> Any:
        """The version's MLmodel (signature, flavors) without downloading the weights."""
        import mlflow.artifacts
        from mlflow.models import Model

        dst.mkdir(parents=True, exist_ok=True)
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}/MLmodel",
                                                   dst_path=str(dst), tracking_uri=self.tracking_uri)
        return Model.load(path)

    def download(self, name: str, version: str, dst: Path) -> Path:
        import mlflow.artifacts

        dst.mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                        dst_path=str(dst), tracking_uri=self.tracking_uri))

    def release_run(self, experiment: str, name: str, version: str) -> str:
        """The MLflow run that records this version's release; reused when the release is re-run."""
        exp_id = experiment_id(self.client, experiment)
        query = f"tags.`canaryflow.model` = {_literal(name)} and tags.`canaryflow.version` = {_literal(version)}"
        runs = self.client.search_runs([exp_id], filter_string=query, max_results=1)
        if runs:
            return runs[0].info.run_id
        run = self.client.create_run(exp_id, run_name=release_run_name(name, version),
                                     tags={Tag.MODEL: name, Tag.VERSION: str(version)})
        return run.info.run_id

    def log_to_run(self, run_id: str, *, params: dict[str, Any] | None = None,
                   metrics: dict[str, float] | None = None, files: list[Path] | None = None,
                   artifact_path: str | None = None) -> None:
        """Params, metrics and files on a run.

        MLflow params are immutable, so on a re-run a param whose value changed is written as a tag instead.
        """
        existing = self.client.get_run(run_id).data.params
        for key, value in (params or {}).items():
            if key not in existing:
                self.client.log_param(run_id, key, value)
            elif existing[key] != str(value):
                self.client.set_tag(run_id, f"rerun.{key}", str(value))
        for key, value in (metrics or {}).items():
            self.client.log_metric(run_id, key, tidy(value))
        for path in files or []:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_step(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Metrics of one step of a series (the canary's analyses), in one call."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, tidy(v), now, step) for k, v in metrics.items()])

    def record_run(self, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, str]) -> str:
        """A finished run that records an event (a rollback) next to the releases in the MLflow UI."""
        exp_id = experiment_id(self.client, experiment)
        run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        for key, value in params.items():
            self.client.log_param(run_id, key, value)
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def run_url(self, run_id: str) -> str:
        """The run's page in the MLflow UI."""
        exp_id = self.client.get_run(run_id).info.experiment_id
        return f"{self.tracking_uri}/#/experiments/{exp_id}/runs/{run_id}"

    def experiment_url(self, experiment: str) -> str:
        """The experiment's runs in the MLflow UI's classic view (the tracking server's base URL when the
        experiment does not exist yet)."""
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return self.tracking_uri
        return f"{self.tracking_uri.rstrip('/')}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"

    def finish_run(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def annotate_run(self, run_id: str, tags: dict[str, str]) -> None:
        """Tags on a run; ``mlflow.note.content`` is the description the MLflow UI shows on the run's page."""
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value)[:5000])

    def describe_version(self, name: str, version: str, description: str) -> None:
        """The model version's description (markdown on its page in the MLflow UI)."""
        self.client.update_model_version(name, str(version), description=description[:5000])


def _info(mv: Any) -> VersionInfo:
    return VersionInfo(mv.name, str(mv.version), mv.source, mv.run_id, dict(mv.tags or {}), list(mv.aliases or []),
                       int(mv.creation_timestamp or 0), str(getattr(mv, "description", "") or ""))


def release_run_name(name: str, version: str) -> str:
    """The release run's name: the version first, so a UI that cuts long names keeps it."""
    return f"v{version} release of {name}"


def tidy(value: float) -> float:
    """A metric at a precision a person reads (17.749999999999997 -> 17.75); whole numbers stay whole."""
    x = float(value)
    if x != x or x in (float("inf"), float("-inf")) or x.is_integer():
        return x
    return float(f"{x:.5g}") if abs(x) < 1e5 else round(x, 1)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _literal(value: object) -> str:
    """A value for an MLflow search filter, quoted. MLflow's filter grammar has no escape that it undoes, so a
    value with a quote or a backslash (a name outside the name rule) is refused rather than pasted in."""
    text = str(value)
    if any(c in text for c in "'\"\\\n\r"):
        raise RegistryError(f"{text[:80]!r} cannot go into an MLflow search filter (quotes, backslashes and line "
                            "breaks are refused)")
    return f"'{text}'"
