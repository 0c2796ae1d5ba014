"""Serving state only the pipeline writes, sealed so that a registry user cannot forge it.

Anyone with MLflow access can edit tags and aliases; the serving state must not follow such an edit. The
pipeline seals what it writes with an HMAC-SHA256 under a stack key (``<state>/secrets/state_seal_key``, 0600,
never in the registry):

- the ramp's status (``canaryflow.canary`` JSON carries a ``seal`` over the rest of it): a forged or edited status
  does not verify, is logged and is not acted on;
- the champion: when the pipeline moves the ``champion`` alias it writes ``canaryflow.champion_seal`` on the
  registered model (version + the .mar's sha256, sealed) and ``canaryflow.seal`` on the version. The serving
  state follows the sealed champion, not the alias: an alias pointing elsewhere is logged and ignored, and a
  version is served or rolled back to only while its archive in the model store still has the sealed sha256.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from canaryflow.core.errors import ConfigError
from canaryflow.core.keys import secret_file
from canaryflow.core.paths import StatePaths
from canaryflow.core.registry import Registry, sha256_of
from canaryflow.core.state import Tag

_log = logging.getLogger(__name__)
SEP = "\x1f"


_keys: dict[Path, tuple[tuple[int, int], bytes]] = {}


def _seal_key(paths: StatePaths) -> bytes:
    """The seal key, read once per process (again only if the file was replaced: a Secret volume swaps it)."""
    path = paths.seal_key
    try:
        st = path.stat()
        cached = _keys.get(path)
        if cached is not None and cached[0] == (st.st_ino, st.st_mtime_ns):
            return cached[1]
    except FileNotFoundError:
        if paths.seal_key_file is not None:
            raise ConfigError(f"seal key file {path} (settings seal_key_file) does not exist; on Kubernetes "
                              "`canaryflow k8s init` creates the Secret canaryflow-seal-key that the flow-run "
                              "pods mount there") from None
        # else secret_file creates it
    key = (_configured_key(path) if paths.seal_key_file is not None else secret_file(path)).encode()
    st = path.stat()
    _keys[path] = ((st.st_ino, st.st_mtime_ns), key)
    return key


def _configured_key(path: Path) -> str:
    """A configured seal key file: read as it is (a mounted Secret is read-only), refused when others may read it
    or when it is too short to be a key."""
    if path.stat().st_mode & 0o007:
        raise ConfigError(f"seal key file {path} is readable by others (mode {path.stat().st_mode & 0o777:o}); "
                          "make it 0400 or 0600 (a Secret volume: defaultMode 0400)")
    key = path.read_text(encoding="utf-8").strip()
    if len(key) < 32:
        raise ConfigError(f"seal key file {path} holds {len(key)} characters; a seal key has at least 32")
    return key


def mac(paths: StatePaths, kind: str, *parts: str) -> str:
    """Hex HMAC-SHA256 of ``kind`` and ``parts`` under the stack's seal key."""
    return hmac.new(_seal_key(paths), SEP.join((kind, *parts)).encode(), hashlib.sha256).hexdigest()


def verifies(paths: StatePaths, given: object, kind: str, *parts: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given, mac(paths, kind, *parts))


# -- the ramp's status ---------------------------------------------------------------------------------------------
def seal_json(paths: StatePaths, model: str, version: str, body: str) -> str:
    """``body`` (a JSON object, sort_keys) with a ``seal`` key added."""
    data = json.loads(body)
    data["seal"] = mac(paths, "canary", model, version, body)
    return json.dumps(data, sort_keys=True)


def open_json(paths: StatePaths, model: str, version: str, raw: str) -> str | None:
    """The JSON body of a sealed tag value, or None (logged) when its seal does not verify."""
    try:
        data = json.loads(raw)
        given = data.pop("seal", None) if isinstance(data, dict) else None
        body = json.dumps(data, sort_keys=True)
    except ValueError:
        given = body = None
    if body is None or not verifies(paths, given, "canary", model, version, body):
        _log.warning("refused %s of %s v%s: its seal does not verify (written outside the pipeline, or edited); "
                     "not acted on", Tag.CANARY, model[:80], version[:40])
        return None
    return body


# -- the champion --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Champion:
    version: str
    sha256: str


def seal_champion(registry: Registry, paths: StatePaths, model: str, version: str | None,
                  archive: Path | None = None) -> None:
    """Record that the pipeline made ``version`` the champion (None: no champion), serving ``archive``."""
    if version is None or archive is None:
        registry.set_model_tag(model, Tag.CHAMPION_SEAL, "")
        return
    sha = sha256_of(archive)
    record = {"version": version, "sha256": sha, "seal": mac(paths, "champion", model, version, sha)}
    registry.set_tags(model, version, {Tag.SEAL: mac(paths, "released", model, version, sha)})
    registry.set_model_tag(model, Tag.CHAMPION_SEAL, json.dumps(record, sort_keys=True))


def sealed_champion(registry: Registry, paths: StatePaths, model: str) -> Champion | None:
    """The champion the pipeline last set for ``model`` (None: none, or the record does not verify: logged)."""
    raw = registry.model_tags(model).get(Tag.CHAMPION_SEAL)
    if not raw:
        return None
    try:
        record = json.loads(raw)
        version, sha = str(record["version"]), str(record["sha256"])
    except (ValueError, KeyError, TypeError):
        version = sha = ""
    if not version or not verifies(paths, record.get("seal"), "champion", model, version, sha):
        _log.warning("refused %s of %s: its seal does not verify; no champion is trusted", Tag.CHAMPION_SEAL,
                     model[:80])
        return None
    return Champion(version, sha)


def trusted_champion(registry: Registry, paths: StatePaths, model: str) -> str | None:
    """The version to serve as champion: the sealed one (the ``champion`` alias is only a view of it)."""
    sealed = sealed_champion(registry, paths, model)
    return sealed.version if sealed else None


def alias_forged(registry: Registry, model: str, alias: str, champion: str | None) -> str | None:
    """A line (also logged) when ``alias`` names another version than ``champion``, the sealed one the caller
    read with :func:`trusted_champion` (None: it agrees)."""
    named = registry.alias_version(model, alias)
    if named == champion:
        return None
    line = (f"{model}: alias {alias!r} names {f'v{named}' if named else 'nothing'} but the pipeline's champion is "
            f"{f'v{champion}' if champion else 'none'}: the alias is ignored")
    _log.warning("%s", line)
    return line


def released_archive(registry: Registry, paths: StatePaths, model: str, version: str, archive: Path) -> str | None:
    """Why ``archive`` may not be served as ``version`` (None: the pipeline made that version champion with
    exactly this archive, per the version's seal)."""
    seal = registry.get_version(model, version).tags.get(Tag.SEAL)
    try:
        sha = sha256_of(archive)
    except OSError as exc:
        return f"{model} v{version}: its archive cannot be read ({exc})"
    if not verifies(paths, seal, "released", model, version, sha):
        _log.warning("%s v%s: no pipeline seal for the archive %s (never released by the pipeline, or the archive "
                     "changed)", model[:80], version[:40], archive.name)
        return (f"{model} v{version} was never made champion by the pipeline with this archive "
                f"({archive.name}, sha256 {sha[:12]}): refused")
    return None
