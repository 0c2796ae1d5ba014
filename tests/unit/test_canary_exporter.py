"""The canary exporter (canaryflow/intake/canary_metrics.py) on a temporary state dir: routes.json as the router
writes it, ramp statuses sealed as the pipeline seals them, the output parsed by prometheus_client's parser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from canaryflow.core import seal
from canaryflow.core.errors import RegistryError, ServingError
from canaryflow.core.paths import StatePaths, write_json
from canaryflow.core.registry import VersionInfo
from canaryflow.core.state import Tag
from canaryflow.intake.canary_metrics import CONTENT_TYPE, render_canary_metrics
from deployments.canary import CanaryStatus, Phase

ROUTES_MTIME = 1_700_000_000.0


@dataclass
class TagRegistry:
    """The one registry call the exporter makes, over several models."""

    tags: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)

    def get_version(self, name: str, version: str) -> VersionInfo:
        if (name, version) not in self.tags:
            raise RegistryError(f"model {name!r} version {version} is not in the registry")
        return VersionInfo(name, version, source="", run_id=None, tags=self.tags[(name, version)])


def _paths(tmp_path: Path, routes: dict | None) -> StatePaths:
    paths = StatePaths(tmp_path / "state")
    paths.router_dir.mkdir(parents=True)
    if routes is not None:
        write_json(paths.router_state, {"routes": routes})
        os.utime(paths.router_state, (ROUTES_MTIME, ROUTES_MTIME))
    return paths


def _status(candidate: str, phase: Phase, weight: float, step_started_at: float) -> CanaryStatus:
    return CanaryStatus(champion="1", candidate=candidate, phase=phase, step=1, weight=weight,
                        started_at=step_started_at - 600, step_started_at=step_started_at)


def _sealed(paths: StatePaths, model: str, status: CanaryStatus) -> dict[str, str]:
    return {Tag.CANARY: seal.seal_json(paths, model, status.candidate, status.to_json())}


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(name, sorted labels): value} of every sample in ``text`` (the real text-format parser)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def _phases(samples: dict, model: str, version: str) -> dict[str, float]:
    return {dict(labels)["phase"]: value for (name, labels), value in samples.items()
            if name == "canaryflow_canary_phase" and dict(labels)["model"] == model
            and dict(labels)["version"] == version}


def test_routes_alone_give_weight_phase_and_the_routes_file_time(tmp_path: Path) -> None:
    paths = _paths(tmp_path, {"iris": {"stable": "1", "canary": "2", "weight": 25.0, "shadow": False},
                              "wine": {"stable": "4", "canary": "5", "shadow": True},
                              "cars": {"stable": "3"}})
    samples = _samples(render_canary_metrics(paths))
    assert samples[("canaryflow_canary_weight", (("model", "iris"), ("version", "2")))] == 25.0
    assert samples[("canaryflow_canary_weight", (("model", "wine"), ("version", "5")))] == 0.0
    assert _phases(samples, "iris", "2") == {p.value: float(p is Phase.PROGRESSING) for p in Phase}
    assert _phases(samples, "wine", "5") == {p.value: float(p is Phase.SHADOW) for p in Phase}
    assert samples[("canaryflow_canary_last_change_timestamp_seconds", (("model", "iris"),))] == ROUTES_MTIME
    assert samples[("canaryflow_canary_status_verified", (("model", "iris"), ("version", "2")))] == 0.0
    # a model without a canary has no ramp: no series at all
    assert not [key for key in samples if ("model", "cars") in key[1]]


def test_a_sealed_status_gives_the_phase_and_when_the_step_began(tmp_path: Path) -> None:
    paths = _paths(tmp_path, {"iris": {"stable": "1", "canary": "2", "weight": 50.0, "shadow": False}})
    registry = TagRegistry({("iris", "2"): _sealed(paths, "iris", _status("2", Phase.PROGRESSING, 50.0,
                                                                          1_700_000_900.0))})
    samples = _samples(render_canary_metrics(paths, registry))
    assert samples[("canaryflow_canary_last_change_timestamp_seconds", (("model", "iris"),))] == 1_700_000_900.0
    assert samples[("canaryflow_canary_status_verified", (("model", "iris"), ("version", "2")))] == 1.0
    assert _phases(samples, "iris", "2")["progressing"] == 1.0


def test_a_forged_status_is_not_believed(tmp_path: Path) -> None:
    paths = _paths(tmp_path, {"iris": {"stable": "1", "canary": "2", "weight": 5.0, "shadow": False}})
    tags = _sealed(paths, "iris", _status("2", Phase.PROGRESSING, 5.0, 1_700_000_900.0))
    forged = json.loads(tags[Tag.CANARY])
    forged["step_started_at"] = 9_999_999_999.0  # a registry user hiding a stuck ramp
    registry = TagRegistry({("iris", "2"): {Tag.CANARY: json.dumps(forged)}})
    samples = _samples(render_canary_metrics(paths, registry))
    assert samples[("canaryflow_canary_last_change_timestamp_seconds", (("model", "iris"),))] == ROUTES_MTIME
    assert samples[("canaryflow_canary_status_verified", (("model", "iris"), ("version", "2")))] == 0.0


def test_baking_shows_weight_100_and_a_finished_ramp_shows_nothing(tmp_path: Path) -> None:
    paths = _paths(tmp_path, {"iris": {"stable": "2"}, "wine": {"stable": "7"}})
    registry = TagRegistry({
        ("iris", "2"): _sealed(paths, "iris", _status("2", Phase.BAKING, 100.0, 1_700_000_500.0)),
        ("wine", "7"): _sealed(paths, "wine", _status("7", Phase.PROMOTED, 100.0, 1_700_000_100.0)),
    })
    samples = _samples(render_canary_metrics(paths, registry))
    assert samples[("canaryflow_canary_weight", (("model", "iris"), ("version", "2")))] == 100.0
    assert _phases(samples, "iris", "2")["baking"] == 1.0
    assert not [key for key in samples if ("model", "wine") in key[1]]


def test_an_unanswered_registry_falls_back_to_the_routes(tmp_path: Path) -> None:
    paths = _paths(tmp_path, {"iris": {"stable": "1", "canary": "2", "weight": 25.0, "shadow": False}})
    seal.mac(paths, "canary")  # a seal key exists, as on a stack that released before
    samples = _samples(render_canary_metrics(paths, TagRegistry()))
    assert samples[("canaryflow_canary_weight", (("model", "iris"), ("version", "2")))] == 25.0
    assert samples[("canaryflow_canary_status_verified", (("model", "iris"), ("version", "2")))] == 0.0


def test_a_routes_snapshot_replaces_routes_json(tmp_path: Path) -> None:
    """On Kubernetes the table is the HTTPRoutes (GatewayApiRouter.snapshot): its last write is the last change
    when no sealed status tells it."""
    paths = _paths(tmp_path, None)
    text = render_canary_metrics(paths, snapshot=({"iris": {"stable": "1", "canary": "3", "weight": 5.0}}, 1.8e9))
    samples = _samples(text)
    assert samples[("canaryflow_canary_weight", (("model", "iris"), ("version", "3")))] == 5.0
    assert samples[("canaryflow_canary_last_change_timestamp_seconds", (("model", "iris"),))] == 1.8e9
    assert samples[("canaryflow_canary_status_verified", (("model", "iris"), ("version", "3")))] == 0.0


def test_no_routes_file_gives_no_series_and_writes_nothing(tmp_path: Path) -> None:
    paths = _paths(tmp_path, None)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    text = render_canary_metrics(paths, TagRegistry())
    assert [s for family in text_string_to_metric_families(text.decode()) for s in family.samples] == []
    assert "# TYPE canaryflow_canary_weight gauge" in text.decode()
    assert CONTENT_TYPE.startswith("text/plain")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no seal key made


def test_a_broken_routes_file_fails_the_scrape(tmp_path: Path) -> None:
    paths = _paths(tmp_path, None)
    paths.router_state.write_text("{not json")
    with pytest.raises(ServingError, match="routes table"):
        render_canary_metrics(paths)
    write_json(paths.router_state, {"routes": {"iris": {"stable": "1", "canary": "2", "weight": 250}}})
    with pytest.raises(ServingError, match="out of range"):
        render_canary_metrics(paths)


def test_promtool_lints_the_output(tmp_path: Path) -> None:
    paths = _paths(tmp_path, {"iris": {"stable": "1", "canary": "2", "weight": 25.0, "shadow": False},
                              "wine": {"stable": "4", "canary": "5", "shadow": True}})
    text = render_canary_metrics(paths)
    done = subprocess.run([shutil.which("promtool") or "/usr/bin/promtool", "check", "metrics"], input=text,
                          capture_output=True, timeout=60)
    # Prometheus' own text parser and linter: exit 0 (parsed) with no lint findings
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == b""
