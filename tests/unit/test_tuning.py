"""The choice of serving settings from measured bursts (canaryflow/release/tuning.py): pure rules."""

from __future__ import annotations

import pytest

from canaryflow.core.settings import LoadTestSettings, ServingConfig, ServingSettings
from canaryflow.release.tuning import Trial, Tuning, candidates, choose

CFG = LoadTestSettings(max_p95_ms=50.0, max_failure_ratio=0.01, tune=["2x1", "1x8"], tune_min_gain=1.15)
BASE, TWO, BATCH = (ServingConfig(workers=1), ServingConfig(workers=2), ServingConfig(workers=1, batch_size=8))


def trial(config: ServingConfig, rps: float, p95: float = 10.0, failures: float = 0.0,
          error: str | None = None) -> Trial:
    return Trial(config, requests=0 if error else 500, rps=rps, p50_ms=p95 / 2, p95_ms=p95, failure_ratio=failures,
                 error=error)


def test_candidates_start_with_the_operators_setting_and_list_each_other_once() -> None:
    base = ServingConfig.of(ServingSettings(workers_per_version=1, batch_size=1, max_batch_delay_ms=3))
    cfg = CFG.model_copy(update={"tune": ["2x1", "1x1", "1x8", "2x1"]})
    assert candidates(cfg, base) == [base, ServingConfig(workers=2, max_batch_delay_ms=3),
                                     ServingConfig(workers=1, batch_size=8, max_batch_delay_ms=3)]


def test_another_setting_wins_only_by_the_minimum_gain() -> None:
    assert choose([trial(BASE, 1000), trial(TWO, 1100), trial(BATCH, 900)], CFG) == (
        BASE, "kept 1 worker, no batching: 2 workers, no batching only 1.10x its requests/s (< 1.15x)")
    assert choose([trial(BASE, 1000), trial(TWO, 1100), trial(BATCH, 1500)], CFG) == (
        BATCH, "chose 1 worker, batch 8 (wait <= 5 ms): 1.50x the requests/s of 1 worker, no batching")
    assert choose([trial(BASE, 1000), trial(TWO, 900)], CFG)[0] == BASE


def test_a_setting_outside_the_bars_is_never_chosen_however_fast() -> None:
    slow, failing = trial(TWO, 5000, p95=80.0), trial(BATCH, 5000, failures=0.05)
    assert choose([trial(BASE, 1000), slow, failing], CFG) == (
        BASE, "kept 1 worker, no batching: the most requests/s (1000)")
    # the operator's setting missing a bar: the best one within them, whatever the gain
    assert choose([trial(BASE, 1000, p95=70.0), trial(TWO, 1010)], CFG) == (
        TWO, "chose 2 workers, no batching: 1010 requests/s; 1 worker, no batching missed the load test's bars")
    # nothing within the bars (or nothing measured): the operator's setting stays, the gate judges it next
    config, why = choose([trial(BASE, 0, error="locust crashed"), slow], CFG)
    assert config == BASE and why.startswith("kept 1 worker, no batching: no setting answered within p95 50 ms")


def test_the_table_marks_the_chosen_setting() -> None:
    table = Tuning([trial(BASE, 1000), trial(BATCH, 1500)], BATCH, "chose ...").markdown().splitlines()
    assert table[2].startswith("| 1 worker, no batching | 1000 |") and table[2].endswith("|  |")
    assert table[3].startswith("| 1 worker, batch 8 (wait <= 5 ms) | 1500 |") and "**chosen**" in table[3]


@pytest.mark.parametrize("bad", ["0x1", "17x1", "1x0", "1x257", "2", "2x", "x2", "two x one"])
def test_tune_entries_are_validated(bad: str) -> None:
    with pytest.raises(ValueError, match="is not WORKERSxBATCH"):
        LoadTestSettings(tune=[bad])
