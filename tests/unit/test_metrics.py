"""The access-log metrics source, on hand-written log lines in the router's format."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from canaryflow.core.errors import MetricsSourceError
from canaryflow.core.serving_contract import parse_prediction
from deployments import access_log
from deployments import metrics as metrics_mod
from deployments.metrics import AccessLogMetrics, MetricsSource, VersionWindow, Window

T0 = 1_800_000_000.0


def line(ts: float, version: str = "1", status: int = 200, ms: float = 10.0, prediction: str = "0:0.900",
         request_id: str = "", model: str = "iris", pinned: int = 0, shadow: int = 0, **extra: Any) -> str:
    """One access-log line as nginx writes it (same keys, same order: ts first)."""
    record = {"ts": round(ts, 3), "time": "2027-01-15T08:00:00+00:00", "request_id": request_id or f"r{ts}",
              "model": model, "version": version, "upstream_version": version if status < 502 else "",
              "status": status, "request_time": ms / 1000, "upstream_time": f"{ms / 1000:.3f}",
              "upstream_status": str(status), "method": "POST",
              "uri": "/_canaryflow/shadow" if shadow else f"/predictions/{model}", "request_bytes": 120,
              "body_bytes": 80, "prediction": prediction, "pinned": pinned, "shadow": shadow} | extra
    return json.dumps(record, separators=(",", ":")) + "\n"


@pytest.fixture(autouse=True)
def _fresh_cursors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AccessLogMetrics, "_cursors", {})


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "access.log"


def write(path: Path, *lines: str, mode: str = "a") -> None:
    with open(path, mode) as fh:
        fh.write("".join(lines))


def test_is_a_metrics_source(log: Path) -> None:
    _: MetricsSource = AccessLogMetrics(log)


def test_missing_log_is_an_empty_window(log: Path) -> None:
    win = AccessLogMetrics(log).window("iris", T0, T0 + 60)
    assert (win.model, win.start, win.end, win.versions, win.lines, win.bad_lines) == ("iris", T0, T0 + 60, {}, 0, 0)
    empty = win.get("2")
    assert empty == VersionWindow("2")
    assert (empty.error_ratio, empty.p50_ms, empty.p95_ms, empty.p99_ms) == (0.0, None, None, None)
    assert win.shadow_agreement is None


def test_unreadable_log_is_a_source_error(log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log.mkdir()  # open() fails with an OSError other than "not found"
    with pytest.raises(MetricsSourceError, match="cannot open the router access log"):
        AccessLogMetrics(log).window("iris", T0, T0 + 60)


def test_read_error_is_a_source_error(log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(log, line(T0 + 1))

    def broken(*args: Any, **kwargs: Any) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(access_log, "bisect", broken)
    with pytest.raises(MetricsSourceError, match="Input/output error"):
        AccessLogMetrics(log).window("iris", T0, T0 + 60)


def test_requests_errors_and_latency_percentiles(log: Path) -> None:
    latencies = [float(ms) for ms in range(1, 101)]
    statuses = [500, 502, 504, 503] + [200] * 94 + [404, 499]
    write(log, *(line(T0 + i * 0.1, "1", status, ms) for i, (status, ms) in enumerate(zip(statuses, latencies,
                                                                                          strict=True))))
    write(log, *(line(T0 + 20 + i, "2", 200, 50.0) for i in range(5)))
    win = AccessLogMetrics(log).window("iris", T0, T0 + 60)
    v1, v2 = win.get("1"), win.get("2")
    # the 4xx (the clients' own mistakes) are counted apart: neither requests, errors nor latency
    assert (v1.requests, v1.errors, v1.client_errors, v1.error_ratio) == (98, 4, 2, 4 / 98)
    judged = latencies[:98]
    assert v1.latencies_ms == pytest.approx(judged)
    assert v1.p50_ms == pytest.approx(np.percentile(judged, 50))
    assert v1.p95_ms == pytest.approx(np.percentile(judged, 95))
    assert v1.p99_ms == pytest.approx(np.percentile(judged, 99))
    assert (v2.requests, v2.errors, v2.p95_ms) == (5, 0, pytest.approx(50.0))
    assert win.lines == 105 and win.bad_lines == 0
    assert set(win.versions) == {"1", "2"}


def test_classes_and_scores_from_the_prediction_summary(log: Path) -> None:
    write(log, line(T0 + 1, prediction="0:0.900,1:0.800,+3"), line(T0 + 2, prediction="1:0.510"),
          line(T0 + 3, status=500, prediction=""), line(T0 + 4, status=400, prediction="1:0.990"))
    v1 = AccessLogMetrics(log).window("iris", T0, T0 + 60).get("1")
    assert v1.classes == {"0": 1, "1": 2}
    assert v1.scores == pytest.approx([0.9, 0.8, 0.51])
    assert (v1.requests, v1.errors, v1.client_errors) == (3, 1, 1)


def test_answers_without_a_prediction_and_fast_400s_are_no_evidence(log: Path) -> None:
    """A client cannot make a version look fast or healthy: describe answers (2xx, no prediction) and its own
    malformed requests (4xx, answered in a millisecond) leave the version's requests and latency alone."""
    write(log, *(line(T0 + i * 0.01, status=200, ms=1.0, prediction="") for i in range(50)),
          *(line(T0 + 1 + i * 0.01, status=400, ms=0.5) for i in range(50)),
          *(line(T0 + 2 + i * 0.01, ms=40.0) for i in range(10)))
    v1 = AccessLogMetrics(log).window("iris", T0, T0 + 60).get("1")
    assert (v1.requests, v1.client_errors, v1.p50_ms) == (10, 50, pytest.approx(40.0))


@pytest.mark.parametrize(("summary", "parsed"), [
    ("0:0.900,2:0.511,+3", (["0", "2"], [0.9, 0.511], 3)),
    ("1:1.000", (["1"], [1.0], 0)),
    ("", None), ("garbage", None), ("0:x", None), (":0.5", None), ("0:0.5,+x", None),
])
def test_parse_prediction(summary: str, parsed: tuple | None) -> None:
    assert parse_prediction(summary) == parsed


def test_window_bounds_models_pins_and_unrouted_lines(log: Path) -> None:
    write(log,
          line(T0 - 0.001), line(T0), line(T0 + 59.999), line(T0 + 60),  # start inclusive, end exclusive
          line(T0 + 5, model="wine"), line(T0 + 5, model="iris2"),
          line(T0 + 6, version="9", pinned=1), line(T0 + 7, version="1", pinned=1, status=500),
          line(T0 + 8, version="", status=404, prediction=""))
    win = AccessLogMetrics(log).window("iris", T0, T0 + 60)
    assert set(win.versions) == {"1"}
    assert win.get("1").requests == 2 and win.get("1").errors == 0
    assert win.lines == 5  # two routed, two pinned, one unrouted


def test_version_falls_back_to_the_upstream_version(log: Path) -> None:
    write(log, line(T0 + 1, version="", upstream_version="3"), line(T0 + 2, version="", cf_version="4",
                                                                    upstream_version=""))
    win = AccessLogMetrics(log).window("iris", T0, T0 + 60)
    assert {v: w.requests for v, w in win.versions.items()} == {"3": 1, "4": 1}


def test_shadow_lines_are_counted_apart_and_paired_by_request_id(log: Path) -> None:
    lines = []
    for i in range(10):  # stable answers the client, the canary's copy is a shadow line
        lines.append(line(T0 + i, "1", prediction="0:0.900,1:0.700", request_id=f"q{i}"))
        canary = "0:0.800,1:0.600" if i < 7 else "1:0.800,1:0.600"  # rows agree on 7 of 10
        lines.append(line(T0 + i + 0.01, "2", ms=30, prediction=canary, request_id=f"q{i}", shadow=1))
    lines.append(line(T0 + 20, "1", request_id="alone"))  # no copy (pinned copies are never made)
    lines.append(line(T0 + 21, "1", request_id="failed-copy"))
    lines.append(line(T0 + 21, "2", status=502, prediction="", request_id="failed-copy", shadow=1))
    lines.append(line(T0 + 22, "2", prediction="0:0.500", request_id="other-model", shadow=1, model="wine"))
    write(log, *lines)
    win = AccessLogMetrics(log).window("iris", T0, T0 + 60)
    stable, canary = win.get("1"), win.get("2")
    assert (stable.requests, stable.shadow_requests) == (12, 0)
    assert (canary.requests, canary.errors, canary.shadow_requests, canary.shadow_errors) == (0, 0, 11, 1)
    assert canary.shadow_error_ratio == pytest.approx(1 / 11)
    assert canary.p95_ms is None and len(canary.shadow_latencies_ms) == 11
    assert canary.classes == {"0": 7, "1": 13}
    assert (win.shadow_pairs, win.shadow_agreements, win.shadow_agreement) == (10, 7, 0.7)


def test_truncated_summaries_pair_on_what_they_show(log: Path) -> None:
    write(log, line(T0 + 1, "1", prediction="0:0.900,+40", request_id="a"),
          line(T0 + 1, "2", prediction="0:0.700,+40", request_id="a", shadow=1),
          line(T0 + 2, "1", prediction="0:0.900,+40", request_id="b"),
          line(T0 + 2, "2", prediction="0:0.700,+41", request_id="b", shadow=1))
    win = AccessLogMetrics(log).window("iris", T0, T0 + 60)
    assert (win.shadow_pairs, win.shadow_agreements) == (2, 1)


def test_bad_lines_are_counted_and_skipped(log: Path) -> None:
    write(log, line(T0 + 1), "not json\n", '{"ts":' + str(T0 + 2) + ',"model":"iris","status":\n',
          "[1, 2]\n", line(T0 + 3).replace('"status":200', '"status":"x"'),
          json.dumps({"model": "iris", "ts": "soon"}) + "\n", line(T0 + 4))
    win = AccessLogMetrics(log).window("iris", T0, T0 + 60)
    assert win.get("1").requests == 2
    assert win.bad_lines == 5 and win.lines == 2


def test_a_line_still_being_written_waits_for_the_next_window(log: Path) -> None:
    whole = line(T0 + 2)
    write(log, line(T0 + 1), whole[:30])
    source = AccessLogMetrics(log)
    win = source.window("iris", T0, T0 + 60)
    assert (win.get("1").requests, win.bad_lines) == (1, 0)
    write(log, whole[30:])
    assert source.window("iris", T0, T0 + 60).get("1").requests == 2


def test_lines_slightly_out_of_order_are_counted(log: Path) -> None:
    # The old and new workers of a reload flush their buffers independently: ts order is off by a second or so.
    write(log, *(line(T0 + i) for i in range(100)), line(T0 + 98.5, "2"), line(T0 + 99.5, "2"),
          *(line(T0 + 100 + i) for i in range(100)))
    source = AccessLogMetrics(log)
    assert source.window("iris", T0 + 99, T0 + 100).versions.keys() == {"1", "2"}
    assert source.window("iris", T0 + 98, T0 + 99).get("2").requests == 1


def big_log(path: Path, seconds: int, per_second: int = 50) -> list[float]:
    stamps = [T0 + s + k / per_second for s in range(seconds) for k in range(per_second)]
    with open(path, "w") as fh:
        fh.writelines(line(ts, "1" if k % 4 else "2") for k, ts in enumerate(stamps))
    return stamps


def expected(stamps: list[float], start: float, end: float) -> int:
    return sum(start <= round(ts, 3) < end for ts in stamps)


def test_windows_seek_instead_of_reading_the_whole_log(log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stamps = big_log(log, 2000)  # 100k lines, ~30 MB
    size = log.stat().st_size
    lows: list[int] = []
    real_bisect = access_log.bisect
    monkeypatch.setattr(access_log, "bisect", lambda fh, low, high, since: lows.append(low) or real_bisect(
        fh, low, high, since))
    read: list[int] = []
    real_lines = access_log.lines
    monkeypatch.setattr(access_log, "lines", lambda fh, offset: read.append(offset) or real_lines(fh, offset))
    source = AccessLogMetrics(log)
    for start in (T0 + 1500, T0 + 1600, T0 + 1990):
        win = source.window("iris", start, start + 5)
        assert win.lines == expected(stamps, start, start + 5)
        assert win.get("1").requests + win.get("2").requests == win.lines
        assert abs(win.get("2").requests - win.lines / 4) <= 1
    assert lows[0] == 0 and 0 < lows[1] <= lows[2]  # later windows bisect from the remembered offset
    per_line = size / len(stamps)
    # Each window starts reading at most REORDER_S + one search block before its start.
    for offset, start in zip(read, (T0 + 1500, T0 + 1600, T0 + 1990), strict=True):
        first = stamps.index(next(ts for ts in stamps if ts >= start))
        assert first * per_line - offset <= (metrics_mod.REORDER_S * 50 + 1) * per_line + access_log.SEARCH_BLOCK


def test_an_earlier_start_reads_from_the_beginning_again(log: Path) -> None:
    stamps = big_log(log, 600)
    source = AccessLogMetrics(log)
    assert source.window("iris", T0 + 500, T0 + 510).lines == expected(stamps, T0 + 500, T0 + 510)
    assert source.window("iris", T0 + 10, T0 + 20).lines == expected(stamps, T0 + 10, T0 + 20)
    assert source.window("iris", T0, T0 + 600).lines == len(stamps)


def test_cursors_are_shared_by_instances_per_path(log: Path) -> None:
    big_log(log, 600)
    AccessLogMetrics(log).window("iris", T0 + 500, T0 + 510)
    cursor = AccessLogMetrics._cursors[str(log.resolve())]
    assert cursor.offset > 0 and cursor.start == T0 + 500 - metrics_mod.REORDER_S


def test_a_truncated_or_rotated_log_is_read_from_its_start(log: Path) -> None:
    big_log(log, 600)
    source = AccessLogMetrics(log)
    assert source.window("iris", T0 + 500, T0 + 510).lines == 500
    write(log, line(T0 + 700), line(T0 + 701), mode="w")  # truncated: smaller than the remembered offset
    assert source.window("iris", T0 + 600, T0 + 800).lines == 2
    rotated = log.with_suffix(".1")
    os.replace(log, rotated)  # rotated: a new file (new inode)
    write(log, line(T0 + 900))
    assert source.window("iris", T0 + 800, T0 + 1000).lines == 1


def test_copytruncate_then_growth_past_the_offset_is_noticed(log: Path) -> None:
    big_log(log, 100)
    source = AccessLogMetrics(log)
    assert source.window("iris", T0 + 90, T0 + 100).lines == 500
    size = log.stat().st_size
    new = [line(T0 + 200 + i / 100, "7") for i in range(20000)]  # same inode, grows past the old size
    write(log, *new, mode="w")
    assert log.stat().st_size > size
    assert source.window("iris", T0 + 100, T0 + 400).get("7").requests == 20000


def test_window_get_and_agreement() -> None:
    win = Window("iris", T0, T0 + 1, versions={"1": VersionWindow("1", requests=3, errors=1)}, shadow_pairs=4,
                 shadow_agreements=3)
    assert win.get("1").error_ratio == pytest.approx(1 / 3)
    assert win.get("9").requests == 0 and "9" not in win.versions
    assert win.shadow_agreement == 0.75


def test_latency_is_the_upstream_time_when_there_is_one(log: Path) -> None:
    """A request with a shadow copy is finalized (request_time) only after the copy; its answer left earlier."""
    write(log, line(100.0, "1", ms=4.0, request_time=2.5),  # champion answered in 4 ms, copy took 2.5 s
          line(100.1, "1", ms=6.0, upstream_time="0.002, 0.004"),  # a retry: both tries count
          line(100.2, "1", status=502, ms=30.0, upstream_time="-"))  # no upstream answer: nginx's own time
    got = AccessLogMetrics(log).window("iris", 99.0, 101.0).get("1").latencies_ms
    assert got == pytest.approx([4.0, 6.0, 30.0])
