"""Per-model release policy: the settings' thresholds, overridden by the registered model's tag.

Tag the registered model (not a version) ``canaryflow.policy`` with a JSON object whose sections mirror the
settings tree, e.g. ``{"gates": {"quality_min": 0.9}, "loadtest": {"max_p95_ms": 20}}``.
"""

from __future__ import annotations

import json
from typing import Any

from canaryflow.core.errors import ConfigError
from canaryflow.core.settings import Settings
from canaryflow.core.state import Tag

SECTIONS = ("gates", "optimization", "loadtest", "canary")


def apply_policy(settings: Settings, raw: str | None) -> Settings:
    """A copy of ``settings`` with the sections of the policy JSON applied (validated like the settings)."""
    if not raw:
        return settings
    try:
        policy: dict[str, Any] = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"tag {Tag.POLICY} is not JSON: {exc}") from exc
    unknown = set(policy) - set(SECTIONS)
    if not isinstance(policy, dict) or unknown:
        raise ConfigError(f"tag {Tag.POLICY} may only hold the sections {list(SECTIONS)}; got {sorted(unknown)}")
    update = {}
    for section, values in policy.items():
        current = getattr(settings, section)
        try:
            update[section] = current.model_validate({**current.model_dump(), **values})
        except Exception as exc:
            raise ConfigError(f"tag {Tag.POLICY}, section {section!r}: {exc}") from exc
    return settings.model_copy(update=update)
