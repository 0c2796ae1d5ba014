"""tests/run_halves.py repeats each session's outcome at the end: a CI log cut to its tail still names what failed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("run_halves", Path(__file__).parents[1] / "run_halves.py")
assert _spec and _spec.loader
run_halves = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_halves)


def test_summary_keeps_failures_and_the_final_count_not_the_skip_reasons():
    lines = ["=========== short test summary info ============",
             "SKIPPED [1] tests/k8s/test_x.py:12: no KUBEBUILDER_ASSETS",
             "FAILED tests/e2e/test_demo.py::test_demo - AssertionError: v3 promoted",
             "ERROR tests/drills/test_release_drills.py::test_drill - TimeoutError",
             "========= 1 failed, 23 passed, 1 skipped, 1 error in 1234.56s (0:20:34) ========="]
    assert run_halves.summary_lines(lines) == [lines[2], lines[3], lines[4]]


def test_summary_of_a_quiet_green_session_is_its_count():
    assert run_halves.summary_lines(["907 passed, 3 skipped in 1183.20s (0:19:43)"]) == [
        "907 passed, 3 skipped in 1183.20s (0:19:43)"]
    assert run_halves.summary_lines([]) == []


def test_every_second_session_file_exists_and_the_first_session_ignores_them():
    cmds = run_halves.commands(["-x"])
    for f in run_halves.SECOND:
        assert f"--ignore={f}" in cmds["1"]
        assert f in cmds["2"]
    assert "-x" in cmds["1"] and "-x" in cmds["2"]
