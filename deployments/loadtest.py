"""The load-test gate: locust, as a subprocess, against a staged candidate pinned through the router.

Locust is never imported here: ``import locust`` monkey-patches the whole process with gevent (shared/FACTS.md).
:func:`run_load_test` starts ``locust -f deployments/locustfile.py --headless ...`` with a hard timeout and reads
its ``--json-file`` (per-endpoint stats with the full response-time histogram). A :class:`Peer` (the champion, or
the stack's calibration model) gets the same offered load from its own users in the same run, so the gate can tell
a slow model from a busy machine; :func:`gate_load_test` judges the numbers (see its docstring). A target that
cannot be reached or a locust that crashed is an ERROR, never the model's failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from canaryflow.core.settings import LoadTestSettings

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
JSON_STEM = "locust-stats"  # locust writes --json-file X to "X.json"
CANDIDATE, PEER = "candidate", "peer"  # locust request names (deployments/locustfile.py)
_LOG_TAIL = 1500


@dataclass(frozen=True)
class Peer:
    """The second target of a paired run: ``role`` "champion" (relative check too) or "calibration" (the stack's
    own tiny model, for a first release). ``error`` set: no peer could be loaded; the gate says so."""

    role: str
    model: str
    version: str
    rows: np.ndarray
    error: str | None = None

    @property
    def label(self) -> str:
        return f"champion v{self.version}" if self.role == "champion" else self.role


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
    role: str = CANDIDATE
    version: str = ""
    peer: LoadTestResult | None = None  # the peer measured in the same run, when there was one

    @property
    def failure_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    @property
    def label(self) -> str:
        return f"champion v{self.version}" if self.role == "champion" else self.role

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


def split_locust_stats(entries: list[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """:func:`parse_locust_stats` per request name (``candidate``, ``peer``): each its own throughput window."""
    names: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        names.setdefault(str(entry.get("name", "")), []).append(entry)
    return {name: parse_locust_stats(group) for name, group in names.items()}


def locust_command(host: str, settings: LoadTestSettings, out_dir: Path, paired: bool = False) -> list[str]:
    """The locust command line (locust 2.47 flags); ``paired``: as many users again for the peer."""
    exe = Path(sys.executable).parent / "locust"
    k = 2 if paired else 1
    return [str(exe), "-f", str(LOCUSTFILE), "--headless", "--only-summary",
            "-u", str(settings.users * k), "-r", str(settings.spawn_rate * k), "-t", f"{settings.duration_s}s",
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
                  settings: LoadTestSettings, out_dir: Path, timeout_s: float | None = None,
                  peer: Peer | None = None, pin: Mapping[str, str] | None = None) -> LoadTestResult:
    """Load ``POST {router_url}/predictions/{model}`` (pinned to ``version``) with locust, and ``peer`` with the
    same offered load in the same run; never raises for a failed measurement: the result (or its ``peer``)
    carries ``error`` instead. ``timeout_s`` defaults to the duration + 60 s. ``pin``: the router's pin
    credentials, sent with every pinned request."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = LoadTestResult(router_url, settings.users, float(settings.duration_s), version=str(version or ""))
    rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    if rows.size == 0 or not np.isfinite(rows).all():
        return _with(base, error="no finite sample rows to send")
    if (reason := _unreachable(router_url)) is not None:
        return _with(base, error=reason)
    paired = peer is not None and peer.error is None
    cmd = locust_command(router_url, settings, out_dir, paired)
    if not Path(cmd[0]).exists():
        return _with(base, error=f"locust is not installed at {cmd[0]}")
    env = _locust_env(model, version, rows, settings, out_dir, name=CANDIDATE, peer=peer if paired else None,
                      pin=pin)
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
    result = _read_run(base, files, rc, time.monotonic() - started, peer if paired else None)
    if peer is not None and not paired:
        result = _with(result, peer=_peer_base(base, peer, error=peer.error))
    return result


def _peer_base(base: LoadTestResult, peer: Peer, **changes: Any) -> LoadTestResult:
    return LoadTestResult(base.target, base.users, base.duration_s, role=peer.role, version=peer.version,
                          **changes)


def _locust_env(model: str, version: str | None, rows: np.ndarray, settings: LoadTestSettings, out_dir: Path,
                user_header: str = "", name: str = "", peer: Peer | None = None,
                pin: Mapping[str, str] | None = None) -> dict[str, str]:
    rows_file = out_dir / "rows.json"
    rows_file.write_text(json.dumps(np.atleast_2d(np.asarray(rows, dtype=np.float64)).tolist()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "CANARYFLOW_LOCUST_"))}
    env.update({"CANARYFLOW_LOCUST_MODEL": model, "CANARYFLOW_LOCUST_VERSION": str(version or ""),
                "CANARYFLOW_LOCUST_ROWS_FILE": str(rows_file),
                "CANARYFLOW_LOCUST_ROWS_PER_REQUEST": str(settings.rows_per_request),
                "CANARYFLOW_LOCUST_RATE_PER_USER": str(settings.target_rps / settings.users),
                "CANARYFLOW_LOCUST_USER_HEADER": user_header,
                "CANARYFLOW_LOCUST_PIN_HEADERS": json.dumps(dict(pin or {}))})
    if name:
        env["CANARYFLOW_LOCUST_NAME"] = name
    if peer is not None:
        peer_rows = out_dir / "peer-rows.json"
        peer_rows.write_text(json.dumps(np.atleast_2d(np.asarray(peer.rows, dtype=np.float64)).tolist()))
        env.update({"CANARYFLOW_LOCUST_PEER_MODEL": peer.model, "CANARYFLOW_LOCUST_PEER_VERSION": peer.version,
                    "CANARYFLOW_LOCUST_PEER_ROWS_FILE": str(peer_rows)})
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
    """Stop background load (SIGTERM: locust writes its stats; SIGINT would be ignored by a locust started from a
    background job) and return its request statistics."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        return parse_locust_stats(json.loads((Path(out_dir) / f"{JSON_STEM}.json").read_text()))
    except (OSError, ValueError):
        return {}


def _read_run(base: LoadTestResult, files: dict[str, str], rc: int, wall_s: float,
              peer: Peer | None = None) -> LoadTestResult:
    log_tail = _tail(Path(files["log"]))
    stats_file = Path(files["json"])
    if rc != 0 or not stats_file.exists():
        return _with(base, files=files, error=f"locust exited with code {rc} after {wall_s:.1f} s: {log_tail}")
    by_name = split_locust_stats(json.loads(stats_file.read_text()))
    errors_file = Path(f"{stats_file.with_suffix('')}.errors.json")
    extra = json.loads(errors_file.read_text()) if errors_file.exists() else {}
    if errors_file.exists():
        files["errors"] = str(errors_file)
    if extra.get("exceptions"):
        first = extra["exceptions"][0]
        return _with(base, files=files, error=f"the locust user raised {first['count']}x: {first['msg'][:300]}")
    messages = extra.get("by_name", {})
    result = _target(_with(base, files=files), by_name.get(CANDIDATE, {}),
                     messages.get(CANDIDATE, extra.get("failures", {}) if peer is None else {}), wall_s, log_tail)
    if peer is not None:
        result = _with(result, peer=_target(_peer_base(base, peer), by_name.get(PEER, {}), messages.get(PEER, {}),
                                            wall_s, log_tail))
    return result


def _target(base: LoadTestResult, stats: dict[str, float | int], failures: dict[str, int], wall_s: float,
            log_tail: str) -> LoadTestResult:
    """One request name's numbers; ``error`` when it made no request or none got an HTTP answer."""
    messages = dict(sorted(failures.items(), key=lambda kv: -kv[1])[:10])
    result = _with(base, failure_messages=messages, **stats)
    if result.requests == 0:
        return _with(result, error=f"locust made no requests to the {base.role} in {wall_s:.1f} s: {log_tail}")
    no_answer = sum(n for msg, n in messages.items() if "no response" in msg)
    if no_answer and no_answer >= result.requests:
        return _with(result, error=f"target {base.target} stopped answering: every request failed "
                                   f"({next(iter(messages))})")
    return result


def _with(result: LoadTestResult, **changes: Any) -> LoadTestResult:
    return replace(result, **changes)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-_LOG_TAIL:].strip()
    except OSError:
        return ""

