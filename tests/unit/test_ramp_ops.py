"""The ramp steps, manual rollback and reconcile (canaryflow.ramp / rollback / reconcile) with fakes."""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from fakes import FakeBackend, FakeLauncher, FakeRegistry, FakeRouter, fake_services, sealed
from fakes import WindowSource as Source

from canaryflow.core.errors import RegistryError
from canaryflow.core.registry import VersionInfo
from canaryflow.core.settings import CanarySettings
from canaryflow.core.state import Route, Tag
from canaryflow.release import ramp, ramp_report, reconcile, rollback
from canaryflow.release.converge import KEEP, ChaosBuild, converge
from canaryflow.release.steps import ReleaseState
from canaryflow.services import Services
from deployments.canary import Action, Decision, Phase, start

NOW = time.time()


def info(version: str, created_s: float = NOW - 3600, **tags: str) -> VersionInfo:
    return VersionInfo("m", version, f"models:/m/{version}", None, dict(tags), [], int(created_s * 1000))


def services(tmp_path: Path, versions: dict[str, VersionInfo], route: dict | None = None,
             registered: set[str] | None = None, **aliases: str) -> Services:
    svc = fake_services(tmp_path, FakeRegistry(versions, dict(aliases)),
                        FakeBackend(set(registered if registered is not None else versions)),
                        FakeRouter({"m": route or {"stable": "1"}}))
    return sealed(svc)


def state(svc: Services, tmp_path: Path, version: str = "2", champion: str = "1",
          bake_s: float = 0) -> ReleaseState:
    # replay off: these fakes have no inference API (the pairwise replay has its own tests)
    policy = svc.settings.model_copy(update={"canary": CanarySettings(steps=[10, 50, 100], min_requests=20,
                                                                      replay=False, bake_s=bake_s)})
    return ReleaseState("m", version, "run-2", tmp_path / "work", champion, svc.registry.versions[version],
                        policy=policy)


def test_ramp_starts_advances_and_records(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": info("1", **{Tag.STATUS: "released"}), "2": info("2")}, champion="1")
    st = state(svc, tmp_path)
    status = ramp.start_or_resume(svc, st)
    assert svc.router.table["m"] == {"stable": "1", "canary": "2", "weight": 10.0, "shadow": False}
    assert svc.registry.versions["2"].tags[Tag.STATUS] == "canary"
    assert ramp.load_status(svc, "m", "2") == status
    d = ramp.analyse(svc, st, status, source=Source(), now=status.started_at + 30)
    assert d.action is Action.ADVANCE and svc.router.table["m"]["weight"] == 50.0
    assert ramp.load_status(svc, "m", "2").weight == 50.0
    step, metrics = svc.registry.steps[-1]
    # the weight the analysis MEASURED (10 %), not the one its decision set (50 %)
    assert step == 1 and metrics["canary.weight"] == 10.0 and metrics["canary.candidate.requests"] == 60
    table = ramp_report.checks_table(st)
    assert {r["check"] for r in table} >= {"errors", "p95", "latency_u", "prediction_drift", "decision"}
    assert {r["weight"] for r in table} == {10.0}
    d = ramp.analyse(svc, st, d.status, source=Source(), now=status.started_at + 60)
    assert d.action is Action.PROMOTE and svc.router.table["m"] == {"stable": "2"}
    assert [(s, m["canary.weight"]) for s, m in svc.registry.steps] == [(1, 10.0), (2, 50.0)]
    canary = st.results[-1]
    assert canary.gate == "canary" and "weight" not in canary.measured  # "canary.weight" is the series alone
    assert canary.measured["max_weight"] == 50.0 and canary.measured["decided_at_weight"] == 50.0
    assert ramp_report.write_timeline_png(st, tmp_path / "t.png").stat().st_size > 1000


def ramp_to_bake(tmp_path: Path) -> tuple[SimpleNamespace, ReleaseState, float, Decision]:
    """v2 ramped 10 -> 50 -> 100 % against v1 with a 60 s bake: the last decision starts the bake."""
    svc = services(tmp_path, {"1": info("1", **{Tag.STATUS: "released"}), "2": info("2")}, champion="1")
    st = state(svc, tmp_path, bake_s=60)
    status = ramp.start_or_resume(svc, st)
    d = ramp.analyse(svc, st, status, source=Source(), now=status.started_at + 30)
    return svc, st, status.started_at, ramp.analyse(svc, st, d.status, source=Source(), now=status.started_at + 60)


def test_bake_promotes_at_100_then_a_failure_restores_the_previous_champion(tmp_path: Path) -> None:
    svc, st, t0, d = ramp_to_bake(tmp_path)
    assert d.action is Action.BAKE and d.status.phase is Phase.BAKING
    assert svc.router.table["m"] == {"stable": "2"} and svc.backend.default == "2"
    assert svc.registry.aliases == {"champion": "2", "previous": "1"} and "1" in svc.backend.registered
    d = ramp.analyse(svc, st, d.status, source=Source(), now=t0 + 90)
    assert d.action is Action.HOLD and "baking" in d.reasons[0]
    for t in (100, 110):  # errors after promotion: two failed analyses
        d = ramp.analyse(svc, st, d.status, source=Source(cand_errors=10), now=t0 + t)
    assert d.action is Action.ROLLBACK and d.status.phase is Phase.ROLLED_BACK
    assert svc.router.table["m"] == {"stable": "1"} and svc.backend.default == "1"
    assert svc.registry.aliases == {"champion": "1"}


def as_chaos_build(svc: Services, version: str) -> None:
    """Make the version's archive in the model store ship the fault-injecting handler, as the archiver would."""
    with zipfile.ZipFile(svc.paths.model_store / f"m_v{version}.mar", "w") as z:
        z.writestr("chaos_handler.py", "# fault injection")
        z.writestr("handler.py", "# production")


@pytest.mark.parametrize("bake_s", [0, 60], ids=["promote", "bake"])
def test_a_chaos_build_that_passes_its_ramp_is_rolled_back_not_promoted(tmp_path: Path, bake_s: float) -> None:
    svc = services(tmp_path, {"1": info("1", **{Tag.STATUS: "released"}), "2": info("2")}, champion="1")
    as_chaos_build(svc, "2")
    st = state(svc, tmp_path, bake_s=bake_s)
    status = ramp.start_or_resume(svc, st)  # a chaos build may take a share of live traffic: that is its purpose
    d = ramp.analyse(svc, st, status, source=Source(), now=status.started_at + 30)
    assert d.action is Action.ADVANCE and svc.router.table["m"]["canary"] == "2"
    d = ramp.analyse(svc, st, d.status, source=Source(), now=status.started_at + 60)
    assert d.action is Action.ROLLBACK and d.status.phase is Phase.ROLLED_BACK
    assert "chaos build" in d.reasons[-1] and "every check passed" in d.reasons[0]
    assert svc.router.table["m"] == {"stable": "1"} and svc.registry.aliases == {"champion": "1"}
    assert ramp.load_status(svc, "m", "2").phase is Phase.ROLLED_BACK


def test_nothing_makes_a_chaos_build_stable_or_champion_unless_the_operator_allows_it(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": released("1"), "2": released("2")}, champion="1")
    as_chaos_build(svc, "2")
    for want, champion in ((Route("2"), KEEP), (Route("1"), "2"), (Route("2", "1", 10.0), KEEP)):
        with pytest.raises(ChaosBuild, match="v2 is a chaos build"):
            converge(svc, "m", want, champion=champion)
    assert svc.router.table["m"] == {"stable": "1"} and svc.registry.aliases == {"champion": "1"}
    converge(svc, "m", Route("1", "2", 25.0))  # a share of traffic as a canary is what a chaos build is for
    assert svc.router.table["m"]["canary"] == "2"
    svc.settings = svc.settings.model_copy(update={"canary": CanarySettings(chaos_may_promote=True)})  # a drill
    converge(svc, "m", Route("2"), champion="2")
    assert svc.router.table["m"] == {"stable": "2"} and svc.registry.aliases == {"champion": "2"}


def test_a_crashed_bake_resumes_as_the_same_ramp(tmp_path: Path) -> None:
    svc, _, _, d = ramp_to_bake(tmp_path)
    assert d.action is Action.BAKE
    rerun = state(svc, tmp_path, champion="2", bake_s=60)  # a re-run sees the alias already moved
    resumed = ramp.pending(svc, rerun)
    assert resumed is not None and resumed.phase is Phase.BAKING and resumed.champion == "1"


def test_failed_checks_roll_back_to_the_champion(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": info("1"), "2": info("2")}, champion="1")
    st = state(svc, tmp_path)
    status = ramp.start_or_resume(svc, st)
    for _ in range(2):
        d = ramp.analyse(svc, st, status, source=Source(cand_errors=10), now=status.started_at + 30)
        status = d.status
    assert d.action is Action.ROLLBACK and "error ratio 0.167" in d.reasons[0]
    assert svc.router.table["m"] == {"stable": "1"}


def test_a_rerun_resumes_the_persisted_ramp(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": info("1"), "2": info("2")}, champion="1")
    st = state(svc, tmp_path)
    mid = ramp.save_status(svc, "m", replace(start("1", "2", st.policy.canary, NOW - 100), step=1, weight=50.0,
                                             iterations=3))
    assert mid.generation == 1 and ramp.pending(svc, st) == mid
    resumed = ramp.start_or_resume(svc, st)
    assert replace(resumed, generation=mid.generation, heartbeat_at=0.0) == mid and resumed.generation == 2
    assert svc.router.table["m"]["weight"] == 50.0 and "resumed" in st.notes[-1]
    svc.backend.registered.discard("2")  # candidate lost (TorchServe restarted): gates must run again
    assert ramp.pending(svc, st) is None


def test_a_ramp_ended_elsewhere_is_respected(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": info("1"), "2": info("2")}, champion="1")
    st = state(svc, tmp_path)
    status = ramp.start_or_resume(svc, st)
    ramp.save_status(svc, "m", replace(status, phase=Phase.ROLLED_BACK, reasons=["operator"]))
    d = ramp.analyse(svc, st, status, source=Source(), now=NOW)
    assert d.action is Action.ROLLBACK and d.reasons == ["operator"]


def released(version: str) -> VersionInfo:
    return info(version, **{Tag.STATUS: "released"})


def test_manual_rollback_restores_previous_and_is_safe_twice(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": released("1"), "2": released("2")}, route={"stable": "2"},
                   registered={"2"}, champion="2", previous="1")
    out = rollback.rollback(svc, "m", None, "p99 regression seen by on-call", "alice")
    assert out["changed"] == "true" and out["champion"] == "1"
    assert svc.router.table["m"] == {"stable": "1"} and svc.backend.default == "1"
    assert svc.registry.aliases == {"champion": "1"}
    assert svc.backend.registered == {"1"}  # re-registered from the model store, the bad one retired
    tags = svc.registry.versions["2"].tags
    assert tags[Tag.STATUS] == "rolled_back" and "alice" in tags["canaryflow.reason"]
    assert json.loads(svc.registry.model_tag[Tag.LAST_ROLLBACK])["by"] == "alice"
    assert svc.registry.runs[0]["reason"] == "p99 regression seen by on-call"
    assert svc.registry.runs[0]["name"] == "rollback v2 → v1 of m"  # version first: a cut name keeps it
    # people read the descriptions; no stale "replaced as champion" on the version that serves again
    assert svc.registry.versions["2"].description.startswith("_Update:_ rolled back: manual rollback to v1 by alice")
    restored = svc.registry.versions["1"]
    assert restored.tags[Tag.REASON].startswith("serving as champion again after a manual rollback to v1")
    assert restored.description.startswith("_Update:_ serving as champion again")
    changes = svc.router.changes
    again = rollback.rollback(svc, "m", None, "clicked twice", "alice")
    assert again["changed"] == "false" and svc.router.changes == changes


def test_rollback_refuses_a_version_that_was_never_released(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": info("1", **{Tag.STATUS: "rejected"}), "2": released("2")}, champion="2")
    with pytest.raises(RegistryError, match="never released"):
        rollback.rollback(svc, "m", "1", "why not", "bob")
    with pytest.raises(RegistryError, match="no 'previous' alias"):
        rollback.rollback(svc, "m", None, "why not", "bob")


def test_rollback_aborts_a_ramp_in_progress(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": released("1"), "2": released("2"), "3": info("3")},
                   route={"stable": "2", "canary": "3", "weight": 25.0}, champion="2", previous="1")
    ramp.save_status(svc, "m", replace(start("2", "3", CanarySettings(), NOW), weight=25.0))
    svc.registry.set_tags("m", "3", {Tag.STATUS: "canary"})
    rollback.rollback(svc, "m", "2", "freeze", "carol")
    assert svc.router.table["m"] == {"stable": "2"}
    assert ramp.load_status(svc, "m", "3").phase is Phase.ROLLED_BACK
    assert svc.registry.versions["3"].tags[Tag.STATUS] == "rolled_back" and "3" not in svc.backend.registered


def run(version: str, state: str) -> dict:
    return {"parameters": {"model_name": "m", "version": version}, "state_type": state}


def test_reconcile_starts_a_release_for_a_missed_webhook_once(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": released("1"), "2": info("2"), "3": info("3", created_s=NOW - 5)},
                   champion="1")
    launcher = FakeLauncher()
    actions = reconcile.reconcile(svc, launcher, now=NOW)
    assert [s[1] for s in launcher.started] == ["2"] and "missed webhook" in actions[0]  # v3 is too recent
    assert reconcile.reconcile(svc, launcher, now=NOW) == []  # its run is alive now


def test_reconcile_resumes_or_rolls_back_a_half_way_release(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": released("1"), "2": info("2", **{Tag.STATUS: "canary"})},
                   route={"stable": "1", "canary": "2", "weight": 25.0}, champion="1")
    ramp.save_status(svc, "m", replace(start("1", "2", CanarySettings(), NOW - 60), weight=25.0))
    launcher = FakeLauncher(runs=[run("1", "COMPLETED"), run("2", "CRASHED")])
    actions = reconcile.reconcile(svc, launcher, now=NOW)
    assert launcher.started[0][:2] == ("m", "2") and "canary at 25%" in actions[-1]
    assert svc.router.table["m"]["weight"] == 25.0  # the recorded split stays for the resumed run
    launcher.runs = [run("2", "CRASHED")] * 3  # three runs could not finish it: give up, roll back
    actions = reconcile.reconcile(svc, launcher, now=NOW)
    assert svc.router.table["m"] == {"stable": "1"} and svc.registry.versions["2"].tags[Tag.STATUS] == "failed"
    assert "rolled back by reconcile" in actions[-1]


def test_reconcile_repairs_router_weights_that_disagree_with_the_record(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": released("1"), "2": info("2", **{Tag.STATUS: "canary"})},
                   route={"stable": "1", "canary": "2", "weight": 90.0}, registered={"1"}, champion="1")
    ramp.save_status(svc, "m", replace(start("1", "2", CanarySettings(), NOW - 60), weight=25.0))
    launcher = FakeLauncher(runs=[run("2", "RUNNING")])
    assert reconcile.reconcile(svc, launcher, now=NOW) == []  # a live run owns the model: hands off
    launcher.runs = [run("2", "FAILED")]
    actions = reconcile.reconcile(svc, launcher, now=NOW)
    assert svc.router.table["m"] == {"stable": "1", "canary": "2", "weight": 25.0, "shadow": False}
    assert "2" in svc.backend.registered and any("repaired" in a for a in actions)
    svc.router.table["m"] = {"stable": "7"}  # a champion route that lies
    svc.registry.set_tags("m", "2", {Tag.STATUS: "released"})
    actions = reconcile.reconcile(svc, FakeLauncher(runs=[run("2", "COMPLETED")]), now=NOW)
    assert svc.router.table["m"] == {"stable": "1"} and "v7 alone" in actions[0]


def test_a_release_stopped_mid_ramp_puts_all_traffic_back_before_unregistering(tmp_path: Path) -> None:
    from canaryflow.release.steps import stop

    svc = services(tmp_path, {"1": released("1"), "2": info("2")}, route={"stable": "1", "canary": "2",
                                                                         "weight": 25.0}, champion="1")
    reason = stop(svc, state(svc, tmp_path), "RegistryError: MLflow went away")
    assert svc.router.table["m"] == {"stable": "1"} and "2" not in svc.backend.registered
    assert reason == "RegistryError: MLflow went away"


def test_the_canary_replicas_follow_its_share_where_the_backend_scales_versions(tmp_path: Path) -> None:
    """Kubernetes' backend scales each version (scale_for_share): the ramp's canary gets replicas for its share, a
    shadow canary for all the copies, stable always its full bounds (a rollback needs them at once)."""
    svc = services(tmp_path, {"1": released("1"), "2": released("2")}, champion="1")
    scaled: list[tuple[str, str, float]] = []
    svc.backend.scale_for_share = lambda model, version, percent: scaled.append((model, version, percent))
    converge(svc, "m", Route("1", "2", 25.0))
    converge(svc, "m", Route("1", "2", 0.0, shadow=True))
    converge(svc, "m", Route("2"))
    assert scaled == [("m", "1", 100.0), ("m", "2", 25.0), ("m", "1", 100.0), ("m", "2", 100.0), ("m", "2", 100.0)]
