"""The load-test gate: locust, as a subprocess, against a staged candidate pinned through the router.

Locust is never imported here: ``import locust`` monkey-patches the whole process with gevent (shared/FACTS.md).
:func:`run_load_test` starts ``locust -f deployments/locustfile.py --headless ...`` with a hard timeout and reads
its ``--json-file`` (per-endpoint stats with the full response-time histogram); :func:`gate_load_test` judges the
numbers. A target that cannot be reached or a locust that crashed is an ERROR, never the model's failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from canaryflow.settings import LoadTestSettings
from validation.results import GateResult, Outcome, judged

GATE = "load_test"
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
JSON_STEM = "locust-stats"  # locust writes --json-file X to "X.json"
_LOG_TAIL = 1500


@dataclass(frozen=True)
class LoadTestResult:
    """What one locust run measured. ``error`` is set when the measurement itself could not be taken."""

    target: str
    users: int
    duration_s: float
    requests: int = 0
    failures: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    rps: float = 0.0
    failure_messages: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def failure_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failure_ratio": self.failure_ratio}


def percentile(histogram: dict[int, int], total: int, q: float) -> float:
    """Locust's own percentile over its histogram {rounded ms: count}, so numbers match its HTML report."""
    if not histogram or total <= 0:
        return 0.0
    within = int(total * q)
    seen = 0
    for ms in sorted(histogram, reverse=True):
        seen += histogram[ms]
        if total - seen <= within:
            return float(ms)
    return 0.0


def parse_locust_stats(entries: list[dict[str, Any]]) -> dict[str, float | int]:
    """Merge locust's ``--json-file`` entries (one per request name) into totals and percentiles.

    Each entry holds ``num_requests``, ``num_failures``, ``start_time``, ``last_request_timestamp`` (unix s),
    ``max_response_time`` and ``response_times``: a histogram {ms rounded as locust does: count}.
    """
    histogram: dict[int, int] = {}
    requests = failures = 0
    starts, ends, maxes = [], [], [0.0]
    for entry in entries:
        requests += int(entry.get("num_requests", 0))
        failures += int(entry.get("num_failures", 0))
        for ms, count in (entry.get("response_times") or {}).items():
            histogram[int(float(ms))] = histogram.get(int(float(ms)), 0) + int(count)
        if entry.get("start_time"):
            starts.append(float(entry["start_time"]))
        if entry.get("last_request_timestamp"):
            ends.append(float(entry["last_request_timestamp"]))
        maxes.append(float(entry.get("max_response_time") or 0.0))
    timed = sum(histogram.values())
    elapsed = max(ends) - min(starts) if starts and ends else 0.0
    return {
        "requests": requests, "failures": failures,
        "p50_ms": percentile(histogram, timed, 0.50), "p95_ms": percentile(histogram, timed, 0.95),
        "p99_ms": percentile(histogram, timed, 0.99), "max_ms": round(max(maxes), 2),
        "rps": round(requests / elapsed, 2) if elapsed > 0 else 0.0,
    }


def locust_command(host: str, settings: LoadTestSettings, out_dir: Path) -> list[str]:
    """The locust command line (locust 2.47 flags)."""
    exe = Path(sys.executable).parent / "locust"
    return [str(exe), "-f", str(LOCUSTFILE), "--headless", "--only-summary",
            "-u", str(settings.users), "-r", str(settings.spawn_rate), "-t", f"{settings.duration_s}s",
            "--host", host, "--json-file", str(out_dir / JSON_STEM), "--html", str(out_dir / "locust-report.html"),
            # failures are judged by the gate; a non-zero exit then means locust itself broke
            "--exit-code-on-error", "0", "--stop-timeout", "0"]


def _unreachable(url: str) -> str | None:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=3):
            return None
    except OSError as exc:
        return f"target {url} unreachable: {exc}"


def run_load_test(router_url: str, model: str, version: str | None, rows: np.ndarray,
                  settings: LoadTestSettings, out_dir: Path, timeout_s: float | None = None) -> LoadTestResult:
    """Load ``POST {router_url}/predictions/{model}`` (pinned to ``version``) with locust; never raises for a
    failed measurement: the result carries ``error`` instead. ``timeout_s`` defaults to the duration + 60 s."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = LoadTestResult(router_url, settings.users, float(settings.duration_s))
    rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    if rows.size == 0 or not np.isfinite(rows).all():
        return _with(base, error="no finite sample rows to send")
    if (reason := _unreachable(router_url)) is not None:
        return _with(base, error=reason)
    cmd = locust_command(router_url, settings, out_dir)
    if not Path(cmd[0]).exists():
        return _with(base, error=f"locust is not installed at {cmd[0]}")
    env = _locust_env(model, version, rows, settings, out_dir)
    log = out_dir / "locust.log"
    files = {"json": str(out_dir / f"{JSON_STEM}.json"), "html": str(out_dir / "locust-report.html"),
             "log": str(log)}
    limit = timeout_s if timeout_s is not None else settings.duration_s + 60.0
    started = time.monotonic()
    with log.open("w") as log_fh:
        # cwd = out_dir: no locust.conf or pyproject [tool.locust] of the caller's directory is picked up
        proc = subprocess.Popen(cmd, cwd=out_dir, env=env, stdout=log_fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: locust and nothing else
            proc.wait()
            return _with(base, files=files, error=f"locust did not finish within {limit:.0f} s and was killed")
    return _read_run(base, files, rc, time.monotonic() - started)


def _locust_env(model: str, version: str | None, rows: np.ndarray, settings: LoadTestSettings, out_dir: Path,
                user_header: str = "") -> dict[str, str]:
    rows_file = out_dir / "rows.json"
    rows_file.write_text(json.dumps(np.atleast_2d(np.asarray(rows, dtype=np.float64)).tolist()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "CANARYFLOW_LOCUST_"))}
    env.update({"CANARYFLOW_LOCUST_MODEL": model, "CANARYFLOW_LOCUST_VERSION": str(version or ""),
                "CANARYFLOW_LOCUST_ROWS_FILE": str(rows_file),
                "CANARYFLOW_LOCUST_ROWS_PER_REQUEST": str(settings.rows_per_request),
                "CANARYFLOW_LOCUST_RATE_PER_USER": str(settings.target_rps / settings.users),
                "CANARYFLOW_LOCUST_USER_HEADER": user_header})
    return env


def start_live_load(router_url: str, model: str, rows: np.ndarray, settings: LoadTestSettings, out_dir: Path,
                    user_header: str = "") -> subprocess.Popen:
    """Unpinned traffic in the background (the demo's and the canary bench's "live" users), each locust user with
    its own sticky key in ``user_header``; runs up to ``settings.duration_s``, stop it with :func:`stop_live_load`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = locust_command(router_url, settings, out_dir)
    env = _locust_env(model, None, rows, settings, out_dir, user_header)
    with (out_dir / "locust.log").open("w") as log_fh:
        return subprocess.Popen(cmd, cwd=out_dir, env=env, stdout=log_fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_live_load(proc: subprocess.Popen, out_dir: Path) -> dict[str, float | int]:
    """Stop background load (SIGINT: locust writes its stats) and return its request statistics."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        return parse_locust_stats(json.loads((Path(out_dir) / f"{JSON_STEM}.json").read_text()))
    except (OSError, ValueError):
        return {}


def _read_run(base: LoadTestResult, files: dict[str, str], rc: int, wall_s: float) -> LoadTestResult:
    log_tail = _tail(Path(files["log"]))
    stats_file = Path(files["json"])
    if rc != 0 or not stats_file.exists():
        return _with(base, files=files, error=f"locust exited with code {rc} after {wall_s:.1f} s: {log_tail}")
    stats = parse_locust_stats(json.loads(stats_file.read_text()))
    errors_file = Path(f"{stats_file.with_suffix('')}.errors.json")
    extra = json.loads(errors_file.read_text()) if errors_file.exists() else {}
    if extra.get("exceptions"):
        files["errors"] = str(errors_file)
        first = extra["exceptions"][0]
        return _with(base, files=files, error=f"the locust user raised {first['count']}x: {first['msg'][:300]}")
    messages = dict(sorted(extra.get("failures", {}).items(), key=lambda kv: -kv[1])[:10])
    if errors_file.exists():
        files["errors"] = str(errors_file)
    result = _with(base, files=files, failure_messages=messages, **stats)
    if result.requests == 0:
        return _with(result, error=f"locust made no requests in {wall_s:.1f} s: {log_tail}")
    no_answer = sum(n for msg, n in messages.items() if "no response" in msg)
    if no_answer and no_answer >= result.requests:
        return _with(result, error=f"target {base.target} stopped answering: every request failed "
                                   f"({next(iter(messages))})")
    return result


def _with(result: LoadTestResult, **changes: Any) -> LoadTestResult:
    return LoadTestResult(**{**asdict(result), **changes})


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-_LOG_TAIL:].strip()
    except OSError:
        return ""


def gate_load_test(result: LoadTestResult, settings: LoadTestSettings) -> GateResult:
    """PASSED when p95, failure ratio and throughput are all within ``settings``; ERROR when nothing was
    measured (unreachable target, crashed locust); INCONCLUSIVE when no request completed."""
    measured = {k: v for k, v in result.to_dict().items() if k not in ("files", "error")}
    measured["files"] = dict(result.files)
    thresholds = {"max_p95_ms": settings.max_p95_ms, "max_failure_ratio": settings.max_failure_ratio,
                  "min_rps": settings.min_rps}
    if result.error:
        return GateResult(GATE, Outcome.ERROR, f"load test could not be measured: {result.error}", measured,
                          thresholds)
    if result.requests == 0:
        return GateResult(GATE, Outcome.INCONCLUSIVE, "no request completed; nothing to judge", measured,
                          thresholds)
    p95, ratio, rps = result.p95_ms, result.failure_ratio, result.rps
    top = next(iter(result.failure_messages), "")
    checks = [
        (p95 <= settings.max_p95_ms,
         f"p95 {p95:.1f} ms {'<=' if p95 <= settings.max_p95_ms else '>'} {settings.max_p95_ms:.1f} ms"),
        (ratio <= settings.max_failure_ratio,
         f"failure ratio {ratio:.2%} {'<=' if ratio <= settings.max_failure_ratio else '>'} "
         f"{settings.max_failure_ratio:.2%}" + (f" (most common: {top[:120]})" if top and ratio > 0 else "")),
        (rps >= settings.min_rps,
         f"throughput {rps:.1f} req/s {'>=' if rps >= settings.min_rps else '<'} {settings.min_rps:.1f} req/s"),
    ]
    ok = all(passed for passed, _ in checks)
    shown = [text for passed, text in checks if passed == ok]
    context = f" [{result.requests} requests, {result.users} users, {result.duration_s:.0f} s]"
    return judged(GATE, ok, "; ".join(shown) + context, measured, thresholds)
