"""Serving state a registry user cannot forge (canaryflow.core.seal): a forged champion alias, a forged or edited
canary status, a forged ``released`` status and a swapped batch archive are each refused, logged, and change
nothing. The shared fakes; the e2e test on the real stack is tests/e2e/test_registry_input_e2e.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fakes import FakeLauncher
from test_ramp_ops import NOW, Source, info, released, services, state

from canaryflow.batch import model as batch_model
from canaryflow.core import seal
from canaryflow.core.errors import BatchError, RegistryError
from canaryflow.core.state import Tag
from canaryflow.release import ramp, reconcile, rollback, steps
from deployments.canary import Action, Phase


def test_a_forged_champion_alias_changes_nothing_and_is_reported(tmp_path: Path, caplog) -> None:
    svc = services(tmp_path, {"1": released("1"), "2": info("2", **{Tag.STATUS: "rejected"})},
                   route={"stable": "1"}, registered={"1"}, champion="1")
    svc.registry.aliases["champion"] = "2"  # a registry user points the alias at a rejected version
    with caplog.at_level(logging.WARNING):
        actions = reconcile.reconcile(svc, FakeLauncher(), now=NOW)
    assert svc.router.table["m"] == {"stable": "1"} and svc.backend.registered == {"1"}  # v2 never re-registered
    assert any("alias 'champion' names v2 but the pipeline's champion is v1" in a for a in actions), actions
    assert "alias 'champion' names v2" in caplog.text
    assert steps.begin(svc, "m", "2").champion == "1"  # a release compares with the sealed champion


def test_a_forged_champion_seal_is_refused(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": released("1"), "2": info("2")}, champion="1")
    record = json.loads(svc.registry.model_tag[Tag.CHAMPION_SEAL])
    svc.registry.model_tag[Tag.CHAMPION_SEAL] = json.dumps({**record, "version": "2"})  # same seal, other version
    assert seal.trusted_champion(svc.registry, svc.paths, "m") is None
    assert reconcile.desired_route(svc, "m", list(svc.registry.versions.values())) is None  # nothing acted on


def test_a_forged_canary_status_is_not_acted_on_and_the_ramp_goes_on(tmp_path: Path, caplog) -> None:
    svc = services(tmp_path, {"1": released("1"), "2": info("2")}, champion="1")
    st = state(svc, tmp_path)
    status = ramp.start_or_resume(svc, st)
    forged = json.loads(svc.registry.versions["2"].tags[Tag.CANARY])
    forged.update(phase="promoted", weight=100.0)  # the attack from the issue: "promoted at 100%"
    svc.registry.versions["2"].tags[Tag.CANARY] = json.dumps(forged)
    with caplog.at_level(logging.WARNING):
        assert ramp.load_status(svc, "m", "2") is None
        assert reconcile.desired_route(svc, "m", list(svc.registry.versions.values())).canary is None
        d = ramp.analyse(svc, st, status, source=Source(), now=status.started_at + 30)
    assert "its seal does not verify" in caplog.text
    assert d.action is Action.ADVANCE and d.status.weight == 50.0  # judged on evidence, not on the forged tag
    assert svc.router.table["m"]["canary"] == "2" and svc.registry.aliases["champion"] == "1"
    assert ramp.load_status(svc, "m", "2").phase is Phase.PROGRESSING  # the real status, sealed, is back


def test_rollback_refuses_a_version_whose_released_status_was_forged(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": info("1", **{Tag.STATUS: "rejected"}), "2": released("2")},
                   route={"stable": "2"}, champion="2")
    svc.registry.versions["1"].tags[Tag.STATUS] = "released"  # forged
    svc.registry.aliases["previous"] = "1"  # forged
    with pytest.raises(RegistryError, match="never made champion by the pipeline"):
        rollback.rollback(svc, "m", None, "looks fine to me", "mallory")
    assert svc.router.table["m"] == {"stable": "2"} and svc.registry.aliases["champion"] == "2"


def test_batch_scores_only_the_archive_the_pipeline_sealed(tmp_path: Path) -> None:
    svc = services(tmp_path, {"1": released("1")}, champion="1")
    bundle = tmp_path / "bundle"
    (bundle / "download" / "torchserve").mkdir(parents=True)
    mar = bundle / "download" / "torchserve" / "m.mar"
    mar.write_bytes((svc.paths.model_store / "m_v1.mar").read_bytes())  # what the release run holds
    sha = batch_model._check_archive(svc.registry, "m", "1", bundle, svc.paths, None)
    assert batch_model._check_archive(svc.registry, "m", "1", bundle, None, sha) == sha  # a worker: same sha
    mar.write_bytes(b"another model, same run tag")
    with pytest.raises(BatchError, match="never made champion by the pipeline with this archive"):
        batch_model._check_archive(svc.registry, "m", "1", bundle, svc.paths, None)
    with pytest.raises(BatchError, match="is not the checked"):
        batch_model._check_archive(svc.registry, "m", "1", bundle, None, sha)


def test_a_configured_seal_key_file_is_shared_read_only_and_never_created(tmp_path: Path) -> None:
    """On Kubernetes every flow run is a pod with its own state dir: the key comes from one mounted Secret
    (settings.seal_key_file), so what one run sealed verifies in another, and nothing is written beside it."""
    from canaryflow.core.errors import ConfigError
    from canaryflow.core.paths import StatePaths
    from canaryflow.core.settings import Settings

    key = tmp_path / "secret" / "seal_key"
    key.parent.mkdir()
    key.write_text("k" * 44 + "\n")
    key.chmod(0o400)
    one = StatePaths.of(Settings(state_dir=tmp_path / "pod-1", seal_key_file=key))
    other = StatePaths.of(Settings(state_dir=tmp_path / "pod-2", seal_key_file=key))
    sealed = seal.seal_json(one, "m", "2", json.dumps({"phase": "ramp"}, sort_keys=True))
    assert seal.open_json(other, "m", "2", sealed) == json.dumps({"phase": "ramp"}, sort_keys=True)
    assert not (tmp_path / "pod-1").exists() and not (tmp_path / "pod-2").exists()  # no key generated per pod
    stack_key = StatePaths(tmp_path / "pod-3")  # the local default: a key of the stack's own, which differs
    assert seal.open_json(stack_key, "m", "2", sealed) is None

    with pytest.raises(ConfigError, match="does not exist.*canaryflow k8s init"):
        seal.mac(StatePaths(tmp_path / "s", tmp_path / "missing"), "canary", "m")
    key.chmod(0o644)
    key.write_text("x" * 44)  # a new file state: read again, and refused
    with pytest.raises(ConfigError, match="readable by others"):
        seal.mac(one, "canary", "m")
    key.chmod(0o600)
    key.write_text("short")
    with pytest.raises(ConfigError, match="at least 32"):
        seal.mac(one, "canary", "m")
