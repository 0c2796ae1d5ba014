"""Per-version canary measurements from the router: the local :class:`MetricsSource` reads nginx's access log.

One JSON line per request (``deployments/templates/nginx.conf.j2``), one more per shadow copy. A
:class:`Window` gathers, for one model and a time range of the lines' ``ts`` (when nginx logged them, epoch
seconds), per version: requests, 5xx errors, latencies, predicted classes and top scores; in shadow mode also how
often the canary's copy predicted what stable answered (paired by request id).

nginx writes its log buffer at least every second (``flush=1s``), and the old and new workers of a reload write
their buffers independently: ask for windows that ended at least 2 s ago (``end <= time.time() - FLUSH_DELAY_S``),
or the newest lines are not there yet.

Labels sent to the bridge's feedback endpoint (``<state>/feedback/<model>.jsonl``, one JSON line per labelled
request: ``{"ts", "request_id", "labels"}``) are joined to the window's answers by request id: per version, how
many labelled rows it answered and how many of them right. A label may arrive long after its answer; it counts
for the window its answer belongs to, once it is there.

Pinned requests (``X-Model-Version``: the pipeline's own warm-up, smoke and load tests) are left out of every
count, as are lines without a version (404 ModelNotRouted and the like).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from canaryflow.core.errors import MetricsSourceError
from canaryflow.core.serving_contract import parse_prediction
from deployments import access_log

FLUSH_DELAY_S = 2.0
"""How long ago a window should have ended for all its lines to be in the log (1 s flush, reload overlap)."""
REORDER_S = 5.0
"""Lines may be out of ``ts`` order by this much (workers of a reload flush their own buffers)."""


@dataclass
class VersionWindow:
    """What one version answered in a window. ``requests``, ``errors`` and ``latencies_ms`` are client answers
    (non-shadow lines) that are evidence about the model: answered predictions and server errors. A client's
    own mistake (4xx) says nothing about the version and is only counted in ``client_errors``; a 2xx without a
    prediction (``describe``) is not counted at all. Shadow copies are counted in ``shadow_*``. ``classes`` and
    ``scores`` come from the prediction summaries of both (a version is either split or shadowed at a time)."""

    version: str
    requests: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)
    shadow_requests: int = 0
    shadow_errors: int = 0
    shadow_latencies_ms: list[float] = field(default_factory=list)
    labelled: int = 0
    """Rows of its client answers that got a label (feedback endpoint)."""
    correct: int = 0
    """Of those, rows whose predicted class is the label."""
    shadow_labelled: int = 0
    shadow_correct: int = 0
    client_errors: int = 0
    """4xx answers: the clients' own mistakes, no evidence about the version."""

    @property
    def accuracy(self) -> float | None:
        """Share of labelled rows answered right; None without labels."""
        return self.correct / self.labelled if self.labelled else None

    @property
    def error_ratio(self) -> float:
        """5xx answers (TorchServe's and nginx's 502/504) over requests; 0.0 without requests."""
        return self.errors / self.requests if self.requests else 0.0

    @property
    def shadow_error_ratio(self) -> float:
        return self.shadow_errors / self.shadow_requests if self.shadow_requests else 0.0

    def _percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    @property
    def p50_ms(self) -> float | None:
        return self._percentile(50)

    @property
    def p95_ms(self) -> float | None:
        return self._percentile(95)

    @property
    def p99_ms(self) -> float | None:
        return self._percentile(99)


@dataclass
class Window:
    """One model's measurements for lines with ``start <= ts < end``."""

    model: str
    start: float
    end: float
    versions: dict[str, VersionWindow] = field(default_factory=dict)
    shadow_pairs: int = 0
    """Request ids with a successful client answer and a successful shadow answer (both with predictions)."""
    shadow_agreements: int = 0
    """Pairs whose predicted classes agree on every row."""
    lines: int = 0
    """Well-formed lines of this model in the window (pinned included)."""
    bad_lines: int = 0
    """Malformed lines met in the window's part of the log: skipped."""
    feedback_error: str | None = None
    """Why the labels could not be read (the window's other measurements stand)."""

    def get(self, version: str) -> VersionWindow:
        """The version's measurements; an empty one when it answered nothing."""
        return self.versions.get(str(version)) or VersionWindow(str(version))

    @property
    def shadow_agreement(self) -> float | None:
        """Share of shadow pairs that agree; None without pairs."""
        return self.shadow_agreements / self.shadow_pairs if self.shadow_pairs else None


class MetricsSource(Protocol):
    """Per-version measurements of a model's live traffic (router access log locally, Prometheus on Kubernetes).

    Raises MetricsSourceError when the source cannot be read: that is not a model failure."""

    def window(self, model: str, start: float, end: float) -> Window: ...


@dataclass
class _Cursor:
    inode: int
    head: bytes  # the file's first bytes: a file truncated and written again (copytruncate) has another head
    start: float
    offset: int


class AccessLogMetrics:
    """The local :class:`MetricsSource`: the router's JSON access log at ``path``.

    Fast on logs of millions of lines: lines are in ``ts`` order (give or take ``REORDER_S``), so the first line
    of a window is found by bisecting the file, starting from the offset remembered for the last window's start
    when the new start is not earlier (windows move forward); only the window's own lines are parsed. A file that
    shrank or was replaced is read from its beginning.

    Rotation (``access.log`` renamed to ``access.log.1``, :meth:`deployments.router.NginxRouter.rotate_logs`): the
    rotated files are read too, oldest first, each once (:func:`deployments.access_log.open_rotated`), skipping
    those whose last line is older than the window; a window across a rotation counts the lines of both files.
    """

    _cursors: dict[str, _Cursor] = {}  # per path, shared by instances: callers often make a new one per analysis
    _lock = threading.Lock()

    def __init__(self, path: Path, feedback: Callable[[str], Path] | None = None) -> None:
        """``feedback``: a model's labels file (:meth:`StatePaths.feedback_file`); None: no labels joined."""
        self.path = Path(path)
        self.feedback = feedback

    def window(self, model: str, start: float, end: float) -> Window:
        """Measurements of ``model`` for lines with ``start <= ts < end``; an empty Window without a log yet."""
        win = Window(model, start, end)
        since = start - REORDER_S
        with ExitStack() as stack:
            try:
                files = access_log.open_rotated(self.path, stack)
            except OSError as exc:
                raise MetricsSourceError(f"cannot open the router access log {exc.filename or self.path}: {exc}; "
                                         "check its permissions") from exc
            agg = _Aggregator(win)
            try:
                for file in files:  # oldest first: a window across a rotation counts both files' lines
                    if file.rotated and _ends_before(file, since):
                        continue
                    agg.read(file.fh, self._first_offset(file, since), start, end)
            except OSError as exc:
                raise MetricsSourceError(f"cannot read the router access log {self.path}: {exc}") from exc
            agg.pair()
        if self.feedback is not None and (agg.client or agg.shadow):
            path = self.feedback(model)
            try:
                agg.score(access_log.read_labels(path, start - REORDER_S, set(agg.client) | set(agg.shadow)))
            except OSError as exc:
                win.feedback_error = f"cannot read the labels {path}: {exc}"
        return win

    def _first_offset(self, file: access_log.LogFile, since: float) -> int:
        """Offset of a line at or before the first line with ``ts >= since``; remembered (per file name) for the
        next call."""
        key, st = str(file.path.resolve()), file.stat
        head = file.head()
        with self._lock:
            cursor = self._cursors.get(key)
        low = 0
        if (cursor is not None and (cursor.inode, cursor.head) == (st.st_ino, head) and cursor.offset <= st.st_size
                and since >= cursor.start):
            low = cursor.offset
        offset = access_log.bisect(file.fh, low, st.st_size, since)
        with self._lock:
            self._cursors[key] = _Cursor(st.st_ino, head, since, offset)
        return offset


def _ends_before(file: access_log.LogFile, since: float) -> bool:
    """Whether every line of a rotated file is older than ``since``: its last line is older than ``since``
    (``since`` already allows for lines out of order by REORDER_S)."""
    ts = access_log.last_ts(file.fh, file.stat.st_size)
    return ts is not None and ts < since


class _Aggregator:
    def __init__(self, win: Window) -> None:
        self.win = win
        self.model_tag = b'"model":"' + win.model.encode() + b'"'
        # request id -> (answering version, predicted classes, rows left out of the summary)
        self.client: dict[str, tuple[str, tuple[str, ...], int]] = {}
        self.shadow: dict[str, tuple[str, tuple[str, ...], int]] = {}

    def read(self, fh: BinaryIO, offset: int, start: float, end: float) -> None:
        win, inside, stop_after = self.win, False, end + REORDER_S
        for line in access_log.lines(fh, offset):
            ts = access_log.line_ts(line)
            record = None
            if ts is None:  # not our fast format: parse it all before calling it bad
                record = access_log.parse_line(line)
                ts = record.get("ts") if record is not None else None
                if not isinstance(ts, int | float) or isinstance(ts, bool):
                    win.bad_lines += inside
                    continue
            if ts >= stop_after:
                break
            inside = inside or ts >= start
            if not (start <= ts < end) or self.model_tag not in line:
                continue
            record = record or access_log.parse_line(line)
            if record is None or record.get("model") != win.model:
                win.bad_lines += record is None
                continue
            if self.add(record):
                win.lines += 1
            else:
                win.bad_lines += 1

    def add(self, rec: dict[str, Any]) -> bool:
        """Count one well-formed line; False when a field has the wrong type."""
        try:
            status, seconds = int(rec["status"]), float(rec["request_time"])
        except (KeyError, TypeError, ValueError):
            return False
        # The upstream's time where there is one: a request with a shadow copy is finalized (and its
        # request_time stopped) only when the copy is done, though its answer left long before.
        seconds = access_log.upstream_seconds(rec.get("upstream_time")) or seconds
        if rec.get("pinned") in (1, "1", True):
            return True
        version = str(rec.get("version") or rec.get("upstream_version") or rec.get("cf_version") or "")
        if not version:
            return True
        vw = self.win.versions.get(version)
        if vw is None:
            vw = self.win.versions[version] = VersionWindow(version)
        shadow = rec.get("shadow") in (1, "1", True)
        parsed = parse_prediction(str(rec.get("prediction") or "")) if status < 400 else None
        if 400 <= status < 500:
            vw.client_errors += 1  # fast 400s must not make a version look fast, nor dilute its error ratio
            return True
        if status < 400 and parsed is None:
            return True  # not a prediction (describe): no evidence about the model
        if shadow:
            vw.shadow_requests += 1
            vw.shadow_errors += status >= 500
            vw.shadow_latencies_ms.append(seconds * 1000)
        else:
            vw.requests += 1
            vw.errors += status >= 500
            vw.latencies_ms.append(seconds * 1000)
        if parsed is not None:
            classes, scores, more = parsed
            for cls in classes:
                vw.classes[cls] = vw.classes.get(cls, 0) + 1
            vw.scores.extend(scores)
            request_id = str(rec.get("request_id") or "")
            if request_id:
                (self.shadow if shadow else self.client)[request_id] = (version, tuple(classes), more)
        return True

    def pair(self) -> None:
        for request_id, (_, classes, more) in self.shadow.items():
            client = self.client.get(request_id)
            if client is not None:
                self.win.shadow_pairs += 1
                self.win.shadow_agreements += client[1:] == (classes, more)

    def score(self, labels: dict[str, list[str]]) -> None:
        """Per version: labelled rows and rows answered right (rows left out of a summary are not compared)."""
        for answers, shadow in ((self.client, False), (self.shadow, True)):
            for request_id, (version, classes, _) in answers.items():
                truth = labels.get(request_id)
                if truth is None:
                    continue
                n = min(len(truth), len(classes))
                right = sum(a == b for a, b in zip(classes[:n], truth[:n], strict=True))
                vw = self.win.versions[version]
                if shadow:
                    vw.shadow_labelled, vw.shadow_correct = vw.shadow_labelled + n, vw.shadow_correct + right
                else:
                    vw.labelled, vw.correct = vw.labelled + n, vw.correct + right
