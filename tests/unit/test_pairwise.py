"""Pairwise canary analysis: the statistics (deployments/pairwise.py) and the replay's I/O
(canaryflow/release/replay.py) with a fake serving backend on real files."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fakes import FakeBackend, fake_services

from canaryflow.core.settings import CanarySettings, Settings
from canaryflow.release import replay
from canaryflow.services import Services
from deployments.canary import start
from deployments.pairwise import Pair, PairSample, checks, segments, wilson
from validation.results import Outcome

POLICY = CanarySettings()


def pair(row: list[float], a: int, b: int, pa: list[float] | None = None, pb: list[float] | None = None) -> Pair:
    return Pair(row, a, b, pa or [1.0 - a, float(a)], pb or [1.0 - b, float(b)])


def test_wilson_interval_brackets_the_proportion_and_narrows_with_n() -> None:
    low, high = wilson(95, 100, 1.96)
    assert low < 0.95 < high
    low2, high2 = wilson(950, 1000, 1.96)
    assert high2 - low2 < high - low
    assert wilson(0, 10, 1.96)[0] == 0.0 and wilson(10, 10, 1.96)[1] == 1.0
    assert wilson(0, 0, 1.96) == (0.0, 1.0)


def test_segments_are_feature_quantile_bins_and_predicted_classes() -> None:
    rows = [[float(i)] for i in range(100)]
    found = segments([pair(r, int(r[0] >= 50), int(r[0] >= 50)) for r in rows], ["size"])
    names = [s.name for s in found]
    assert names[0].startswith("size <=") and names[-3].startswith("size >")
    assert "champion class 0" in names and "champion class 1" in names
    assert sum(s.pairs for s in found if "size" in s.name) == 100  # every row in one bin of the feature


def test_the_failing_segment_is_named_with_its_numbers() -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(0, 1, (600, 2))
    edge = np.quantile(rows[:, 1], 0.9)
    ps = [pair(list(r), 0, 1 if r[1] > edge else 0) for r in rows]
    result = {c[0]: c for c in checks(PairSample(ps, ["age", "dose"]), POLICY)}
    name, outcome, measured, threshold, reason = result["segment_agreement"]
    assert outcome is Outcome.FAILED and measured == 0.0 and threshold == POLICY.min_segment_agreement
    assert "< dose <=" in reason and "(48 pairs)" in reason, reason  # the 90-98% bin; the top 2% has too few


def test_probability_delta_fails_on_shifted_probabilities_with_same_classes() -> None:
    ps = [pair([float(i)], 1, 1, [0.1, 0.9], [0.45, 0.55]) for i in range(200)]
    result = {c[0]: c for c in checks(PairSample(ps, []), POLICY)}
    assert result["agreement"][1] is Outcome.PASSED
    assert result["probability_delta"][1] is Outcome.FAILED and result["probability_delta"][2] == pytest.approx(0.35)


def test_a_replay_error_without_pairs_is_an_error_not_a_failure() -> None:
    out = checks(PairSample([], [], "router down"), POLICY)
    assert [c[1] for c in out] == [Outcome.ERROR] and "router down" in out[0][4]


# -- the replay, on files ------------------------------------------------------------------------------------------
def answer(version: str, row: list[float]) -> dict:
    """Class 1 when the first feature is > 0; the candidate (v2) inverts the rare segment ``row[1] > 100``."""
    c = int(row[0] > 0)
    if version == "2" and row[1] > 100:  # the candidate's bug: a rare segment
        c = 1 - c
    return {"class_index": c, "probabilities": [1.0 - c, float(c)]}


@pytest.fixture
def st_svc(tmp_path: Path) -> tuple[SimpleNamespace, Services]:
    policy = Settings().model_copy(update={"canary": CanarySettings(replay_rows=50, replay_batch_rows=20)})
    svc = fake_services(tmp_path, backend=FakeBackend(answer=answer))
    svc.paths.traffic_dir.mkdir(parents=True)
    st = SimpleNamespace(model="m", workdir=tmp_path / "work", policy=policy)
    return st, svc


def write_rows(path: Path, rows: list[list[float]]) -> None:
    with path.open("a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))


def test_collect_replays_new_distinct_rows_to_both_versions_and_keeps_them(st_svc) -> None:
    st, svc = st_svc
    status = start("1", "2", st.policy.canary, 1000.0)
    log = svc.paths.traffic_dir / "m.jsonl"
    write_rows(log, [[float(i % 30 - 15), 0.0] for i in range(90)])  # 30 distinct rows, each three times
    first = replay.collect(svc, st, status, 1001.0)
    assert len(first.pairs) == 30 and all(p.agrees for p in first.pairs)
    assert {v for v, _ in svc.backend.replays} == {"1", "2"} and max(n for _, n in svc.backend.replays) <= 20
    write_rows(log, [[1.0, 200.0 + i] for i in range(10)] + [[-3.0, 0.0]])  # 10 new rows in the segment
    second = replay.collect(svc, st, status, 1002.0)
    assert len(second.pairs) == 40  # the repeated row was compared already
    assert sum(not p.agrees for p in second.pairs) == 10
    # a resumed ramp (new process) finds the same pairs on disk
    again = replay.collect(svc, st, status, 1003.0)
    assert len(again.pairs) == 40
    # a new ramp against the same champion starts afresh
    assert replay.collect(svc, st, start("1", "2", st.policy.canary, 2000.0), 2001.0).pairs == []


def test_collect_takes_at_most_replay_rows_newest_first(st_svc) -> None:
    st, svc = st_svc
    write_rows(svc.paths.traffic_dir / "m.jsonl", [[float(i), 0.0] for i in range(200)])
    sample = replay.collect(svc, st, start("1", "2", st.policy.canary, 0.0), 1.0)
    assert len(sample.pairs) == 50 and sample.pairs[0].row == [199.0, 0.0]


def test_a_partly_written_line_is_read_next_time(st_svc) -> None:
    st, svc = st_svc
    log = svc.paths.traffic_dir / "m.jsonl"
    log.write_text("[1.0, 2.0]\n[3.0, 4")
    status = start("1", "2", st.policy.canary, 0.0)
    assert [p.row for p in replay.collect(svc, st, status, 1.0).pairs] == [[1.0, 2.0]]
    with log.open("a") as fh:
        fh.write(".0]\n")
    assert [p.row for p in replay.collect(svc, st, status, 2.0).pairs][-1] == [3.0, 4.0]


def test_rotation_starts_over_in_the_new_file(st_svc) -> None:
    st, svc = st_svc
    log = svc.paths.traffic_dir / "m.jsonl"
    write_rows(log, [[1.0, 0.0]])
    status = start("1", "2", st.policy.canary, 0.0)
    replay.collect(svc, st, status, 1.0)
    log.rename(log.with_name("m.jsonl.1"))
    write_rows(log, [[2.0, 0.0]])
    assert [p.row for p in replay.collect(svc, st, status, 2.0).pairs] == [[1.0, 0.0], [2.0, 0.0]]


def test_champion_or_candidate_errors_are_reported_not_judged(st_svc) -> None:
    st, svc = st_svc
    write_rows(svc.paths.traffic_dir / "m.jsonl", [[1.0, 0.0], [2.0, 0.0]])
    svc.backend = FakeBackend(answer=answer, replay_fail="1")
    sample = replay.collect(svc, st, start("1", "2", st.policy.canary, 0.0), 1.0)
    assert sample.pairs == [] and "champion v1" in (sample.error or "")
    write_rows(svc.paths.traffic_dir / "m.jsonl", [[3.0, 0.0]])
    svc.backend = FakeBackend(answer=answer, replay_fail="2")
    sample = replay.collect(svc, st, start("1", "2", st.policy.canary, 0.0), 2.0)
    assert sample.pairs == [] and sample.candidate_errors == 1 and "candidate v2" in (sample.error or "")


def test_no_traffic_file_yet_gives_no_pairs_and_no_error(st_svc) -> None:
    st, svc = st_svc
    sample = replay.collect(svc, st, start("1", "2", st.policy.canary, 0.0), 1.0)
    assert sample.pairs == [] and sample.error is None and svc.backend.replays == []
