"""`canaryflow demo`, the command behind `make demo`, end to end on its own fresh stack."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import stack_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_demo_releases_ramps_and_rolls_back(tmp_path: Path) -> None:
    """v1 released and answering; v2 promoted through the canary steps under live load; v3, wrong only on
    inputs its holdout barely has, rolled back by the pairwise agreement checks; not one live request failed;
    nothing left running."""
    state = tmp_path / ".canaryflow"
    env = {**os.environ, **stack_env(state), "COLUMNS": "200"}
    exe = str(Path(sys.executable).parent / "canaryflow")
    done = subprocess.run([exe, "demo"], env=env, capture_output=True, text=True, timeout=840, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "registered breast-cancer-classifier v1" in out
    assert "release released" in out
    assert "/runs/flow-run/" in out
    assert '"model_version": "1"' in out and '"probabilities"' in out
    assert "curl -s -X POST http://127.0.0.1:" in out
    assert "canary analysis" in out and re.search(r"every check passed at \d+%.*; advancing to \d+%", out)
    assert "release released after" in out and "replacing v1" in out
    # v3 passes every offline gate; only the pairwise replay (same live rows, both versions) sees its fault
    assert re.search(r"release rolled_back after [\d.]+ s: canary: .*agreement [\d.]+ ", out), out[-4000:]
    assert re.search(r"live load: [1-9]\d* requests, 0 failed", out), out[-3000:]
    assert "champion is v2; the router answers with v2" in out
    assert "stack stopped" in out
    # nothing of the demo's stack is left running
    leftovers = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
                 if any(str(state) in part for part in (p.info["cmdline"] or []))]
    assert leftovers == []
