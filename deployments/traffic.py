"""Live (unpinned) traffic through the router from Python threads, with exact accounting: the e2e tests and the
canary benchmark use it (the demo uses locust). Every answer is recorded: time, status, answering version and
whether the row belongs to a subgroup the caller marks (e.g. the rows a fault flips). Given the rows' true labels
and the bridge's feedback endpoint, each answer's label is sent back right after it (live accuracy)."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import httpx
import numpy as np


@dataclass(frozen=True)
class Answer:
    t: float  # epoch seconds when the answer arrived
    status: int  # 0: no HTTP answer
    version: str
    subgroup: bool
    ms: float  # client-observed latency


class LiveTraffic:
    """Sends ``rps`` requests per second from ``threads`` threads, each request from one of ``users`` sticky user
    ids; counts answers per (status, version). Use as a context manager."""

    def __init__(self, router_url: str, model: str, rows: np.ndarray, rps: float = 40.0, threads: int = 2,
                 users: int = 200, user_header: str = "X-User-Id",
                 subgroup: Callable[[list[float]], bool] | None = None, labels: Sequence[object] | None = None,
                 feedback_url: str | None = None, feedback_token: str = "") -> None:
        self.url = f"{router_url}/predictions/{model}"
        rows = np.round(np.asarray(rows, dtype=np.float64), 5).tolist()
        truth = [None] * len(rows) if labels is None else [int(x) for x in labels]  # type: ignore[call-overload]
        self.bodies = [({"inputs": [r]}, bool(subgroup(r)) if subgroup else False, y) for r, y in zip(rows, truth,
                                                                                                   strict=True)]
        self.feedback_url = f"{feedback_url}/feedback/{model}" if feedback_url and labels is not None else None
        self.feedback_headers = {"Authorization": f"Bearer {feedback_token}"}
        self.labelled = 0
        self.feedback_errors: list[str] = []
        self.answers: list[Answer] = []
        self.interval = threads / rps
        self.threads, self.users, self.user_header = threads, users, user_header
        self.counts: Counter[tuple[int, str]] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def __enter__(self) -> LiveTraffic:
        for k in range(self.threads):
            t = threading.Thread(target=self._run, args=(k,), daemon=True, name=f"live-traffic-{k}")
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=30)

    def _run(self, k: int) -> None:
        bodies = itertools.cycle(self.bodies[k::self.threads] or self.bodies)
        users = itertools.cycle(range(k, self.users, self.threads))
        next_at = time.monotonic()
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                body, marked, label = next(bodies)
                sent = time.monotonic()
                try:
                    resp = client.post(self.url, json=body, headers={self.user_header: f"u{next(users)}"})
                    key = (resp.status_code, resp.headers.get("X-Model-Version", ""))
                except httpx.HTTPError as exc:
                    key = (0, "")
                    with self._lock:
                        self.errors.append(repr(exc))
                if self.feedback_url and key[0] == 200:
                    self._label(client, resp.headers.get("X-Request-ID", ""), label)
                with self._lock:
                    self.counts[key] += 1
                    self.answers.append(Answer(time.time(), key[0], key[1], marked,
                                               (time.monotonic() - sent) * 1000))
                next_at += self.interval
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _label(self, client: httpx.Client, request_id: str, label: object) -> None:
        try:
            r = client.post(self.feedback_url, json={"request_id": request_id, "label": label},
                            headers=self.feedback_headers)
            ok, why = r.status_code == 200, f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            ok, why = False, repr(exc)
        with self._lock:
            if ok:
                self.labelled += 1
            else:
                self.feedback_errors.append(why)

    def served_by(self, version: str) -> int:
        with self._lock:
            return sum(n for (status, v), n in self.counts.items() if v == version and status == 200)
