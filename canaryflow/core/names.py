"""The one name rule for registered model names and versions, checked wherever a name enters canaryflow (the
webhook bridge, a release's begin, reconcile, the CLI, batch scoring) before it reaches a URL, a file path, an
nginx config or an MLflow filter.

MLflow accepts almost any model name (``iris?``, ``a/b``, ``x'y``); canaryflow serves only names that are safe
everywhere it puts them: 1 to 64 of ``A-Z a-z 0-9 _ . -``, starting with a letter or digit, not ``.``/``..``
anywhere as a path part. Versions are MLflow's: 1 to 32 of ``0-9 A-Z a-z . _ -`` (in practice digits).
"""

from __future__ import annotations

import re

MODEL_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
VERSION_PATTERN = r"[0-9A-Za-z._-]{1,32}"
MODEL_RE = re.compile(rf"^{MODEL_PATTERN}$")
VERSION_RE = re.compile(rf"^{VERSION_PATTERN}$")


def name_problem(model: object, version: object = None) -> str | None:
    """Why canaryflow refuses this model name (and version, when given), or None when both are fine."""
    if not isinstance(model, str) or not MODEL_RE.match(model) or ".." in model:
        return (f"model name {str(model)[:80]!r} is not allowed: use 1 to 64 of A-Z a-z 0-9 _ . - starting with "
                "a letter or digit (canaryflow puts it in URLs, file names and the router's config)")
    if version is not None and (not isinstance(version, str | int) or not VERSION_RE.match(str(version))
                                or str(version) in (".", "..")):
        return f"version {str(version)[:40]!r} of {model} is not allowed: use 1 to 32 of 0-9 A-Z a-z . _ -"
    return None
