"""Fault injection for canary tests and drills: a subclass of the production handler, archived (as the .mar's
handler, with ``handler.py`` beside it) only into chaos builds, i.e. versions whose serving meta carries a
``chaos`` spec (the ``canaryflow.chaos`` tag, honoured only where ``canary.allow_chaos`` is on). The production
handler never injects anything."""

from __future__ import annotations

import os
import random
import re
import time
from typing import Any

import numpy as np

try:  # in a .mar: the production handler sits next to this file
    import handler as production
except ModuleNotFoundError:  # imported from the repository (tests)
    from deployments import handler as production

CHAOS_ERROR = "chaos: injected error"


class Chaos:
    """Injected faults, to show that the canary analysis catches a bad version. Applied per unpinned request:

    - ``error_ratio``: that share of requests answers HTTP 500 ``chaos: injected error`` (the worker lives on);
    - ``latency_ms``: each request is delayed that long;
    - ``flip`` ``{"column": j, "above": v}``: rows with feature j > v get their probability vector reversed;
    - ``permute``: every row's probability vector is rolled by one class;
    - ``armed_by`` NAME: the faults apply only while ``<traffic dir>/chaos-armed-NAME`` exists (a test arms a
      fault at a chosen moment, e.g. after promotion).
    """

    def __init__(self, spec: dict[str, Any], seed: int | None = None) -> None:
        self.error_ratio = float(spec.get("error_ratio", 0.0))
        self.latency_s = float(spec.get("latency_ms", 0)) / 1000
        self.flip = spec.get("flip")
        self.permute = bool(spec.get("permute", False))
        self.rng = random.Random(seed)
        armed_by = re.sub(r"[^A-Za-z0-9_-]", "", str(spec.get("armed_by") or ""))[:64]
        directory = os.environ.get(production.contract.TRAFFIC_DIR_ENV)
        self.armed_file = os.path.join(directory, f"chaos-armed-{armed_by}") if armed_by and directory else None

    def active(self) -> bool:
        return self.armed_file is None or os.path.exists(self.armed_file)

    def delay(self, live: int) -> None:
        if self.latency_s and live:
            time.sleep(self.latency_s * live)

    def fails(self) -> bool:
        return self.error_ratio > 0 and self.rng.random() < self.error_ratio

    def distort(self, probs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``probs`` (rows, classes) of one live request after flip and permute."""
        if self.flip is not None:
            hit = rows[:, self.flip["column"]] > self.flip["above"]
            probs = np.where(hit[:, None], probs[:, ::-1], probs)
        if self.permute:
            probs = np.roll(probs, 1, axis=1)
        return probs



class ChaosHandler(production.CanaryflowHandler):
    """The production handler plus the meta's ``chaos`` faults on live (unpinned) requests."""

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        self.chaos = Chaos(self.meta.chaos) if self.meta.chaos else None

    def postprocess(self, data: production.Batch) -> list[dict[str, Any]]:
        chaos = getattr(self, "chaos", None)
        if chaos is None or not chaos.active():
            return super().postprocess(data)
        chaos.delay(sum(data.live))
        x, parts, failed, start = data.x.numpy(), [], {}, 0
        for idx, count in enumerate(data.counts):
            part = data.probs[start : start + count]
            if data.live[idx] and idx not in data.refused:
                if chaos.fails():
                    failed[idx] = CHAOS_ERROR
                else:
                    part = chaos.distort(part, x[start : start + count])
            parts.append(part)
            start += count
        return self.answers(np.concatenate(parts), data.counts, failed, refused=data.refused)


handle = production.EntryPoint(ChaosHandler)
