"""The locust users of the load-test gate. Loaded ONLY by the locust subprocess that deployments/loadtest.py starts.

``import locust`` monkey-patches the whole interpreter with gevent (shared/FACTS.md), so nothing in the pipeline,
the CLI or pytest may import this module. It is configured through the environment alone:

- ``CANARYFLOW_LOCUST_MODEL``: model name, posted to ``/predictions/<model>``
- ``CANARYFLOW_LOCUST_VERSION``: sent as ``X-Model-Version`` so the router pins the staged candidate (optional)
- ``CANARYFLOW_LOCUST_PIN_HEADERS``: JSON object of headers sent with the pinned requests (the router's pin key)
- ``CANARYFLOW_LOCUST_ROWS_FILE``: a JSON file holding a list of sample rows (lists of numbers)
- ``CANARYFLOW_LOCUST_NAME``: the request name in locust's statistics (default ``/predictions/[model]``)
- ``CANARYFLOW_LOCUST_PEER_MODEL``, ``_PEER_VERSION``, ``_PEER_ROWS_FILE``: a second, pinned target (the gate's
  peer, named ``peer``), loaded by its own users at the same offered load in the same run; the caller doubles -u
- ``CANARYFLOW_LOCUST_ROWS_PER_REQUEST``: rows per request (default 1)
- ``CANARYFLOW_LOCUST_RATE_PER_USER``: requests per second per user (0: closed loop, as fast as answers come)
- ``CANARYFLOW_LOCUST_USER_HEADER``: when set, each user sends its own id in this header (sticky canary split)

Locust's ``--json-file`` holds request statistics but no failure messages (and its CSV misses the last second),
so at quitting the failure messages (per request name too) and exceptions go to ``<json-file>.errors.json``.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from locust import FastHttpUser, constant, constant_throughput, events, task

PEER_NAME = "peer"


def _bodies(rows_file: str, per: int) -> list[bytes]:
    """Pre-serialised bodies (so the client spends no time on JSON). Read when locust imports this file: a bad
    configuration stops locust at start-up, not user by user."""
    rows = json.loads(Path(rows_file).read_text(encoding="utf-8"))
    if not isinstance(rows, list) or not rows:
        raise SystemExit(f"{rows_file} must hold a non-empty JSON list of rows")
    cycle = itertools.cycle(rows)
    count = max(1, len(rows) // per)
    return [json.dumps({"inputs": [next(cycle) for _ in range(per)]}).encode() for _ in range(count)]


def _env(key: str, default: str = "") -> str:
    return os.environ.get(f"CANARYFLOW_LOCUST_{key}", default)


if not _env("MODEL") or not _env("ROWS_FILE"):
    raise SystemExit("set CANARYFLOW_LOCUST_MODEL and CANARYFLOW_LOCUST_ROWS_FILE (deployments/loadtest.py does)")
ROWS_PER_REQUEST = max(1, int(_env("ROWS_PER_REQUEST", "1")))
PEER_MODEL = _env("PEER_MODEL")
if PEER_MODEL and not _env("PEER_ROWS_FILE"):
    raise SystemExit("CANARYFLOW_LOCUST_PEER_MODEL needs CANARYFLOW_LOCUST_PEER_ROWS_FILE")
RATE_PER_USER = float(_env("RATE_PER_USER", "0") or 0)
USER_HEADER = _env("USER_HEADER")
# the router's pin credentials (X-Canaryflow-Pin-Key), sent with the pinned requests only
PIN_HEADERS = {str(k): str(v) for k, v in json.loads(_env("PIN_HEADERS", "{}") or "{}").items()}
_user_ids = itertools.count(1)


class PredictionUser(FastHttpUser):
    """Each user posts at a fixed rate (the p95 gate judges latency at a stated load, not at saturation, where
    it would measure the queue of a 2-core machine); with no rate, a closed loop with no think time."""

    wait_time = constant_throughput(RATE_PER_USER) if RATE_PER_USER > 0 else constant(0)
    target_model = _env("MODEL")
    target_version = _env("VERSION")
    request_name = _env("NAME", "/predictions/[model]")
    bodies = _bodies(_env("ROWS_FILE"), ROWS_PER_REQUEST)

    def on_start(self) -> None:
        self.headers = {"Content-Type": "application/json"}
        if self.target_version:
            self.headers["X-Model-Version"] = self.target_version
            self.headers.update(PIN_HEADERS)  # the router honours the pipeline's pins only
        # each locust user plays 50 sticky end users in turn: a handful of locust users alone would put the whole
        # load on one side of a 10-20 % split
        self.end_users = itertools.cycle([f"user-{os.getpid()}-{next(_user_ids)}-{k}" for k in range(50)])
        self.turn = itertools.cycle(self.bodies)

    @task
    def predict(self) -> None:
        if USER_HEADER:
            self.headers[USER_HEADER] = next(self.end_users)
        with self.client.post(f"/predictions/{self.target_model}", data=next(self.turn), headers=self.headers,
                              name=self.request_name, catch_response=True) as resp:
            if not resp.status_code:  # no HTTP answer at all: refused, reset, timed out
                resp.failure(f"no response: {resp.error!r}"[:200])
                return
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                predictions = json.loads(resp.content).get("predictions")
            except (ValueError, AttributeError):
                resp.failure("answer is not a JSON object")
                return
            if not isinstance(predictions, list) or len(predictions) != ROWS_PER_REQUEST:
                got = len(predictions) if isinstance(predictions, list) else "no"
                resp.failure(f"{got} predictions for {ROWS_PER_REQUEST} rows")
            else:
                resp.success()


class PeerUser(PredictionUser):
    """The peer's users: own users (a slow candidate must not hold back the peer's requests), same rate, same
    run; locust spreads -u evenly over the two classes and interleaves their start."""

    abstract = not PEER_MODEL  # no peer configured: locust spawns only PredictionUser
    target_model = PEER_MODEL
    target_version = _env("PEER_VERSION")
    request_name = PEER_NAME
    bodies = _bodies(_env("PEER_ROWS_FILE"), ROWS_PER_REQUEST) if PEER_MODEL else []


@events.quitting.add_listener
def _write_errors(environment, **_kwargs) -> None:  # noqa: ANN001 - locust's Environment
    json_file = getattr(environment.parsed_options, "json_file", None)
    if not json_file or environment.runner is None:
        return
    stats = environment.runner.stats
    failures: dict[str, int] = {}
    by_name: dict[str, dict[str, int]] = {}
    for err in stats.errors.values():
        message = err.to_name().removeprefix(f"{err.method} {err.name}: ")  # the name is the key: message alone
        failures[message] = failures.get(message, 0) + err.occurrences
        named = by_name.setdefault(err.name, {})
        named[message] = named.get(message, 0) + err.occurrences
    exceptions = [{"count": e["count"], "msg": e["msg"]} for e in environment.runner.exceptions.values()]
    Path(f"{json_file}.errors.json").write_text(json.dumps({"failures": failures, "by_name": by_name,
                                                            "exceptions": exceptions}))
