"""torch-model-archiver: a serving bundle -> ``<model>_v<version>.mar`` in the model store."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from canaryflow.errors import PackagingError
from canaryflow.registry import sha256_of
from deployments import handler as handler_module
from deployments.torchserve import archive_name

HANDLER_FILE = Path(handler_module.__file__)


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
    with tempfile.TemporaryDirectory(dir=model_store, prefix=".archiving-") as tmp:
        cmd = [str(archiver if archiver.exists() else "torch-model-archiver"), "--model-name", model,
               "--version", str(version), "--serialized-file", str(model_file), "--handler", str(HANDLER_FILE),
               "--extra-files", ",".join(str(p) for p in extra_files), "--export-path", tmp, "--force"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        built = Path(tmp) / f"{model}.mar"
        if done.returncode != 0 or not built.exists():
            detail = (done.stderr or done.stdout)[-800:]
            raise PackagingError(f"torch-model-archiver exited {done.returncode}: {detail}")
        os.replace(built, target)
    return Archive(target, sha256_of(target), target.stat().st_size)
