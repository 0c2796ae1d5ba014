"""The model a batch run scores with: alias or version resolved in the registry, and what its release recorded.

A released version (tag ``canaryflow.release_run``, status ``released``) is scored with the artifact its release
chose for batch scoring, from the sealed ``torchserve/<model>_v<n>.mar`` on the release run: the served variant
(ONNX or torch.export, plus the serving meta), scored as the TorchServe handler scores it
(:mod:`canaryflow.batch.scorer`), so batch answers equal served answers; or, when the optimization gate measured
another variant faster at big batches (torch_bf16 on CPUs with AMX, say), that variant from the archive's
``batch/`` directory, held to the same parity with the fp32 reference as the served one. Its rows are checked
with the release's data expectations (``gates/data/expectation_suite.json``) and its drift is measured against
the training reference (``canaryflow/reference.parquet`` on the training run).

A version that was never released is refused unless ``allow_unreleased``: then the MLflow PyTorch model is exported
here with a dynamic batch (torch.export, no optimization) and its expectations are derived from the reference.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from canaryflow.core import seal
from canaryflow.core.errors import BatchError, RegistryError
from canaryflow.core.paths import StatePaths
from canaryflow.core.registry import MlflowRegistry, sha256_of
from canaryflow.core.serving_contract import BATCH_DIR, META_FILE
from canaryflow.core.state import ReleaseStatus, Tag
from canaryflow.model.datasets import REFERENCE

SUITE_ARTIFACT = "gates/data/expectation_suite.json"
OPTIMIZATION_ARTIFACT = "optimization/optimization.json"


@dataclass(frozen=True)
class BatchModel:
    """A resolved model version and the local copies of what scoring it needs (all picklable, for workers)."""

    name: str
    version: str
    alias: str | None
    tracking_uri: str
    release_run: str | None
    training_run: str | None
    bundle_dir: str
    serving_format: str
    variant: str  # the optimization variant served (or "export" for an unreleased version)
    feature_columns: tuple[str, ...]
    input_dtype: str
    suite: dict[str, Any] | None
    reference_path: str | None
    archive_sha256: str | None = None  # of the release's .mar, checked against the pipeline's seal when fetched
    work_dir: str | None = None  # where fetch_model put it (a worker without the bundle fetches it there)


def resolve_version(registry: MlflowRegistry, name: str, alias: str | None, version: str | None) -> str:
    """The version number an alias or explicit version names; BatchError when the registry has none."""
    if version is not None:
        try:
            return registry.get_version(name, str(version)).version
        except RegistryError as exc:
            raise BatchError(f"cannot score with {name!r} v{version}: {exc}") from exc
    alias = alias or "champion"
    found = registry.alias_version(name, alias)
    if found is None:
        raise BatchError(f"model {name!r} has no version with alias {alias!r} in the registry at "
                         f"{registry.tracking_uri}: release a version first, or pass an explicit version")
    return found


def fetch_model(registry: MlflowRegistry, name: str, version: str, alias: str | None, work_dir: Path, *,
                allow_unreleased: bool = False, max_batch_rows: int = 8192, paths: StatePaths | None = None,
                expect_sha256: str | None = None) -> BatchModel:
    """Download (once per version: cached under ``work_dir``) the serving bundle, the suite and the reference.

    A released version's archive is the one its release run holds, and it must be the archive the pipeline
    sealed for that version (``paths``: the stack's, whose key checks the seal) or have ``expect_sha256`` (a
    worker fetching what the driver checked): the ``release_run`` and status tags are editable by any registry
    user, the seal is not."""
    sha = None
    info = registry.get_version(name, version)
    release_run = info.tags.get(Tag.RELEASE_RUN)
    status = info.tags.get(Tag.STATUS)
    work_dir.mkdir(parents=True, exist_ok=True)
    reference = _download(registry, info.run_id, REFERENCE, work_dir / "reference") if info.run_id else None
    if release_run and status == ReleaseStatus.RELEASED:
        bundle = _cached(work_dir / "bundle", lambda d: _extract_mar(registry, release_run, d))
        sha = _check_archive(registry, name, version, bundle, paths, expect_sha256)
        suite_file = _download(registry, release_run, SUITE_ARTIFACT, work_dir / "suite")
        suite = json.loads(Path(suite_file).read_text()) if suite_file else _derive_suite(reference, bundle)
        opt = _download(registry, release_run, OPTIMIZATION_ARTIFACT, work_dir / "optimization")
        report = json.loads(Path(opt).read_text()) if opt else {}
        variant = report.get("chosen") or "unknown"
        if (bundle / BATCH_DIR / META_FILE).exists():  # inside the sealed archive: its own variant for batches
            bundle = _batch_bundle(bundle / BATCH_DIR)
            variant = report.get("batch_chosen") or "batch"
    elif allow_unreleased:
        bundle = _cached(work_dir / "export", lambda d: _export(registry, name, version, d, max_batch_rows))
        suite, variant = _derive_suite(reference, bundle), "export"
    else:
        why = f"its release ended {status!r}: {info.tags.get('canaryflow.reason', '')}" if status else \
            "it was never released"
        raise BatchError(f"{name!r} v{version} has no released serving artifact ({why}); score a released version "
                         "(the champion), or allow unreleased versions (--allow-unreleased) to export it unoptimized")
    meta = json.loads((bundle / META_FILE).read_text())
    features = meta.get("feature_names") or _suite_columns(suite) or [f"f{i}" for i in range(meta["n_features"])]
    return BatchModel(name, str(version), alias, registry.tracking_uri, release_run, info.run_id, str(bundle),
                      meta["format"], variant, tuple(features), meta.get("input_dtype", "float32"), suite,
                      reference, sha, str(work_dir))


def _batch_bundle(directory: Path) -> Path:
    from canaryflow.model.packaging import Bundle

    try:
        return Bundle.load(directory).directory
    except ValueError as exc:
        raise BatchError(f"the archive's {BATCH_DIR}/ bundle: {exc}") from exc


def _check_archive(registry: MlflowRegistry, name: str, version: str, bundle: Path, paths: StatePaths | None,
                   expect_sha256: str | None) -> str:
    """The sha256 of the release's .mar in ``bundle``; BatchError unless it is the sealed (or expected) one."""
    archives = sorted((bundle / "download").rglob("*.mar"))
    if not archives:
        raise BatchError(f"{name!r} v{version}: the release's archive is missing from {bundle}")
    sha = sha256_of(archives[0])
    why = None
    if paths is not None:
        why = seal.released_archive(registry, paths, name, version, archives[0])
    elif expect_sha256 is None or sha != expect_sha256:
        why = f"{name!r} v{version}: archive sha256 {sha[:12]} is not the checked {str(expect_sha256)[:12]}"
    if why:
        raise BatchError(f"cannot score with {name!r} v{version}: {why}")
    return sha


def _cached(target: Path, build: Any) -> Path:
    """Build into a temporary sibling and rename: a crash never leaves a half bundle that looks complete."""
    if (target / META_FILE).exists():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / META_FILE).exists():  # not another process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _download(registry: MlflowRegistry, run_id: str | None, artifact: str, dst: Path) -> str | None:
    import mlflow.artifacts

    if not run_id:
        return None
    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(dst),
                                                   tracking_uri=registry.tracking_uri)
    except Exception:  # MLflow raises several types for a missing artifact; callers handle None
        return None


def _extract_mar(registry: MlflowRegistry, run_id: str, dst: Path) -> None:
    mars = [a.path for a in registry.client.list_artifacts(run_id, "torchserve") if a.path.endswith(".mar")]
    if not mars:
        raise BatchError(f"release run {run_id} holds no torchserve/*.mar: was the release archived?")
    local = _download(registry, run_id, mars[0], dst / "download")
    if local is None:
        raise BatchError(f"could not download {mars[0]} from release run {run_id}")
    with zipfile.ZipFile(local) as z:
        z.extractall(dst)
    if not (dst / META_FILE).exists():
        raise BatchError(f"{mars[0]} of release run {run_id} has no {META_FILE}: not a canaryflow archive")


def _export(registry: MlflowRegistry, name: str, version: str, dst: Path, max_batch_rows: int) -> None:
    from canaryflow.model.packaging import export_pytorch

    model_dir = registry.download(name, version, dst / "mlflow-model")
    try:
        export_pytorch(model_dir, dst, name=name, version=version, max_batch_rows=max_batch_rows)
    except Exception as exc:
        raise BatchError(f"cannot export unreleased {name!r} v{version} for batch scoring: {exc}"[:800]) from exc


def _derive_suite(reference: str | None, bundle: Path) -> dict[str, Any] | None:
    if reference is None:
        return None
    import pandas as pd

    from validation.data import build_suite, suite_to_json

    meta = json.loads((bundle / META_FILE).read_text())
    frame = pd.read_parquet(reference)
    features = meta.get("feature_names") or [c for c in frame.columns if c != "label"][: meta["n_features"]]
    return suite_to_json(build_suite(frame, features))


def _suite_columns(suite: dict[str, Any] | None) -> list[str] | None:
    for e in (suite or {}).get("expectations", []):
        if e.get("type") == "expect_table_columns_to_match_set":
            return list(e["kwargs"]["column_set"])
    return None
