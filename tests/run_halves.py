"""`make test`: the suite as two pytest sessions side by side, one per core, each with its own local stack.

Most of a release on the stack is one busy core (a flow process running gates, a sandboxed model) or a wait (canary
intervals, polls), so two sessions finish the suite in a little over half the time of one. The split is by test
file: ``SECOND`` names the files of the second session; the first runs every other test, so a new test file is
never left out. Each session orders its own tests (tests/conftest.py: those without the stack first, the stack
stoppers last). Lines are printed as they come, prefixed by their session; when both have ended, each session's
short test summary (its FAILED/ERROR lines and its final count) is printed again at the very end, so a CI log cut to
its tail still names what failed; the exit status is the worse of the two.

    python tests/run_halves.py [pytest args...]   # e.g. -x, or -k release
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# about half of the suite's time (tests/e2e/test_canary.py alone is a fifth of it: it stays in the first)
SECOND = ["tests/drills/test_release_drills.py", "tests/e2e/test_release_gates.py", "tests/e2e/test_demo.py",
          "tests/integration/test_batch_inference.py", "tests/integration/test_external_mlflow.py",
          "tests/integration/test_batch_dask.py"]


def commands(extra: list[str]) -> dict[str, list[str]]:
    # no cache plugin: two sessions would write .pytest_cache at once
    pytest = [sys.executable, "-m", "pytest", "-q", "-ra", "--durations=15", "-p", "no:cacheprovider", *extra]
    missing = [f for f in SECOND if not (ROOT / f).is_file()]
    if missing:
        raise SystemExit(f"tests/run_halves.py names test files that do not exist: {missing}")
    return {"1": [*pytest, "tests", *(f"--ignore={f}" for f in SECOND)], "2": [*pytest, *SECOND]}


# pytest's own summary: the "short test summary info" block (-ra) and the final "N passed, M failed in Xs" line
_SUMMARY_START = re.compile(r"^=+ short test summary info =+$")
_FINAL = re.compile(r"^=*\s*\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b.* in [\d.]+s")
_OUTCOME = re.compile(r"^(FAILED|ERROR|XPASS) ")


def summary_lines(lines: list[str]) -> list[str]:
    """What a reader of the tail needs: the failed/errored tests and the final count (not skips' reasons)."""
    picked = [line for line in lines if _OUTCOME.match(line)]
    final = [line for line in lines if _FINAL.match(line)]
    return picked + final[-1:]


def _pump(name: str, proc: subprocess.Popen[str], lock: threading.Lock, summary: list[str]) -> None:
    assert proc.stdout is not None
    in_summary = False
    for line in proc.stdout:
        if _SUMMARY_START.match(line.rstrip("\n")):
            in_summary = True
        if in_summary or _FINAL.match(line):
            summary.append(line.rstrip("\n"))
        with lock:
            sys.stdout.write(f"[{name}] {line}")
            sys.stdout.flush()


def main(extra: list[str]) -> int:
    lock = threading.Lock()
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1)
             for name, cmd in commands(extra).items()}
    summaries: dict[str, list[str]] = {name: [] for name in procs}
    pumps = [threading.Thread(target=_pump, args=(name, proc, lock, summaries[name])) for name, proc in procs.items()]
    for pump in pumps:
        pump.start()
    try:
        codes = {name: proc.wait() for name, proc in procs.items()}
    except KeyboardInterrupt:  # the sessions got the same SIGINT: their finalizers stop their stacks
        codes = {name: proc.wait() for name, proc in procs.items()}
    for pump in pumps:
        pump.join()
    for name, lines in summaries.items():
        for line in summary_lines(lines) or ["no pytest summary (did the session start?)"]:
            print(f"[{name}] summary: {line}", flush=True)
    print("sessions: " + ", ".join(f"[{name}] exit {code}" for name, code in codes.items()), flush=True)
    # 5 (no tests collected) in one half is not a failure when the other ran tests (e.g. a -k that selects one file)
    ran = [code for code in codes.values() if code != 5]
    return max(ran) if ran else 5


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
