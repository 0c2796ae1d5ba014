"""Unit tests see default settings: the session stack's CANARYFLOW_* variables are hidden from them."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _default_settings(default_settings: None) -> None:
    """Unit tests see default settings, whatever the session's stack put in the environment."""


@pytest.fixture(autouse=True)
def _live_metrics_written_when_flushed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler's live metrics are written when a test flushes them: its flusher thread (once a second in a
    worker) would otherwise write a finished test's counters into whichever test's log capture runs then.
    tests/unit/test_prometheus_source.py tests the thread itself with its own interval."""
    from deployments.handler import LiveMetrics

    monkeypatch.setattr(LiveMetrics, "FLUSH_S", 3600.0)
