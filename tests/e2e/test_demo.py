"""`canaryflow demo`, the command behind `make demo`, end to end on its own fresh stack."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from tasks.report import artifact_key
from tests.conftest import stack_env
from tests.e2e import browser

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_demo_releases_ramps_and_rolls_back(tmp_path: Path) -> None:
    """v1 released and answering; v2 promoted through the canary steps under live load; v3, wrong only on
    inputs its holdout barely has, rolled back by the pairwise agreement checks; not one live request failed;
    nothing left running."""
    state = tmp_path / ".canaryflow"
    env = {**os.environ, **stack_env(state), "COLUMNS": "200"}
    exe = str(Path(sys.executable).parent / "canaryflow")
    try:
        # --keep: the UIs are looked at in a browser before the stack stops
        done = subprocess.run([exe, "demo", "--keep"], env=env, capture_output=True, text=True, timeout=840,
                              cwd=tmp_path)
        out = done.stdout + done.stderr
        _check_output(done.returncode, out)
        _check_the_uis_tell_the_story(out, state / "screenshots")
    finally:
        down = subprocess.run([exe, "down"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert down.returncode == 0 and "stack stopped" in down.stdout, down.stdout + down.stderr
    # nothing of the demo's stack is left running
    leftovers = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
                 if any(str(state) in part for part in (p.info["cmdline"] or []))]
    assert leftovers == []


def _check_output(returncode: int, out: str) -> None:
    assert returncode == 0, out[-4000:]
    assert "registered breast-cancer-classifier v1" in out
    assert "release released" in out
    assert "/runs/flow-run/" in out
    assert '"model_version": "1"' in out and '"probabilities"' in out
    assert "curl -s -X POST http://127.0.0.1:" in out
    assert "canary analysis" in out and re.search(r"every check passed at \d+%.*; advancing to \d+%", out)
    assert "release released after" in out and "replacing v1" in out
    # v3 passes every offline gate; only the pairwise replay (same live rows, both versions) sees its fault
    assert re.search(r"release rolled_back after [\d.]+ s: canary: .*agreement [\d.]+ ", out), out[-4000:]
    _deciding_check(out)
    assert re.search(r"live load: [1-9]\d* requests, 0 failed", out), out[-3000:]
    assert "champion is v2; the router answers with v2" in out
    assert "stack left running" in out


def _deciding_check(out: str) -> str:
    """The pairwise check among those that failed the deciding analysis, as the CLI printed them
    (``canary: <check>: <reason>; <check>: <reason>``)."""
    found = re.search(r"release rolled_back after [\d.]+ s: canary: (.*)", out)
    assert found, out[-4000:]
    failed = re.findall(r"(?:^|; )(\w+): ", found[1])
    pairwise = [check for check in failed if check in ("segment_agreement", "agreement")]
    assert pairwise, f"v3 was not rolled back by a pairwise check: {found[0]}"
    return pairwise[0]


def _links(out: str, pattern: str) -> list[str]:
    return re.findall(pattern + r"(http://\S+)", out)


def _check_the_uis_tell_the_story(out: str, shots: Path) -> None:
    """What a person sees in the two UIs, rendered by a headless chromium: for v3, the Prefect run page, the
    release artifact and the MLflow release run each say what happened (rolled back), why (the deciding check)
    and what serves now (v2); the runs list shows every release's outcome; the replaced v1's model version page
    says it was replaced. Screenshots of each page are kept under the state dir."""
    runs = _links(out, r"flow run release-breast-cancer-classifier-v\d: ")
    mlflow_runs = _links(out, r"MLflow release run: ")
    versions = _links(out, r"MLflow model version: ")
    assert len(runs) == len(mlflow_runs) == len(versions) == 3, out[-3000:]
    prefect = runs[2].split("/runs/flow-run/")[0]
    # the pairwise check that decided, as the CLI said it: which of the two gets there first depends on how many of
    # the replayed rows were the segment's so far (overall agreement is judged from 100 pairs, a segment from 20
    # pairs in its bin)
    story = ["rolled back at", _deciding_check(out), "v2 still serves"]
    pages = {
        "prefect-runs": (f"{prefect}/runs", ["Released", "RolledBack", "release-breast-cancer-classifier-v3"]),
        # the Details tab holds the state message (cut at about 70 characters: the headline says what happened and
        # who serves first); the Logs tab (the default) shows only the first page of a run's logs
        "prefect-v3-flow-run": (f"{runs[2]}?tab=Details", ["RolledBack", "State Message", "rolled back at",
                                                          "v2 still serves"]),
        "prefect-v3-release-artifact": (f"{prefect}/artifacts/artifact/{_artifact_id(prefect, '3')}",
                                        [*story, "serves now", "v2 (champion)", "weight measured"]),
        "mlflow-v3-release-run": (mlflow_runs[2], ["v3 release of breast-cancer-classifier", *story]),
        "mlflow-v1-model-version": (versions[0], ["replaced as champion by v2"]),
    }
    for name, (url, needles) in pages.items():
        browser.wait_for_text(url, needles)
        browser.screenshot(url, shots / f"{name}.png")


def _artifact_id(prefect_ui: str, version: str) -> str:
    found = httpx.post(f"{prefect_ui}/api/artifacts/filter", timeout=30, json={
        "artifacts": {"key": {"any_": [artifact_key("breast-cancer-classifier", version)]}}}).json()
    assert found, f"no release artifact for v{version}"
    return found[0]["id"]
