"""Serving settings chosen by measurement: the staged candidate is served with serving.* and with each setting of
``loadtest.tune`` (workers x server-side batch size), loaded through the router for a few seconds each at the load
test's offered load (``target_rps``), and keeps the setting with the lowest median latency among those within the
load test's bars (p95, failures, ``min_rps``); serving.* unless another's median is ``tune_min_gain`` times lower (a
noise guard: the machine is shared). The typical request's latency at the expected load, not peak throughput, and
not the p95: server-side batching makes a lone request wait up to ``max_batch_delay_ms`` (a 1 ms MLP answered in
7.6 ms with batch 8), which a p95 blown up by a busy machine hid (two first versions chose batch 8 for that MLP:
by closed-loop requests/s, then by p95 during another release); batching wins where requests queue.

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
    """The setting to keep: the lowest median latency among those within the bars; the first (serving.*) unless
    another's median is ``tune_min_gain`` times lower or serving.* missed a bar itself."""
    base = trials[0]
    ok = [t for t in trials if t.within(cfg)]
    if not ok:
        return base.config, (f"kept {base.config.label}: no setting answered within p95 {cfg.max_p95_ms:g} ms, "
                             f"failures {cfg.max_failure_ratio:.0%} and {cfg.min_rps:g} requests/s")
    best = min(ok, key=lambda t: t.p50_ms)
    if best is base:
        return base.config, f"kept {base.config.label}: the lowest median latency ({base.p50_ms:g} ms)"
    if not base.within(cfg):
        return best.config, (f"chose {best.config.label}: median {best.p50_ms:g} ms; {base.config.label} missed "
                             "the load test's bars")
    gain = base.p50_ms / best.p50_ms if best.p50_ms else float("inf")
    if gain < cfg.tune_min_gain:
        return base.config, (f"kept {base.config.label}: {best.config.label}'s median only {gain:.2f}x lower "
                             f"(< {cfg.tune_min_gain:g}x)")
    return best.config, (f"chose {best.config.label}: median {best.p50_ms:g} ms, {gain:.2f}x lower than "
                         f"{base.config.label}'s")


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
    if chosen != current:
        backend.tune(model, version, archive, chosen)
    tuning = Tuning(trials, chosen, reason)
    (out_dir / "tuning.json").write_text(json.dumps(tuning.to_dict(), indent=2))
    return tuning
