"""Labels for answers already given: what the bridge's ``POST /feedback/<model>`` checks and stores.

A client that learns the truth later (a fraud confirmed, a diagnosis made) sends ``{"request_id", "label"}`` (or
``"labels"``, one per row of the request; or ``{"feedback": [...]}`` for many). The request id is the
``X-Request-ID`` the router returned with the answer. A label is accepted only for an answer the router logged
for that model (:class:`AnswerIndex` follows its access log), with as many labels as the answer had rows; it is
appended to the model's labels file (one JSON line, ``ts`` first, so the metrics source can bisect it by time),
where the canary analysis joins it to the answer's version (``deployments/metrics.py``).

Everything in a request is checked before anything is written: a bad item refuses the whole request (4xx, each
problem named), so a client can fix and resend it without duplicates. The same label sent twice is accepted once;
a different label for an answer already labelled is a 409.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from canaryflow.core.serving_contract import parse_prediction
from deployments.access_log import line_ts, open_rotated, parse_line

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")  # what the router keeps of a client's X-Request-ID
_LABEL = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # classes as the handler prints them (the class index)


class FeedbackError(Exception):
    """A request the endpoint refuses; ``status`` is its HTTP status, ``problems`` one line per bad item."""

    def __init__(self, status: int, detail: str, problems: list[str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.problems = status, detail, problems or []


@dataclass(frozen=True)
class Answered:
    model: str
    version: str
    rows: int
    ts: float


@dataclass(frozen=True)
class Label:
    request_id: str
    labels: tuple[str, ...]


def parse(body: object, max_items: int) -> list[Label]:
    """The labels of one request body; FeedbackError(422) naming every malformed item."""
    items = body.get("feedback") if isinstance(body, dict) and "feedback" in body else [body]
    if not isinstance(items, list) or not items:
        raise FeedbackError(422, '"feedback" must be a non-empty list of {"request_id", "label"} objects')
    if len(items) > max_items:
        raise FeedbackError(413, f"{len(items)} labels in one request; at most {max_items}")
    out, problems = [], []
    for i, item in enumerate(items):
        where = f"item {i}" if len(items) > 1 else "body"
        if not isinstance(item, dict):
            problems.append(f"{where}: not an object")
            continue
        rid, one, many = item.get("request_id"), item.get("label"), item.get("labels")
        if not isinstance(rid, str) or not _REQUEST_ID.match(rid):
            problems.append(f"{where}: request_id must be the X-Request-ID of an answer (1-128 of A-Z a-z 0-9 "
                            "._:/+=@-)")
            continue
        if (one is None) == (many is None):
            problems.append(f"{where}: give exactly one of label (one row) or labels (one per row)")
            continue
        values = [one] if many is None else many
        if not isinstance(values, list) or not values:
            problems.append(f"{where}: labels must be a non-empty list")
            continue
        text = [_label_text(v) for v in values]
        if any(t is None for t in text):
            problems.append(f"{where}: a label is a class index (int >= 0) or a class name (1-64 of A-Z a-z "
                            "0-9 _.:-)")
            continue
        out.append(Label(rid, tuple(t for t in text if t is not None)))
    if problems:
        raise FeedbackError(422, "malformed feedback; nothing recorded", problems)
    return out


def _label_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value) if value >= 0 else None
    if isinstance(value, str) and _LABEL.match(value):
        return value
    return None


class AnswerIndex:
    """The router's recent client answers by request id (the last ``capacity``), kept up to date by reading the
    access log from where the last refresh stopped.

    Across a rotation (``access.log`` renamed to ``access.log.1``, a new ``access.log``): the rest of each file
    already being read is read first, wherever it was renamed to (found by inode and first bytes), then the newer
    files from their start, oldest first; a rotated file keeps being followed while it is kept, as the old workers
    of nginx's reload append their last lines to it. A truncated file is read from its start. The first refresh
    reads the newest rotated file and the live one."""

    def __init__(self, access_log: Path, capacity: int = 200_000) -> None:
        self.path, self.capacity = Path(access_log), capacity
        self._answers: OrderedDict[str, Answered] = OrderedDict()
        # (st_dev, st_ino) -> (its first bytes when last read, bytes read): the files read so far, still there
        self._read: dict[tuple[int, int], tuple[bytes, int]] = {}

    def refresh(self) -> None:
        with ExitStack() as stack:
            files = open_rotated(self.path, stack)
            positions: list[int | None] = []
            for file in files:
                known = self._read.get(file.key)
                head = file.head()
                # The same file when it starts with what it started with (a freed inode may be reused by a new file)
                # and did not shrink (truncated: read it again from its start).
                same = known is not None and head.startswith(known[0]) and known[1] <= file.stat.st_size
                positions.append(known[1] if same and known is not None else None)
            followed = [i for i, pos in enumerate(positions) if pos is not None]
            first = followed[0] if followed else max(0, len(files) - 2)
            read: dict[tuple[int, int], tuple[bytes, int]] = {}
            for file, pos in zip(files[first:], positions[first:], strict=True):
                read[file.key] = (file.head(), self._read_from(file.fh, pos or 0))
            self._read = read

    def _read_from(self, fh: BinaryIO, offset: int) -> int:
        """Adds the whole lines from ``offset`` on; returns the offset after the last one."""
        fh.seek(offset)
        for line in fh:
            if not line.endswith(b"\n"):
                break  # being written: next time
            offset += len(line)
            self._add(line)
        return offset

    def _add(self, line: bytes) -> None:
        if line_ts(line) is None:
            return
        rec = parse_line(line)
        if rec is None or rec.get("shadow") in (1, "1", True) or not isinstance(rec.get("status"), int):
            return
        parsed = parse_prediction(str(rec.get("prediction") or "")) if rec["status"] < 400 else None
        rid, version = str(rec.get("request_id") or ""), str(rec.get("version") or "")
        if parsed is None or not rid or not version:
            return
        self._answers[rid] = Answered(str(rec.get("model") or ""), version, len(parsed[0]) + parsed[2],
                                      float(rec["ts"]))
        self._answers.move_to_end(rid)
        while len(self._answers) > self.capacity:
            self._answers.popitem(last=False)

    def get(self, request_id: str) -> Answered | None:
        return self._answers.get(request_id)


class FeedbackRecorder:
    """Checks labels against the answer index and appends them to the model's labels file; thread-safe."""

    def __init__(self, index: AnswerIndex, labels_file: Callable[[str], Path], max_items: int = 1000,
                 clock: Callable[[], float] = time.time, answer_wait_s: float = 3.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """``answer_wait_s``: how long a label may wait for its answer to reach the access log (nginx writes it
        within about two seconds, metrics.FLUSH_DELAY_S) before an unknown request id is a 404."""
        self.index, self.labels_file, self.max_items, self.clock = index, labels_file, max_items, clock
        self.answer_wait_s, self.sleep = answer_wait_s, sleep
        self._lock = threading.Lock()
        self._recorded: dict[str, dict[str, tuple[str, ...]]] = {}  # model -> request id -> labels

    def _await_answers(self, labels: list[Label]) -> None:
        """Refresh the index until every labelled answer is in it or ``answer_wait_s`` passed (a client that labels
        an answer the moment it gets it is ahead of the router's log buffer, not wrong)."""
        waited = 0.0
        while True:
            with self._lock:
                self.index.refresh()
                missing = any(self.index.get(lab.request_id) is None for lab in labels)
            if not missing or waited >= self.answer_wait_s:
                return
            step = min(0.2, self.answer_wait_s - waited)
            self.sleep(step)
            waited += step

    def record(self, model: str, body: object) -> dict[str, Any]:
        labels = parse(body, self.max_items)
        self._await_answers(labels)
        with self._lock:
            self.index.refresh()
            recorded = self._known(model)
            problems: list[tuple[int, str]] = []
            new: dict[str, tuple[str, ...]] = {}
            for lab in labels:
                answer = self.index.get(lab.request_id)
                prior = recorded.get(lab.request_id) or new.get(lab.request_id)
                if answer is None or answer.model != model:
                    problems.append((404, f"{lab.request_id}: no answer of the router for this model with that "
                                          f"request id among the last {self.index.capacity} answers"))
                elif len(lab.labels) != answer.rows:
                    problems.append((422, f"{lab.request_id}: {len(lab.labels)} labels for an answer of "
                                          f"{answer.rows} rows (one label per row)"))
                elif prior is not None and prior != lab.labels:
                    problems.append((409, f"{lab.request_id}: already labelled {list(prior)}; a label is final"))
                elif prior is None:
                    new[lab.request_id] = lab.labels
            if problems:
                kinds = {k for k, _ in problems}
                raise FeedbackError(kinds.pop() if len(kinds) == 1 else 422, "feedback refused; nothing recorded",
                                    [p for _, p in problems])
            if new:
                now = self.clock()
                self._append(model, b"".join(
                    json.dumps({"ts": now, "request_id": rid, "labels": list(v)}).encode() + b"\n"
                    for rid, v in new.items()))
                recorded.update(new)
        return {"status": "recorded", "recorded": len(new), "already_recorded": len(labels) - len(new)}

    def _known(self, model: str) -> dict[str, tuple[str, ...]]:
        if model not in self._recorded:
            known: dict[str, tuple[str, ...]] = {}
            path = self.labels_file(model)
            if path.exists():
                for line in path.read_bytes().splitlines():
                    rec = parse_line(line)
                    if rec is not None and isinstance(rec.get("labels"), list):
                        known[str(rec.get("request_id"))] = tuple(str(x) for x in rec["labels"])
            self._recorded[model] = known
        return self._recorded[model]

    def _append(self, model: str, data: bytes) -> None:
        path = self.labels_file(model)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)  # one write: concurrent appenders never interleave inside a line
            os.fsync(fd)
        finally:
            os.close(fd)
