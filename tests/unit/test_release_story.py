"""What a release tells people: headline, artifact markdown, MLflow texts, timeline chart (pure, no servers)."""

from __future__ import annotations

import json
from pathlib import Path

from fakes import FakeBackend, FakeRegistry, FakeRouter, fake_services

from canaryflow.core.registry import VersionInfo, release_run_name, tidy
from canaryflow.core.state import ReleaseStatus, Tag
from canaryflow.release import narrate, summary_md, timeline_chart
from canaryflow.release.steps import ReleaseState
from canaryflow.release.story import (
    CanarySummary,
    Story,
    shorten,
    state_name,
    version_url,
    with_update,
)
from validation.results import GateResult, Outcome

AGREEMENT = "agreement: agreement 0.81 < 0.95 on 240 replayed rows"


def check(name: str, outcome: str, measured: float | None, threshold: float | None) -> dict:
    return {"name": name, "outcome": outcome, "measured": measured, "threshold": threshold, "reason": name}


def analysis(i: int, weight: float, action: str, failed: bool = False) -> dict:
    checks = [check("errors", "passed", 0.0, 0.05), check("p95", "passed", 4.0, 9.0),
              check("agreement", "failed" if failed else "passed", 0.81 if failed else 0.99, 0.95),
              check("traffic", "inconclusive", 10.0, 30.0)]
    reasons = [AGREEMENT] if failed else [f"every check passed at {weight:g}%; advancing"]
    return {"t": 100.0 + i, "iteration": i, "action": action, "weight": weight, "measured_weight": weight,
            "reasons": reasons, "checks": checks}


RAMP = [analysis(1, 10, "advance"), analysis(2, 25, "hold", failed=True), analysis(3, 25, "rollback", failed=True)]
GATES = [GateResult("contract", Outcome.PASSED, "signature compatible"),
         GateResult("load_test", Outcome.PASSED, "p95 4.1 ms <= 25 ms", {"p95_ms": 4.1})]


def rolled_back() -> Story:
    return Story("m", "3", ReleaseStatus.ROLLED_BACK, "canary: " + AGREEMENT, "2", GATES, CanarySummary(RAMP),
                 "onnx_fp32", "http://mlflow/#/experiments/1/runs/r3", version_url("http://mlflow", "m", "3"))


def test_a_rollback_headline_says_where_why_and_who_serves() -> None:
    story = rolled_back()
    assert story.headline() == "v3 rolled back at 25 %; v2 still serves: agreement 0.81 < 0.95 on 240 replayed rows"
    assert story.canary.max_weight == 25 and story.canary.path() == "10 → 25 %"
    assert story.canary.decisive["iteration"] == 3
    assert [c["name"] for c in story.canary.deciding_checks()] == ["agreement"]
    two = dict(RAMP[-1], checks=[*RAMP[-1]["checks"], check("probability_delta", "failed", 0.3, 0.2)])
    story = Story("m", "3", ReleaseStatus.ROLLED_BACK, "canary: ...", "2", canary=CanarySummary([*RAMP[:-1], two]))
    assert story.headline() == ("v3 rolled back at 25 %; v2 still serves: agreement 0.81 < 0.95 on 240 replayed "
                                "rows (and 1 more failed check)")


def test_headlines_of_the_other_outcomes() -> None:
    released = Story("m", "2", ReleaseStatus.RELEASED, "serving as champion, replacing v1", "1",
                     canary=CanarySummary([analysis(1, 10, "advance"), analysis(2, 50, "bake"),
                                           analysis(3, 100, "promote")]))
    assert released.headline() == "v2 released; v2 serves now (replacing v1): promoted by the " \
                                  "canary (10 → 50 → 100 %)"
    rejected = Story("m", "4", ReleaseStatus.REJECTED, "quality: accuracy 0.61 < 0.9", "2",
                     [GateResult("quality", Outcome.FAILED, "accuracy 0.61 < 0.9")])
    assert rejected.headline() == "v4 rejected by the quality gate; v2 still serves: quality: accuracy 0.61 < 0.9"
    first = Story("m", "1", ReleaseStatus.FAILED, "load_test: inconclusive", None)
    assert "; nothing serves this model: " in first.headline() and first.serving is None
    assert state_name(ReleaseStatus.ROLLED_BACK) == "RolledBack" and state_name("rejected") == "Rejected"


def test_long_reasons_are_shortened_on_one_line() -> None:
    text = "word " * 100 + "| end"
    short = shorten(text, 60)
    assert len(short) <= 62 and short.endswith(" …") and "\n" not in short
    assert shorten("a\nb") == "a b"


def test_the_artifact_has_headline_tables_then_notes_never_a_row_of_a_table() -> None:
    md = summary_md.markdown(rolled_back(), ["## Optimization\n\n| variant | status |\n|---|---|\n| onnx | ok |",
                                             "canary started at 10%"])
    lines = md.splitlines()
    assert lines[0] == "# v3 rolled back at 25 %; v2 still serves: agreement 0.81 < 0.95 on 240 replayed rows"
    assert "- canary started at 10%" in lines and "| canary started at 10% |" not in md
    assert lines[-1].startswith("| onnx") and lines.index("## Optimization") > lines.index("## Notes")
    for i, line in enumerate(lines[:-1]):  # every table ends in a blank line
        if line.startswith("|") and not lines[i + 1].startswith("|"):
            assert lines[i + 1] == "", (i, line, lines[i + 1])
    canary = [x for x in lines if x.startswith("| ") and " % |" in x]
    assert [x.split(" | ")[1] for x in canary] == ["10 %", "25 %", "25 %"]  # measured, in order
    assert "**3**" in canary[-1] and "agreement 0.81 (threshold 0.95)" in canary[-1]
    assert "Decided at analysis 3 (25 % measured): agreement 0.81 (threshold 0.95)" in md
    assert "| serves now | v2 (champion) |" in md and "onnx_fp32" in md
    assert "[open](http://mlflow/#/models/m/versions/3)" in md


def test_mlflow_texts_and_links() -> None:
    story = rolled_back()
    note = story.run_note()
    assert note.startswith("**v3 rolled back at 25 %") and "- **serves now**: v2" in note
    assert "[m v3](http://mlflow/#/models/m/versions/3)" in note
    description = story.version_description()
    assert "- **gates**: contract passed, load_test passed" in description
    assert "- **served variant**: onnx_fp32" in description and "http://mlflow/#/experiments/1/runs/r3" in description
    assert "- **canary**: 3 analyses (10 → 25 %), max 25 %; analysis 3 at 25 % decided rollback" in description
    updated = with_update(with_update(description, "replaced by v4"), "rolled back by ops")
    assert updated.startswith("_Update:_ rolled back by ops\n\n**v3") and "replaced by v4" not in updated
    assert release_run_name("breast-cancer-classifier", "3").startswith("v3 ")
    assert tidy(17.749999999999997) == 17.75 and tidy(1234567.0) == 1234567.0 and tidy(0.000123456789) == 0.00012346


def test_narrate_describes_the_version_and_its_run_and_updates_the_champion_it_replaced(tmp_path: Path) -> None:
    versions = {v: VersionInfo("m", v, f"models:/m/{v}", None, {Tag.STATUS: "released",
                                                                Tag.REASON: "serving as champion"})
                for v in ("1", "2")}
    svc = fake_services(tmp_path, FakeRegistry(versions, {"champion": "2"}), FakeBackend({"1", "2"}),
                        FakeRouter({"m": {"stable": "2"}}))
    versions["1"] = svc.registry.versions["1"]
    svc.registry.describe_version("m", "1", "**v1 released: ...; v1 serves now**\n")
    st = ReleaseState("m", "2", "run-2", tmp_path / "w", "1", svc.registry.versions["2"], run_url="http://r/2")
    st.results.extend(GATES)
    story = narrate.tell(svc, st, ReleaseStatus.RELEASED, "serving as champion, replacing v1")
    assert story.headline().startswith("v2 released")
    assert svc.registry.run_tags["run-2"][narrate.NOTE].startswith("**v2 released")
    assert svc.registry.run_tags["run-2"]["canaryflow.model_version_url"].endswith("#/models/m/versions/2")
    assert svc.registry.versions["2"].description.startswith("**v2 released")
    old = svc.registry.versions["1"]
    assert old.tags[Tag.REASON].startswith("replaced as champion by v2") and old.tags[Tag.STATUS] == "released"
    assert old.description.startswith("_Update:_ replaced as champion by v2") and "**v1 released" in old.description


def test_the_timeline_has_a_panel_per_deciding_check(tmp_path: Path) -> None:
    assert timeline_chart.deciding_checks(RAMP) == ["errors", "p95", "agreement"]  # traffic never decides
    assert timeline_chart.series(RAMP, "agreement")[-1] == (3, 0.81, 0.95, "failed")
    png = timeline_chart.draw(RAMP, "canary of m v3", tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    old_line = json.loads(json.dumps(RAMP[0]))
    del old_line["measured_weight"]  # lines written before the field: "weight" stands in
    assert CanarySummary([old_line]).max_weight == 10


def test_experiment_links_open_the_classic_runs_view() -> None:
    from types import SimpleNamespace

    from canaryflow.core.registry import MlflowRegistry

    experiments = {"canaryflow-releases": SimpleNamespace(experiment_id="7")}
    registry = MlflowRegistry("http://h:5000/")
    registry.client = SimpleNamespace(get_experiment_by_name=experiments.get)
    assert registry.experiment_url("canaryflow-releases") == (
        "http://h:5000/#/experiments/7/runs?workflowType=machine_learning")  # not MLflow 3's GenAI overview
    assert registry.experiment_url("absent") == "http://h:5000/"  # no release yet: the server
