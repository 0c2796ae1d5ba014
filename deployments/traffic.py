"""Live (unpinned) traffic through the router from Python threads, with exact accounting: the e2e tests and the
canary benchmark use it (the demo uses locust). Every answer is recorded: time, status, answering version and
whether the row belongs to a subgroup the caller marks (e.g. the rows a fault flips). Given the rows' true labels
and the bridge's feedback endpoint, the answers' labels are sent back in batches from a thread of their own, each
once its answer is ``label_delay_s`` old (as a client that learns the truth later would; live accuracy)."""

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

from canaryflow.core.serving_contract import VERSION_HEADER


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
                 feedback_url: str | None = None, feedback_token: str = "", label_delay_s: float = 3.0) -> None:
        self.url = f"{router_url}/predictions/{model}"
        rows = np.round(np.asarray(rows, dtype=np.float64), 5).tolist()
        truth = [None] * len(rows) if labels is None else [int(x) for x in labels]  # type: ignore[call-overload]
        self.bodies = [({"inputs": [r]}, bool(subgroup(r)) if subgroup else False, y) for r, y in zip(rows, truth,
                                                                                                   strict=True)]
        self.feedback_url = f"{feedback_url}/feedback/{model}" if feedback_url and labels is not None else None
        self.feedback_headers = {"Authorization": f"Bearer {feedback_token}"}
        self.label_delay_s = label_delay_s
        self.labelled = 0
        self.feedback_errors: list[str] = []
        self._unlabelled: list[tuple[float, str, object]] = []  # (answered at, request id, label), oldest first
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
        if self.feedback_url:
            self._labeller = threading.Thread(target=self._send_labels, daemon=True, name="live-traffic-labels")
            self._labeller.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=30)
        if self.feedback_url:
            self._labeller.join(timeout=60)

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
                    key = (resp.status_code, resp.headers.get(VERSION_HEADER, ""))
                except httpx.HTTPError as exc:
                    key = (0, "")
                    with self._lock:
                        self.errors.append(repr(exc))
                with self._lock:
                    if self.feedback_url and key[0] == 200:
                        self._unlabelled.append((time.monotonic(), resp.headers.get("X-Request-ID", ""), label))
                    self.counts[key] += 1
                    self.answers.append(Answer(time.time(), key[0], key[1], marked,
                                               (time.monotonic() - sent) * 1000))
                next_at += self.interval
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _send_labels(self) -> None:
        """Every second, the labels of answers at least ``label_delay_s`` old, in one request; after the traffic
        stopped, the rest once they are old enough."""
        with httpx.Client(timeout=30) as client:
            while True:
                stopped = self._stop.wait(1.0)
                with self._lock:
                    due = [x for x in self._unlabelled if stopped or time.monotonic() - x[0] >= self.label_delay_s]
                    self._unlabelled = self._unlabelled[len(due):]
                if stopped and due:
                    time.sleep(max(0.0, self.label_delay_s - (time.monotonic() - due[-1][0])))
                for start in range(0, len(due), 500):
                    self._label(client, due[start:start + 500])
                if stopped:
                    return

    def _label(self, client: httpx.Client, items: list[tuple[float, str, object]]) -> None:
        body = {"feedback": [{"request_id": rid, "label": label} for _, rid, label in items]}
        try:
            r = client.post(self.feedback_url, json=body, headers=self.feedback_headers)
            ok, why = r.status_code == 200, f"{r.status_code} {r.text[:300]}"
        except httpx.HTTPError as exc:
            ok, why = False, repr(exc)
        with self._lock:
            if ok:
                self.labelled += len(items)
            else:
                self.feedback_errors.append(why)

    def served_by(self, version: str) -> int:
        with self._lock:
            return sum(n for (status, v), n in self.counts.items() if v == version and status == 200)
