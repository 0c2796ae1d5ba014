"""Unit tests see default settings: the session stack's CANARYFLOW_* variables are hidden from them."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _default_settings(default_settings: None) -> None:
    """Unit tests see default settings, whatever the session's stack put in the environment."""
