"""Unit tests see default settings: the session stack's CANARYFLOW_* variables are hidden from them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from canaryflow.settings import reset_settings


@pytest.fixture(autouse=True)
def _default_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("CANARYFLOW_"):
            monkeypatch.delenv(key)
    reset_settings()
    yield
    reset_settings()
