"""The locust user of the load-test gate. Loaded ONLY by the locust subprocess that deployments/loadtest.py starts.

``import locust`` monkey-patches the whole interpreter with gevent (shared/FACTS.md), so nothing in the pipeline,
the CLI or pytest may import this module. It is configured through the environment alone:

- ``CANARYFLOW_LOCUST_MODEL``: model name, posted to ``/predictions/<model>``
- ``CANARYFLOW_LOCUST_VERSION``: sent as ``X-Model-Version`` so the router pins the staged candidate (optional)
- ``CANARYFLOW_LOCUST_ROWS_FILE``: a JSON file holding a list of sample rows (lists of numbers)
- ``CANARYFLOW_LOCUST_ROWS_PER_REQUEST``: rows per request (default 1)
- ``CANARYFLOW_LOCUST_RATE_PER_USER``: requests per second per user (0: closed loop, as fast as answers come)
- ``CANARYFLOW_LOCUST_USER_HEADER``: when set, each user sends its own id in this header (sticky canary split)

Locust's ``--json-file`` holds request statistics but no failure messages (and its CSV misses the last second),
so at quitting the failure messages and exceptions are written to ``<json-file>.errors.json`` as well.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from locust import FastHttpUser, constant, constant_throughput, events, task


def _config() -> tuple[str, str, int, list[bytes]]:
    """Model, pinned version, rows per request and pre-serialised bodies (so the client spends no time on JSON).

    Read when locust imports this file: a bad configuration stops locust at start-up, not user by user.
    """
    model = os.environ.get("CANARYFLOW_LOCUST_MODEL", "")
    rows_file = os.environ.get("CANARYFLOW_LOCUST_ROWS_FILE", "")
    if not model or not rows_file:
        raise SystemExit("set CANARYFLOW_LOCUST_MODEL and CANARYFLOW_LOCUST_ROWS_FILE (deployments/loadtest.py does)")
    rows = json.loads(Path(rows_file).read_text(encoding="utf-8"))
    if not isinstance(rows, list) or not rows:
        raise SystemExit(f"{rows_file} must hold a non-empty JSON list of rows")
    per = max(1, int(os.environ.get("CANARYFLOW_LOCUST_ROWS_PER_REQUEST", "1")))
    cycle = itertools.cycle(rows)
    count = max(1, len(rows) // per)
    bodies = [json.dumps({"inputs": [next(cycle) for _ in range(per)]}).encode() for _ in range(count)]
    return model, os.environ.get("CANARYFLOW_LOCUST_VERSION", ""), per, bodies


MODEL, VERSION, ROWS_PER_REQUEST, BODIES = _config()


RATE_PER_USER = float(os.environ.get("CANARYFLOW_LOCUST_RATE_PER_USER", "0") or 0)
USER_HEADER = os.environ.get("CANARYFLOW_LOCUST_USER_HEADER", "")
_user_ids = itertools.count(1)


class PredictionUser(FastHttpUser):
    """Each user posts at a fixed rate (the p95 gate judges latency at a stated load, not at saturation, where
    it would measure the queue of a 2-core machine); with no rate, a closed loop with no think time."""

    wait_time = constant_throughput(RATE_PER_USER) if RATE_PER_USER > 0 else constant(0)

    def on_start(self) -> None:
        self.headers = {"Content-Type": "application/json"}
        if VERSION:
            self.headers["X-Model-Version"] = VERSION
        # each locust user plays 50 sticky end users in turn: a handful of locust users alone would put the whole
        # load on one side of a 10-20 % split
        self.end_users = itertools.cycle([f"user-{os.getpid()}-{next(_user_ids)}-{k}" for k in range(50)])
        self.turn = itertools.cycle(BODIES)

    @task
    def predict(self) -> None:
        if USER_HEADER:
            self.headers[USER_HEADER] = next(self.end_users)
        with self.client.post(f"/predictions/{MODEL}", data=next(self.turn), headers=self.headers,
                              name="/predictions/[model]", catch_response=True) as resp:
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


@events.quitting.add_listener
def _write_errors(environment, **_kwargs) -> None:  # noqa: ANN001 - locust's Environment
    json_file = getattr(environment.parsed_options, "json_file", None)
    if not json_file or environment.runner is None:
        return
    stats = environment.runner.stats
    failures: dict[str, int] = {}
    for err in stats.errors.values():
        message = err.to_name().removeprefix(f"{err.method} {err.name}: ")  # one endpoint: the message alone
        failures[message] = failures.get(message, 0) + err.occurrences
    exceptions = [{"count": e["count"], "msg": e["msg"]} for e in environment.runner.exceptions.values()]
    Path(f"{json_file}.errors.json").write_text(json.dumps({"failures": failures, "exceptions": exceptions}))
