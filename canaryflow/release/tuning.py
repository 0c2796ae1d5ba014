"""Serving settings chosen by measurement: the staged candidate is served with serving.* and with each setting of
``loadtest.tune`` (workers x server-side batch size), loaded through the router for a few seconds each at the load
test's offered load (``target_rps``). It keeps serving.* unless another setting within the load test's bars (p95,
failures, ``min_rps``) has a median latency ``tune_min_gain`` times lower than serving.*'s best of two
measurements (A/B/A: serving.* is measured again after a challenger looked faster; the machine is shared, and a
calm moment is not a faster setting).

The typical request at the expected load, not peak throughput and not the p95: server-side batching makes a lone
request wait up to ``max_batch_delay_ms``, and three first versions served the bench's 1 ms MLP with batch 8 (7.5 ms
at one connection): chosen by closed-loop requests/s, by a p95 a concurrent release had blown up, and because
serving.* missed the p95 bar during that release. Batching wins where requests queue.

The backend records the choice, so a re-registration (TorchServe restart, reconcile) serves the version the same
way; the release run gets the table (``load_test/tuning.json``, params ``serving_workers`` /
``serving_batch_size``).

Only a staged version is tuned: it is registered again for each setting and answers nothing meanwhile. The gate's
own load test runs after this, on the chosen setting.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from canaryflow.core.settings import LoadTestSettings, ServingConfig
from deployments.loadtest import LoadTestResult, run_load_test
from deployments.torchserve import ServingBackend


@dataclass(frozen=True)
class Trial:
    """One setting's closed-loop burst."""

    config: ServingConfig
    requests: int
    rps: float
    p50_ms: float
    p95_ms: float
    failure_ratio: float
    error: str | None = None

    @classmethod
    def of(cls, config: ServingConfig, result: LoadTestResult) -> Trial:
        return cls(config, result.requests, round(result.rps, 1), round(result.p50_ms, 2), round(result.p95_ms, 2),
                   round(result.failure_ratio, 4), result.error)

    def within(self, cfg: LoadTestSettings) -> bool:
        return (self.error is None and self.requests > 0 and self.failure_ratio <= cfg.max_failure_ratio
                and self.p95_ms <= cfg.max_p95_ms and self.rps >= cfg.min_rps)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "config": self.config.model_dump(), "label": self.config.label}


@dataclass(frozen=True)
class Tuning:
    """What was tried (the first is serving.*), what was chosen and why."""

    trials: list[Trial]
    chosen: ServingConfig
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen.model_dump(), "reason": self.reason,
                "trials": [t.to_dict() for t in self.trials]}

    def markdown(self) -> str:
        lines = ["| setting | requests/s | p50 ms | p95 ms | failures | |", "| --- | --- | --- | --- | --- | --- |"]
        for t in self.trials:
            mark = "**chosen**" if t.config == self.chosen else (t.error or "")
            lines.append(f"| {t.config.label} | {t.rps:g} | {t.p50_ms:g} | {t.p95_ms:g} | {t.failure_ratio:.2%} "
                         f"| {mark} |")
        return "\n".join(lines)


def choose(trials: list[Trial], cfg: LoadTestSettings) -> tuple[ServingConfig, str]:
    """The setting to keep: serving.* (the first trial's; when it was measured more than once, its best
    measurement) unless another setting within the bars has a median ``tune_min_gain`` times lower. A setting
    that missed a bar (p95, failures, ``min_rps``) never wins; serving.* missing one is left to the gate, which
    tells a busy machine from a slow model (a peer in the same run), which this cannot."""
    base = trials[0].config
    ours = min((t for t in trials if t.config == base), key=lambda t: (not t.within(cfg), t.p50_ms))
    others = [t for t in trials if t.config != base and t.within(cfg)]
    if not others:
        return base, f"kept {base.label}: no other setting answered within the load test's bars"
    best = min(others, key=lambda t: t.p50_ms)
    gain = ours.p50_ms / best.p50_ms if best.p50_ms else float("inf")
    if gain < cfg.tune_min_gain:
        return base, (f"kept {base.label} (median {ours.p50_ms:g} ms): {best.config.label}'s median only "
                      f"{gain:.2f}x lower (< {cfg.tune_min_gain:g}x)")
    return best.config, f"chose {best.config.label}: median {best.p50_ms:g} ms, {gain:.2f}x lower than {base.label}'s"


def candidates(cfg: LoadTestSettings, base: ServingConfig) -> list[ServingConfig]:
    """serving.* first, then each ``tune`` setting once (batch settings wait ``base.max_batch_delay_ms``)."""
    out = [base]
    for text in cfg.tune:
        config = ServingConfig.parse(text, base.max_batch_delay_ms)
        if config not in out:
            out.append(config)
    return out


def tune_serving(backend: ServingBackend, base: ServingConfig, router_url: str, model: str, version: str,
                 archive: Path, rows: np.ndarray, cfg: LoadTestSettings, out_dir: Path,
                 pin: Mapping[str, str] | None = None) -> Tuning | None:
    """Try every candidate setting on the staged ``version`` and leave it served with the chosen one; None when
    there is nothing to try or the backend scales versions itself (Kubernetes: the HPA)."""
    tries = candidates(cfg, base)
    current = backend.serving_config(model, version)
    if len(tries) < 2 or current is None:
        return None
    burst = cfg.model_copy(update={"duration_s": cfg.tune_duration_s})  # the gate's users and offered load
    trials = []
    for i, config in enumerate(tries):
        if config != current:
            backend.tune(model, version, archive, config)
            current = config
        result = run_load_test(router_url, model, version, rows, burst,
                               out_dir / f"{i}-{config.workers}x{config.batch_size}", pin=pin)
        trials.append(Trial.of(config, result))
    chosen, reason = choose(trials, cfg)
    if chosen != tries[0]:  # A/B/A: serving.* once more, after the others; a calm moment is not a faster setting
        backend.tune(model, version, archive, tries[0])
        current = tries[0]
        result = run_load_test(router_url, model, version, rows, burst, out_dir / f"{len(tries)}-again", pin=pin)
        trials.append(Trial.of(tries[0], result))
        chosen, reason = choose(trials, cfg)
    if chosen != current:
        backend.tune(model, version, archive, chosen)
    tuning = Tuning(trials, chosen, reason)
    (out_dir / "tuning.json").write_text(json.dumps(tuning.to_dict(), indent=2))
    return tuning
