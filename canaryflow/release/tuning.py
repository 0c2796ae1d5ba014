"""Serving settings chosen by measurement: the staged candidate is served with serving.* and with each setting of
``loadtest.tune`` (workers x server-side batch size), loaded through the router for a few seconds each, twice: at
the load test's offered load (``target_rps``: the typical request's median and the gate's bars) and closed-loop
with the gate's users (capacity: requests/s when clients wait for nothing but answers).

A setting replaces serving.* when it answers within the load test's bars at the offered load, its median there is
at most ``tune_max_added_ms`` above serving.*'s, and its capacity is ``tune_min_gain`` times serving.*'s: headroom
bought with at most that much latency for the typical request. Server-side batching is the case in point: on the
bench's 1 ms MLP, batch 8 waiting at most 1 ms served 4x the requests/s of no batching on one core (TorchServe
direct, c=8), for +1 ms at one connection; waiting 5 ms had cost +6 ms (served adaptively now, a batched setting
costs a lone request nothing: deployments/torchserve.py). Measured in the same release, ``tune_rounds`` times
each, interleaved (A/B/C/C/B/A), and each setting counts with its best median and its best capacity: the machine
is shared (the bench releases three models side by side), a busy moment is not a slower setting, and a calm one
not a faster setting. Before, only serving.* was measured again (A/B/A, when a challenger won): a challenger that
lost its one trial to a busy moment never had a second (``make bench``, 18:47: the CNN's batch 8 left out on a
median of 10 ms against serving.*'s 7 + 2, the MLP's on 1.08x after 1.46x).

Earlier rules, each caught by ``make bench``: most closed-loop requests/s alone (batch 8 at a 5 ms wait: 7.5 ms
at one connection for a 1 ms model); the lowest p95 or median at the offered load alone (a concurrent release
blew serving.*'s p95 up; and at 100 requests/s nothing queues, so capacity never showed).

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
    """One setting's two bursts: at the offered load (requests, rps, latencies, failures) and closed-loop
    (``capacity_rps``: requests answered without failure, per second)."""

    config: ServingConfig
    requests: int
    rps: float
    p50_ms: float
    p95_ms: float
    failure_ratio: float
    capacity_rps: float
    error: str | None = None

    @classmethod
    def of(cls, config: ServingConfig, offered: LoadTestResult, closed: LoadTestResult | None) -> Trial:
        capacity = closed.rps * (1 - closed.failure_ratio) if closed is not None and closed.error is None else 0.0
        error = offered.error or (closed.error if closed is not None else None)
        return cls(config, offered.requests, round(offered.rps, 1), round(offered.p50_ms, 2),
                   round(offered.p95_ms, 2), round(offered.failure_ratio, 4), round(capacity, 1), error)

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
        lines = ["| setting | requests/s | p50 ms | p95 ms | failures | capacity requests/s | |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for t in self.trials:
            mark = "**chosen**" if t.config == self.chosen else (t.error or "")
            lines.append(f"| {t.config.label} | {t.rps:g} | {t.p50_ms:g} | {t.p95_ms:g} | {t.failure_ratio:.2%} "
                         f"| {t.capacity_rps:g} | {mark} |")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Best:
    """A setting's best numbers over its trials: within the bars in any; its best median (of the trials within
    the bars, when there are some) and its best capacity."""

    config: ServingConfig
    within: bool
    p50_ms: float
    capacity_rps: float

    @classmethod
    def of(cls, config: ServingConfig, trials: list[Trial], cfg: LoadTestSettings) -> _Best:
        mine = [t for t in trials if t.config == config]
        within = [t for t in mine if t.within(cfg)]
        return cls(config, bool(within), min(t.p50_ms for t in within or mine), max(t.capacity_rps for t in mine))


def choose(trials: list[Trial], cfg: LoadTestSettings) -> tuple[ServingConfig, str]:
    """The setting to keep: serving.* (the first trial's) unless another within the bars, whose median at the
    offered load is at most ``tune_max_added_ms`` above serving.*'s, has ``tune_min_gain`` times its capacity (the
    most capacity of those wins). Every setting measured more than once counts with its best median and its best
    capacity: the machine is shared, and each setting gets the same chance of a calm moment. A setting that
    missed a bar (p95, failures, ``min_rps``) in every trial never wins; serving.* missing one is left to the gate,
    which tells a busy machine from a slow model (a peer in the same run), which this cannot."""
    base = trials[0].config
    ours = _Best.of(base, trials, cfg)
    capacity = ours.capacity_rps
    budget = ours.p50_ms + cfg.tune_max_added_ms
    configs = list(dict.fromkeys(t.config for t in trials if t.config != base))
    others = [b for b in (_Best.of(c, trials, cfg) for c in configs) if b.within and b.p50_ms <= budget]
    if not others:
        return base, (f"kept {base.label}: no other setting answered within the load test's bars and a median of "
                      f"{budget:g} ms ({ours.p50_ms:g} + {cfg.tune_max_added_ms:g})")
    best = max(others, key=lambda b: b.capacity_rps)
    gain = best.capacity_rps / capacity if capacity else float("inf")
    if gain < cfg.tune_min_gain:
        return base, (f"kept {base.label} ({capacity:g} requests/s closed-loop): {best.config.label} served only "
                      f"{gain:.2f}x that (< {cfg.tune_min_gain:g}x)")
    return best.config, (f"chose {best.config.label}: {best.capacity_rps:g} requests/s closed-loop, {gain:.2f}x "
                         f"{base.label}'s, median {best.p50_ms:g} ms at the offered load ({base.label}: "
                         f"{ours.p50_ms:g} ms)")


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
    offered = cfg.model_copy(update={"duration_s": cfg.tune_duration_s})  # the gate's users and offered load
    closed = offered.model_copy(update={"target_rps": 0.0})  # the same users, each as fast as answers come

    def measure(config: ServingConfig, name: str) -> Trial:
        at_load = run_load_test(router_url, model, version, rows, offered, out_dir / name, pin=pin)
        if at_load.error is not None:
            return Trial.of(config, at_load, None)
        return Trial.of(config, at_load, run_load_test(router_url, model, version, rows, closed,
                                                       out_dir / f"{name}-closed", pin=pin))

    trials: list[Trial] = []
    for round_ in range(cfg.tune_rounds):  # A/B/C/C/B/A: a busy moment hits one trial, never a setting's all
        order = tries if round_ % 2 == 0 else tries[::-1]
        for config in order:
            if config != current:
                backend.tune(model, version, archive, config)
                current = config
            trials.append(measure(config, f"{len(trials)}-{config.workers}x{config.batch_size}"))
    chosen, reason = choose(trials, cfg)
    if chosen != current:
        backend.tune(model, version, archive, chosen)
    tuning = Tuning(trials, chosen, reason)
    (out_dir / "tuning.json").write_text(json.dumps(tuning.to_dict(), indent=2))
    return tuning
