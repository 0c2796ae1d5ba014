"""The choice of serving settings from measured bursts (canaryflow/release/tuning.py): pure rules."""

from __future__ import annotations

import numpy as np
import pytest

from canaryflow.core.settings import LoadTestSettings, ServingConfig, ServingSettings
from canaryflow.release.tuning import Trial, Tuning, candidates, choose
from deployments.loadtest import LoadTestResult

CFG = LoadTestSettings(max_p95_ms=50.0, max_failure_ratio=0.01, min_rps=50.0, tune=["2x1", "1x8"],
                       tune_min_gain=1.15)
BASE, TWO, BATCH = (ServingConfig(workers=1), ServingConfig(workers=2), ServingConfig(workers=1, batch_size=8))


def trial(config: ServingConfig, rps: float, p95: float = 10.0, failures: float = 0.0,
          error: str | None = None, p50: float | None = None, capacity: float = 800.0) -> Trial:
    return Trial(config, requests=0 if error else 500, rps=rps, p50_ms=p95 / 2 if p50 is None else p50,
                 p95_ms=p95, failure_ratio=failures, capacity_rps=0.0 if error else capacity, error=error)


def test_candidates_start_with_the_operators_setting_and_list_each_other_once() -> None:
    base = ServingConfig.of(ServingSettings(workers_per_version=1, batch_size=1, max_batch_delay_ms=3))
    cfg = CFG.model_copy(update={"tune": ["2x1", "1x1", "1x8", "2x1"]})
    assert candidates(cfg, base) == [base, ServingConfig(workers=2, max_batch_delay_ms=3),
                                     ServingConfig(workers=1, batch_size=8, max_batch_delay_ms=3)]


def test_another_setting_wins_by_capacity_within_the_median_budget() -> None:
    # the bench's MLP: batching waits <= 1 ms (+1 ms for the typical request at 100 requests/s), 4x the capacity
    assert choose([trial(BASE, 100, p50=2.0, capacity=800), trial(TWO, 100, p50=2.1, capacity=820),
                   trial(BATCH, 100, p50=3.1, capacity=3200)], CFG) == (
        BATCH, "chose 1 worker, batch 8 (wait <= 1 ms): 3200 requests/s closed-loop, 4.00x 1 worker, no batching's, "
               "median 3.1 ms at the offered load (1 worker, no batching: 2 ms)")
    # not enough capacity to be worth a change
    assert choose([trial(BASE, 100, p50=2.0, capacity=800), trial(TWO, 100, p50=1.9, capacity=900)], CFG) == (
        BASE, "kept 1 worker, no batching (800 requests/s closed-loop): 2 workers, no batching served only 1.12x "
              "that (< 1.15x)")
    # a batch that makes the typical request wait more than the budget (5 ms: +5.5 ms), however much capacity
    assert choose([trial(BASE, 100, p50=2.0, capacity=800), trial(BATCH, 100, p50=7.5, capacity=3200)], CFG) == (
        BASE, "kept 1 worker, no batching: no other setting answered within the load test's bars and a median of "
              "4 ms (2 + 2)")
    # the operator can refuse any added latency
    strict = CFG.model_copy(update={"tune_max_added_ms": 0.0})
    assert choose([trial(BASE, 100, p50=2.0), trial(BATCH, 100, p50=3.1, capacity=3200)], strict)[0] == BASE
    # where requests queue at the offered load, the faster setting is also the one with more capacity
    assert choose([trial(BASE, 100, p50=15.0, capacity=700), trial(TWO, 100, p50=6.0, capacity=1400),
                   trial(BATCH, 100, p50=10.0, capacity=1000)], CFG)[0] == TWO


def test_the_operators_setting_measured_twice_counts_with_its_better_median_and_capacity() -> None:
    """A/B/A: the challenger beat serving.*'s first bursts (a busy moment) but not its second."""
    trials = [trial(BASE, 100, p50=11.0, p95=61.0, capacity=300), trial(TWO, 100, p50=23.0, capacity=350),
              trial(BATCH, 100, p50=6.0, capacity=900), trial(BASE, 100, p50=1.4, p95=4.0, capacity=1000)]
    assert choose(trials, CFG) == (
        BASE, "kept 1 worker, no batching: no other setting answered within the load test's bars and a median of "
              "3.4 ms (1.4 + 2)")
    assert choose(trials[:3], CFG)[0] == BATCH  # what one measurement each would have chosen
    again = [*trials[:3], trial(BASE, 100, p50=5.0, capacity=1000)]  # the second median alone would let BATCH in
    assert choose(again, CFG)[0] == BASE  # but not its capacity: 0.9x


def test_capacity_counts_the_answered_requests_only() -> None:
    offered = LoadTestResult("http://router", 8, 3.0, requests=300, rps=100.0, p50_ms=2.0, p95_ms=4.0)
    closed = LoadTestResult("http://router", 8, 3.0, requests=6000, failures=3000, rps=2000.0, p50_ms=1.0,
                            p95_ms=2.0)
    assert Trial.of(BATCH, offered, closed).capacity_rps == 1000.0  # half of them failed (a full queue: 503)
    crashed = LoadTestResult("http://router", 8, 3.0, error="locust exited 1")
    assert Trial.of(BATCH, offered, crashed) == Trial(BATCH, 300, 100.0, 2.0, 4.0, 0.0, 0.0, "locust exited 1")


def test_a_setting_outside_the_bars_is_never_chosen_however_fast() -> None:
    slow, failing, short = (trial(TWO, 100, p95=80.0, p50=1.0, capacity=5000),
                            trial(BATCH, 100, p95=1.0, failures=0.05, capacity=5000),
                            trial(BATCH, 30, p95=1.0, capacity=5000))
    for other in (slow, failing, short):  # over max_p95_ms, failing, under min_rps (50)
        assert choose([trial(BASE, 100, p95=20.0), other], CFG)[0] == BASE
    # the operator's setting missing a bar (a busy machine, or a slow model: the gate tells which) does not make
    # another setting win without the gain
    assert choose([trial(BASE, 100, p50=11.0, p95=61.0, capacity=500),
                   trial(TWO, 100, p50=10.0, p95=37.0, capacity=520)], CFG)[0] == BASE
    assert choose([trial(BASE, 100, p50=30.0, p95=70.0, capacity=300),
                   trial(TWO, 100, p50=10.0, p95=45.0, capacity=900)], CFG)[0] == TWO
    # serving.* failing outright: anything within the bars and budget wins
    assert choose([trial(BASE, 0, error="locust crashed"), trial(TWO, 100, p50=1.0, capacity=100)], CFG)[0] == TWO
    config, why = choose([trial(BASE, 0, error="locust crashed"), slow], CFG)
    assert config == BASE and why.startswith("kept 1 worker, no batching: no other setting answered within")


def test_the_table_marks_the_chosen_setting() -> None:
    table = Tuning([trial(BASE, 100), trial(BATCH, 99)], BATCH, "chose ...").markdown().splitlines()
    assert table[2].startswith("| 1 worker, no batching | 100 |") and table[2].endswith("| 800 |  |")
    assert table[3].startswith("| 1 worker, batch 8 (wait <= 1 ms) | 99 |") and "**chosen**" in table[3]


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
    assert logged["params"] == {"serving_workers": 1, "serving_batch_size": 8, "serving_max_batch_delay_ms": 1}
    assert [f.name for f in logged["files"]] == ["tuning.json"]
    assert st.notes[-1].startswith("## Serving settings (measured)\n\nchose 1 worker, batch 8 (...)\n\n| setting |")


def test_every_setting_counts_with_its_best_trial() -> None:
    """Two rounds: the challenger's first trial met a busy moment (its median over serving.*'s budget), its second
    did not; serving.*'s best trial is its second. Each counts with its best median and best capacity."""
    trials = [trial(BASE, 100, p50=7.0, capacity=720), trial(BATCH, 100, p50=10.0, capacity=1050),
              trial(BATCH, 100, p50=6.0, capacity=1240), trial(BASE, 100, p50=6.5, capacity=975)]
    assert choose(trials[:2], CFG)[0] == BASE  # one trial each: left out on the median (10 > 7 + 2)
    assert choose(trials, CFG) == (
        BATCH, "chose 1 worker, batch 8 (wait <= 1 ms): 1240 requests/s closed-loop, 1.27x 1 worker, no batching's, "
               "median 6 ms at the offered load (1 worker, no batching: 6.5 ms)")
    # a setting that missed a bar in one trial and met them in another is within them, with that trial's median
    missed = [trial(BASE, 100, p50=2.0, capacity=800), trial(BATCH, 100, p50=1.0, p95=80.0, capacity=3000),
              trial(BATCH, 100, p50=3.0, p95=9.0, capacity=2000)]
    assert choose(missed, CFG) == (
        BATCH, "chose 1 worker, batch 8 (wait <= 1 ms): 3000 requests/s closed-loop, 3.75x 1 worker, no batching's, "
               "median 3 ms at the offered load (1 worker, no batching: 2 ms)")


def test_the_settings_are_measured_in_interleaved_rounds_and_the_chosen_one_is_left_served(tmp_path,
                                                                                        monkeypatch) -> None:
    """tune_serving: A/B/C/C/B/A (re-registering only on a change), then the chosen setting served."""
    from canaryflow.release import tuning as tuning_mod

    served: list[ServingConfig] = []
    measured: list[ServingConfig] = []

    class Backend:
        config = BASE

        def serving_config(self, model, version):
            return self.config

        def tune(self, model, version, archive, config):
            self.config = config
            served.append(config)

    capacity = {BASE: [700, 980], TWO: [880, 900], BATCH: [1050, 1240]}

    def load(url, model, version, rows, cfg, out_dir, pin=None):
        config = Backend.config if not served else served[-1]
        closed = cfg.target_rps == 0
        if closed:
            measured.append(config)
            rps = capacity[config][measured.count(config) - 1]
            return LoadTestResult(url, 8, 3.0, requests=int(rps * 3), rps=rps, p50_ms=1.0, p95_ms=2.0)
        return LoadTestResult(url, 8, 3.0, requests=300, rps=100.0, p50_ms=6.0, p95_ms=9.0)

    monkeypatch.setattr(tuning_mod, "run_load_test", load)
    (tmp_path / "tuning").mkdir()
    (tmp_path / "tuning1").mkdir()
    backend = Backend()
    result = tuning_mod.tune_serving(backend, BASE, "http://router", "m", "2", tmp_path / "m_v2.mar",
                                     np.zeros((4, 3)), CFG, tmp_path / "tuning")
    assert measured == [BASE, TWO, BATCH, BATCH, TWO, BASE]
    assert served == [TWO, BATCH, TWO, BASE, BATCH]  # the last: the chosen one, served from now on
    assert result.chosen == BATCH and "1240 requests/s closed-loop, 1.27x" in result.reason
    one = CFG.model_copy(update={"tune_rounds": 1})
    measured.clear()
    served.clear()
    backend.config = BASE
    tuning_mod.tune_serving(backend, BASE, "http://router", "m", "2", tmp_path / "m_v2.mar", np.zeros((4, 3)), one,
                            tmp_path / "tuning1")
    assert measured == [BASE, TWO, BATCH]
