"""Release steps (canaryflow.release) with fake registry, backend and router; real MLflow model files."""

from __future__ import annotations

from pathlib import Path

import mlflow.pytorch
import numpy as np
import pytest
import torch
from fakes import FakeBackend, FakeRegistry, FakeRouter, fake_services, sealed

from canaryflow.core.errors import CanaryRolledBack, GateFailed
from canaryflow.core.locks import StatusConflict
from canaryflow.core.registry import VersionInfo
from canaryflow.core.state import Tag
from canaryflow.model.packaging import export_pytorch
from canaryflow.release import steps as release
from canaryflow.services import Services


def services(tmp_path: Path, registry: FakeRegistry) -> Services:
    return sealed(fake_services(tmp_path, registry, FakeBackend({"1", "2"}), FakeRouter({"m": {"stable": "1"}})))


def info(version: str, **tags: str) -> VersionInfo:
    return VersionInfo("m", version, "models:/m/" + version, None, dict(tags))


def test_begin_marks_release_but_not_an_already_released_champion(tmp_path: Path) -> None:
    reg = FakeRegistry({"1": info("1", **{Tag.STATUS: "released"}), "2": info("2")}, {"champion": "1"})
    svc = services(tmp_path, reg)
    st1 = release.begin(svc, "m", "1")
    assert release.already_released(st1) and reg.tag_log == []
    st2 = release.begin(svc, "m", "2")
    assert not release.already_released(st2) and st2.champion == "1"
    assert reg.tag_log == [("2", {Tag.STATUS: "releasing", Tag.REASON: "release started",
                                  "canaryflow.release_run": "run-2"})]


def test_promote_moves_route_default_and_aliases(tmp_path: Path) -> None:
    reg = FakeRegistry({"2": info("2")}, {"champion": "1"})
    svc = services(tmp_path, reg)
    reason = release.promote(svc, release.begin(svc, "m", "2"))
    assert svc.router.table["m"] == {"stable": "2"} and svc.backend.default == "2"
    assert reg.aliases == {"champion": "2", "previous": "1"}
    assert reason == "serving as champion, replacing v1"


def test_stop_unregisters_the_candidate_and_keeps_the_champion(tmp_path: Path) -> None:
    reg = FakeRegistry({"1": info("1"), "2": info("2")}, {"champion": "1"})
    svc = services(tmp_path, reg)
    reason = release.stop(svc, release.begin(svc, "m", "2"), "shape: output shape [1] for 4 input rows")
    assert svc.backend.registered == {"1"} and reason == "shape: output shape [1] for 4 input rows"
    release.stop(svc, release.begin(svc, "m", "1"), "boom")  # the routed champion is never removed
    assert svc.backend.registered == {"1"}


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Collapses(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum().reshape(1, 1).expand(1, 2)


@pytest.mark.parametrize(("example_rows", "fmt", "fixed"), [(5, "pickle", None), (5, "pt2", None), (1, "pt2", 1)])
def test_both_mlflow_formats_pass_shape_and_export(tmp_path: Path, example_rows: int, fmt: str,
                                                    fixed: int | None) -> None:
    """pickle and pt2 models pass the shape gate and export; a pt2 logged with a 1-row example is served at a
    fixed batch of 1."""
    rows = np.random.default_rng(1).normal(size=(example_rows, 6)).astype(np.float32)
    model_dir = tmp_path / "model"
    mlflow.pytorch.save_model(Mlp(), str(model_dir), input_example=rows, serialization_format=fmt)
    svc = services(tmp_path, FakeRegistry({"3": info("3")}))
    st = release.begin(svc, "m", "3")
    release.shape(st, model_dir)
    assert [r.gate for r in st.results] == ["shape"] and st.results[0].passed
    bundle = export_pytorch(model_dir, tmp_path / "bundle", name="m", version="3", max_batch_rows=64)
    assert bundle.meta.fixed_batch == fixed and bundle.meta.n_features == 6 and bundle.meta.output == "logits"
    assert bundle.model_file.exists() and bundle.meta_file.exists()


def test_shape_gate_rejects_a_model_that_answers_one_row_per_batch(tmp_path: Path) -> None:
    rows = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    model_dir = tmp_path / "model"
    mlflow.pytorch.save_model(Collapses(), str(model_dir), input_example=rows, serialization_format="pickle")
    svc = services(tmp_path, FakeRegistry({"4": info("4")}))
    st = release.begin(svc, "m", "4")
    with pytest.raises(GateFailed) as err:
        release.shape(st, model_dir)
    assert err.value.gate == "shape"
    assert err.value.reason == "output shape [1, 2] for 4 input rows; expected 4 rows"
    assert not st.results[-1].passed


@pytest.mark.parametrize("exc, status, owns", [
    (StatusConflict("ramp status changed under this writer"), "superseded", False),
    (CanaryRolledBack("prediction_drift 0.4 > 0.2"), "rolled_back", True),
    (GateFailed("quality", "accuracy 0.5 < 0.9"), "rejected", True),
    (GateFailed("load_test", "locust crashed", "error"), "failed", True),
    (GateFailed("load_test", "both slow", "inconclusive"), "failed", True),
    (RuntimeError("MLflow down"), "failed", True),
])
def test_a_run_that_lost_its_ramp_to_another_touches_nothing(exc: Exception, status: str, owns: bool) -> None:
    """Only a run that still owns the version's state may stop it (unregister, reroute) and record an outcome: a
    duplicate run whose status write lost the compare-and-set would otherwise undo the winner's step."""
    end = release.ending(exc)
    assert (end.status, end.owns_state) == (status, owns)
    assert str(exc) in end.reason


def test_every_gates_report_files_go_to_the_release_run(tmp_path: Path) -> None:
    """A list of paths (drift, data, quality) or a {kind: path} dict (the load test's locust json/html/log): every
    file that exists is uploaded, nothing else."""
    html, log = tmp_path / "locust-report.html", tmp_path / "drift.json"
    html.write_text("<html/>")
    log.write_text("{}")
    assert release.report_files({"files": {"json": str(tmp_path / "gone.json"), "html": str(html)}}) == [html]
    assert release.report_files({"files": [str(log), str(tmp_path / "gone")]}) == [log]
    assert release.report_files({"p95_ms": 3.0}) == [] and release.report_files({"files": {"n": 3}}) == []
