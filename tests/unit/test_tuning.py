"""The choice of serving settings from measured bursts (canaryflow/release/tuning.py): pure rules."""

from __future__ import annotations

import numpy as np
import pytest

from canaryflow.core.settings import LoadTestSettings, ServingConfig, ServingSettings
from canaryflow.release.tuning import Trial, Tuning, candidates, choose

CFG = LoadTestSettings(max_p95_ms=50.0, max_failure_ratio=0.01, min_rps=50.0, tune=["2x1", "1x8"],
                       tune_min_gain=1.15)
BASE, TWO, BATCH = (ServingConfig(workers=1), ServingConfig(workers=2), ServingConfig(workers=1, batch_size=8))


def trial(config: ServingConfig, rps: float, p95: float = 10.0, failures: float = 0.0,
          error: str | None = None, p50: float | None = None) -> Trial:
    return Trial(config, requests=0 if error else 500, rps=rps, p50_ms=p95 / 2 if p50 is None else p50,
                 p95_ms=p95, failure_ratio=failures, error=error)


def test_candidates_start_with_the_operators_setting_and_list_each_other_once() -> None:
    base = ServingConfig.of(ServingSettings(workers_per_version=1, batch_size=1, max_batch_delay_ms=3))
    cfg = CFG.model_copy(update={"tune": ["2x1", "1x1", "1x8", "2x1"]})
    assert candidates(cfg, base) == [base, ServingConfig(workers=2, max_batch_delay_ms=3),
                                     ServingConfig(workers=1, batch_size=8, max_batch_delay_ms=3)]


def test_another_setting_wins_only_by_a_median_lower_by_the_minimum_gain() -> None:
    assert choose([trial(BASE, 100, p50=5.0), trial(TWO, 100, p50=4.5), trial(BATCH, 100, p50=6.0)], CFG) == (
        BASE, "kept 1 worker, no batching (median 5 ms): 2 workers, no batching's median only 1.11x lower (< 1.15x)")
    assert choose([trial(BASE, 100, p50=15.0), trial(TWO, 100, p50=6.0), trial(BATCH, 100, p50=10.0)], CFG) == (
        TWO, "chose 2 workers, no batching: median 6 ms, 2.50x lower than 1 worker, no batching's")
    # batching that makes a lone request wait: a higher median at the offered load, even where a busy machine
    # blew the operator's setting's p95 up
    assert choose([trial(BASE, 100, p50=1.5, p95=14.0), trial(BATCH, 100, p50=7.6, p95=9.0)], CFG)[0] == BASE


def test_the_operators_setting_measured_twice_counts_with_its_better_measurement() -> None:
    """A/B/A: the challenger beat serving.*'s first burst (a busy moment) but not its second."""
    trials = [trial(BASE, 100, p50=11.0, p95=61.0), trial(TWO, 100, p50=23.0), trial(BATCH, 100, p50=6.0),
              trial(BASE, 100, p50=1.4, p95=4.0)]
    assert choose(trials, CFG) == (
        BASE, "kept 1 worker, no batching (median 1.4 ms): 1 worker, batch 8 (wait <= 5 ms)'s median only 0.23x "
              "lower (< 1.15x)")
    assert choose(trials[:3], CFG)[0] == BATCH  # what one measurement each would have chosen


def test_a_setting_outside_the_bars_is_never_chosen_however_fast() -> None:
    slow, failing, short = (trial(TWO, 100, p95=80.0, p50=1.0), trial(BATCH, 100, p95=1.0, failures=0.05),
                            trial(BATCH, 30, p95=1.0))
    for other in (slow, failing, short):  # over max_p95_ms, failing, under min_rps (50)
        assert choose([trial(BASE, 100, p95=20.0), other], CFG) == (
            BASE, "kept 1 worker, no batching: no other setting answered within the load test's bars")
    # the operator's setting missing a bar (a busy machine, or a slow model: the gate tells which) does not make
    # another setting win without the gain
    assert choose([trial(BASE, 100, p50=11.0, p95=61.0), trial(TWO, 100, p50=10.0, p95=37.0)], CFG)[0] == BASE
    assert choose([trial(BASE, 100, p50=30.0, p95=70.0), trial(TWO, 100, p50=10.0, p95=45.0)], CFG)[0] == TWO
    config, why = choose([trial(BASE, 0, error="locust crashed"), slow], CFG)
    assert config == BASE and why == "kept 1 worker, no batching: no other setting answered within the load test's bars"


def test_the_table_marks_the_chosen_setting() -> None:
    table = Tuning([trial(BASE, 100), trial(BATCH, 99)], BATCH, "chose ...").markdown().splitlines()
    assert table[2].startswith("| 1 worker, no batching | 100 |") and table[2].endswith("|  |")
    assert table[3].startswith("| 1 worker, batch 8 (wait <= 5 ms) | 99 |") and "**chosen**" in table[3]


@pytest.mark.parametrize("bad", ["0x1", "17x1", "1x0", "1x257", "2", "2x", "x2", "two x one"])
def test_tune_entries_are_validated(bad: str) -> None:
    with pytest.raises(ValueError, match="is not WORKERSxBATCH"):
        LoadTestSettings(tune=[bad])


def test_the_release_records_the_measured_settings_in_its_run_and_notes(tmp_path, monkeypatch) -> None:
    """gates.tune: what tune_serving measured goes to the release run (params and tuning.json) and the notes;
    a backend without per-version settings (a cluster, the fake) leaves the release untouched."""
    from fakes import FakeRegistry, fake_services

    from canaryflow.core.registry import VersionInfo
    from canaryflow.release import gates
    from canaryflow.release.steps import ReleaseState

    registry = FakeRegistry()
    svc = fake_services(tmp_path, registry)
    st = ReleaseState("m", "2", "run-2", tmp_path / "work", None, VersionInfo("m", "2", "src", None))
    rows = np.zeros((4, 3), np.float32)
    gates.tune(svc, st, rows)  # FakeBackend.serving_config is None: nothing tried, nothing recorded
    assert registry.logged == [] and st.notes == []

    calls = []

    def measured(backend, base, url, model, version, archive, rows_, cfg, out_dir, pin=None):
        calls.append((model, version, archive.name, cfg.tune))
        out_dir.mkdir(parents=True)
        (out_dir / "tuning.json").write_text("{}")
        return Tuning([trial(base, 100), trial(BATCH, 100)], BATCH, "chose 1 worker, batch 8 (...)")

    monkeypatch.setattr(gates, "tune_serving", measured)
    gates.tune(svc, st, rows)
    assert calls == [("m", "2", "m_v2.mar", ["2x1", "1x8"])]
    (logged,) = registry.logged
    assert logged["params"] == {"serving_workers": 1, "serving_batch_size": 8, "serving_max_batch_delay_ms": 5}
    assert [f.name for f in logged["files"]] == ["tuning.json"]
    assert st.notes[-1].startswith("## Serving settings (measured)\n\nchose 1 worker, batch 8 (...)\n\n| setting |")
