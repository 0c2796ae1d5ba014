"""Per-model release policy: the operator's settings, tightened by the registered model's tag.

Tag the registered model (not a version) ``canaryflow.policy`` with a JSON object whose sections mirror the
settings tree, e.g. ``{"gates": {"quality_min": 0.9}, "loadtest": {"max_p95_ms": 20}}``.

Anyone who can write to the registry can write that tag, so it may only make a release harder to pass: every key
has a direction (:data:`RULES`) and a value that loosens the operator's setting is refused, naming the key, unless
the operator allows loosening (``release.allow_policy_loosening``, off by default). Keys that are not settings,
and operator-only keys (fault injection, the evaluation set's path, the sticky-user header, ...), are errors.
The hard caps on durations and load live on the settings themselves and hold either way.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from canaryflow.core.errors import ConfigError
from canaryflow.core.settings import Settings
from canaryflow.core.state import Tag

SECTIONS = ("gates", "optimization", "loadtest", "canary")

# Which way is tighter, per key: "ge" higher, "le" lower, "true"/"false" only that value (or the operator's),
# "subset" a non-empty subset of the operator's list, "steps" a ramp with at least as many steps starting no
# bigger, "feedback" off < auto < required, "any" no direction (what the model is, not how hard it is judged).
RULES: dict[str, dict[str, str]] = {
    "gates": {
        "allow_contract_change": "false", "label_column": "any", "data_max_failed_ratio": "le",
        "drift_max_share": "le", "drift_min_traffic_rows": "le", "quality_metric": "any", "quality_min": "ge",
        "quality_max_abs_drop": "le", "quality_max_rel_drop": "le", "quality_max_contradiction": "le",
    },
    "optimization": {
        "variants": "subset", "min_argmax_agreement": "ge", "max_abs_diff": "le", "min_speedup": "ge",
        "min_batch_speedup": "ge", "bench_repeats": "le", "bench_budget_s": "le",
    },
    "loadtest": {
        "max_p95_ms": "le", "max_failure_ratio": "le", "min_rps": "ge", "max_p95_ratio": "le", "p95_slack_ms": "le",
        "busy_max_ratio": "le", "rows_per_request": "any",
    },
    "canary": {
        "steps": "steps", "shadow": "true", "interval_s": "any", "min_requests": "ge", "max_error_ratio": "le",
        "max_p95_ms": "le", "max_p95_ratio": "le", "p95_slack_ms": "le", "latency_alpha": "ge",
        "latency_min_shift_ms": "le", "max_prediction_drift": "le", "min_shadow_agreement": "ge", "replay": "true",
        "min_pairs": "ge", "min_pair_agreement": "ge", "min_segment_agreement": "ge", "max_mean_prob_delta": "le",
        "feedback": "feedback", "max_accuracy_drop": "le", "accuracy_alpha": "ge", "max_failed_checks": "le",
        "bake_s": "ge",
    },
}
_FEEDBACK_ORDER = {"off": 0, "auto": 1, "required": 2}


def apply_policy(settings: Settings, raw: str | None) -> Settings:
    """A copy of ``settings`` with the policy JSON applied; ConfigError naming the key when a value is unknown,
    operator-only, invalid, or (unless the operator allows it) looser than the operator's setting."""
    if not raw:
        return settings
    try:
        policy: Any = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"tag {Tag.POLICY} is not JSON: {exc}") from exc
    if not isinstance(policy, dict) or set(policy) - set(SECTIONS):
        extra = sorted(set(policy) - set(SECTIONS)) if isinstance(policy, dict) else type(policy).__name__
        raise ConfigError(f"tag {Tag.POLICY} may only hold the sections {list(SECTIONS)}; got {extra}")
    loosening = settings.release.allow_policy_loosening
    update = {}
    for section, values in policy.items():
        current: BaseModel = getattr(settings, section)
        if not isinstance(values, dict):
            raise ConfigError(f"tag {Tag.POLICY}, section {section!r} must be an object")
        for key, value in values.items():
            where = f"tag {Tag.POLICY}: {section}.{key}"
            if key not in type(current).model_fields:
                raise ConfigError(f"{where} is not a setting (known: {', '.join(sorted(RULES[section]))})")
            if key not in RULES[section]:
                raise ConfigError(f"{where} is set by the operator only, not per model")
            if not loosening and not _tighter(RULES[section][key], value, getattr(current, key)):
                raise ConfigError(f"{where} = {json.dumps(value)} loosens the operator's "
                                  f"{json.dumps(_plain(getattr(current, key)))}; a per-model policy may only "
                                  "tighten it (the operator can allow loosening: release.allow_policy_loosening)")
        try:
            update[section] = current.model_validate({**current.model_dump(), **values})
        except Exception as exc:
            raise ConfigError(f"tag {Tag.POLICY}, section {section!r}: {exc}") from exc
    return settings.model_copy(update=update)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value


def _tighter(rule: str, new: Any, old: Any) -> bool:
    """Whether ``new`` is at least as strict as the operator's ``old`` under ``rule`` (a malformed value is left
    to the settings' own validation, which names it)."""
    try:
        if rule == "any":
            return True
        if rule in ("true", "false"):
            return new is (rule == "true") or new == old
        if rule == "ge":
            return float(new) >= float(old)
        if rule == "le":
            return float(new) <= float(old)
        if rule == "subset":
            return isinstance(new, list) and bool(new) and set(new) <= set(old)
        if rule == "feedback":
            return _FEEDBACK_ORDER[new] >= _FEEDBACK_ORDER[old]
        if rule == "steps":  # a canary with steps, starting no bigger, and no fewer steps on the way to 100%
            return (isinstance(new, list) and len(new) >= len(old) and bool(new)
                    and float(new[0]) <= float(old[0] if old else 100))
    except (TypeError, ValueError, KeyError):
        return True  # not a number or not a choice: model_validate refuses it with the settings' own message
    raise ValueError(f"unknown policy rule {rule!r}")
