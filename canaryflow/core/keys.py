"""Secrets of the stack kept in files under ``<state>/secrets/`` (0600 in a 0700 directory), created on first use."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from canaryflow.core.errors import ConfigError


def _read_secret(path: Path) -> str:
    value = path.read_text(encoding="utf-8").strip()
    if not value:
        raise ConfigError(f"secret file {path} is empty; delete it to generate a new one")
    return value


def secret_file(target: Path, configured: str | None = None) -> str:
    """``configured`` if set, else the secret in ``target``, created (0600, in a 0700 dir) if absent."""
    if configured:
        return configured
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(target.parent, 0o700)
    if target.exists():
        os.chmod(target, 0o600)
        return _read_secret(target)
    # Write a private temp file, then link it into place: a concurrent creator either wins or loses
    # whole, and nobody ever reads a half-written secret.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secrets.token_urlsafe(32))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return _read_secret(target)
