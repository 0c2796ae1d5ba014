"""torch-model-archiver: a serving bundle -> ``<model>_v<version>.mar`` in the model store."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from canaryflow.core import serving_contract
from canaryflow.core.errors import PackagingError
from canaryflow.core.registry import sha256_of
from canaryflow.core.serving_contract import META_FILE, ServingMeta
from deployments import chaos_handler, handler, serving_request
from deployments.torchserve import archive_name

HANDLER_FILE = Path(handler.__file__)
CHAOS_HANDLER_FILE = Path(chaos_handler.__file__)
# The modules the handler imports, archived beside it (TorchServe puts the model directory on the worker's path).
SERVING_FILES = (Path(serving_contract.__file__), Path(serving_request.__file__))


def handler_files(extra_files: list[Path]) -> tuple[Path, list[Path]]:
    """The .mar's handler and the serving modules to ship with it: the production handler, or, for a chaos build
    (a serving meta with a ``chaos`` spec), the fault-injecting subclass with the production handler beside it."""
    metas = [ServingMeta.load(p) for p in extra_files if p.name == META_FILE]
    if any(meta.chaos for meta in metas):
        return CHAOS_HANDLER_FILE, [*SERVING_FILES, HANDLER_FILE]
    return HANDLER_FILE, list(SERVING_FILES)


def is_chaos_build(mar: Path) -> bool:
    """Whether the archive ships the fault-injecting handler (read from the .mar itself, not from any tag a
    registry user can edit). A file that is not a readable archive is not a chaos build: TorchServe cannot load it
    either."""
    try:
        with zipfile.ZipFile(mar) as z:
            return any(Path(name).name == CHAOS_HANDLER_FILE.name for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


@dataclass(frozen=True)
class Archive:
    """A model archive in the model store and its digest."""

    path: Path
    sha256: str
    size_bytes: int


def build_mar(model_file: Path, extra_files: list[Path], *, model: str, version: str, model_store: Path,
              timeout_s: float = 300.0) -> Archive:
    """Archive with our handler, then move it atomically to ``<model_store>/<model>_v<version>.mar``.

    An existing archive for that version is kept as is: TorchServe unpacks a .mar at registration,
    so rewriting it would not change a running model, only make the digest on record wrong.
    """
    target = model_store / archive_name(model, version)
    if target.exists():
        return Archive(target, sha256_of(target), target.stat().st_size)
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    handler_file, serving_files = handler_files(extra_files)
    with tempfile.TemporaryDirectory(dir=model_store, prefix=".archiving-") as tmp:
        cmd = [str(archiver if archiver.exists() else "torch-model-archiver"), "--model-name", model,
               "--version", str(version), "--serialized-file", str(model_file), "--handler", str(handler_file),
               "--extra-files", ",".join(str(p) for p in [*extra_files, *serving_files]),
               "--export-path", tmp, "--force"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        built = Path(tmp) / f"{model}.mar"
        if done.returncode != 0 or not built.exists():
            detail = (done.stderr or done.stdout)[-800:]
            raise PackagingError(f"torch-model-archiver exited {done.returncode}: {detail}")
        built.chmod(0o600)  # the owner's only, whatever the caller's umask (the model is the team's property)
        os.replace(built, target)
    return Archive(target, sha256_of(target), target.stat().st_size)
