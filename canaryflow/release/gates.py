"""The release gates as steps: each measures the candidate, records a GateResult, raises GateFailed on a no.

Order in the flow: contract -> (package: shape) -> data -> drift -> quality -> optimization -> (stage) -> load
test. The pure measurements live in validation/ and deployments/loadtest.py; this module feeds them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from canaryflow.core.errors import RegistryError
from canaryflow.core.settings import ServingConfig
from canaryflow.core.state import Tag
from canaryflow.model.datasets import ReleaseData, load_release_data, load_traffic
from canaryflow.model.optimization import from_sandbox, markdown, write_reports
from canaryflow.model.packaging import Bundle, input_contract, labels_from_tag
from canaryflow.model.static_int8 import MAX_CALIBRATION_ROWS as CALIBRATION_ROWS
from canaryflow.release.calibration import choose_peer
from canaryflow.release.steps import ReleaseState
from canaryflow.release.tuning import tune_serving
from canaryflow.services import Services
from deployments.loadtest import run_load_test
from deployments.torchserve import archive_name
from validation.contract import check_contract
from validation.data import build_suite, check_data
from validation.drift import check_drift
from validation.loadtest import gate_load_test, retry_gate, settle_busy, verdict
from validation.quality import check_cross_holdouts, check_quality
from validation.results import GateResult, Outcome


def _dir(st: ReleaseState, gate: str) -> Path:
    path = st.workdir / "gates" / gate
    path.mkdir(parents=True, exist_ok=True)
    return path


def contract(svc: Services, st: ReleaseState, model_dir: Path) -> GateResult:
    """The candidate's signature against the champion's: a breaking change needs the policy's consent."""
    from mlflow.models import Model

    candidate = Model.load(str(model_dir)).signature
    champion = None
    if st.champion and st.champion != st.version:
        champion = svc.registry.model_meta(st.model, st.champion, st.workdir / "champion-meta").signature
    return st.record(check_contract(candidate, champion, st.policy.gates.allow_contract_change))


def data(svc: Services, st: ReleaseState, model_dir: Path) -> ReleaseData:
    """Load the reference/holdout convention and gate the holdout on expectations derived from the reference."""
    c = input_contract(model_dir)
    try:
        release_data = load_release_data(svc.settings.mlflow_uri, st.info.run_id, st.workdir / "data",
                                         st.policy.gates.label_column, c.feature_names, c.n_features)
    except RegistryError as exc:
        st.record(GateResult("data", Outcome.FAILED, str(exc)))  # raises GateFailed
        raise
    suite = build_suite(release_data.reference, release_data.feature_columns)
    st.record(check_data(release_data.holdout, suite, st.policy.gates.data_max_failed_ratio, _dir(st, "data")))
    return release_data


def drift(svc: Services, st: ReleaseState, release_data: ReleaseData) -> GateResult:
    """Drift between the training reference and the holdout, and, once the model has served enough requests,
    between the reference and recent live traffic (gate ``drift_traffic``): a candidate trained on data that
    no longer looks like what production receives is refused."""
    g, cols = st.policy.gates, release_data.feature_columns
    result = st.record(check_drift(release_data.reference, release_data.holdout, cols, g.drift_max_share,
                                   _dir(st, "drift"), g.drift_stattest_threshold))
    # distinct rows: a row served a thousand times is one input, and repeats would give K-S a power it has not
    traffic = load_traffic(svc.paths.traffic_dir / f"{st.model}.jsonl", cols).drop_duplicates()
    if len(traffic) >= g.drift_min_traffic_rows:
        live = check_drift(release_data.reference, traffic, cols, g.drift_max_share, _dir(st, "drift_traffic"),
                           g.drift_stattest_threshold)
        st.record(dataclasses.replace(live, gate="drift_traffic",
                                      reason=f"live traffic, {len(traffic)} distinct sampled rows: {live.reason}"))
    return result


def quality(svc: Services, st: ReleaseState, model_dir: Path, release_data: ReleaseData) -> GateResult:
    """Candidate vs champion on the candidate's holdout (the first release: an absolute floor only), then
    (gate ``quality_cross``) both on the champion's holdout and the operator's evaluation set, so a holdout
    that contradicts the others (labels flipped upstream) is caught offline."""
    g = st.policy.gates
    champion_predict: Callable[[np.ndarray], np.ndarray] | None = None
    if st.champion and st.champion != st.version:
        champion_dir = svc.registry.download(st.model, st.champion, st.workdir / "champion-model")
        champion_predict = st.model_code().predictor(champion_dir)
    candidate_predict = st.model_code().predictor(model_dir)
    result = st.record(check_quality(candidate_predict, champion_predict, release_data.holdout,
                                     release_data.feature_columns, release_data.label_column, g.quality_metric,
                                     g.quality_min, g.quality_max_abs_drop, g.quality_max_rel_drop,
                                     _dir(st, "quality")))
    if champion_predict is not None:
        sets = {f"v{st.version}'s holdout": release_data.holdout, **_other_sets(svc, st, release_data)}
        st.record(check_cross_holdouts(candidate_predict, champion_predict, sets, release_data.feature_columns,
                                       release_data.label_column, g.quality_metric, g.quality_max_contradiction,
                                       g.quality_max_abs_drop, g.quality_max_rel_drop, g.quality_min))
    return result


def _other_sets(svc: Services, st: ReleaseState, release_data: ReleaseData) -> dict[str, pd.DataFrame]:
    """The champion's holdout (from its training run) and the operator's evaluation set, where there are."""
    out: dict[str, pd.DataFrame] = {}
    champion = svc.registry.get_version(st.model, str(st.champion))
    if champion.run_id and champion.run_id != st.info.run_id:
        try:
            data = load_release_data(svc.settings.mlflow_uri, champion.run_id, st.workdir / "champion-data",
                                     release_data.label_column, release_data.feature_columns,
                                     len(release_data.feature_columns))
            out[f"champion v{st.champion}'s holdout"] = data.holdout
        except RegistryError as exc:  # an older champion without the convention: nothing to cross-check
            st.notes.append(f"quality_cross: champion v{st.champion}'s holdout not available: {exc}")
    if svc.settings.gates.evaluation_set:  # operator-owned: from the stack's settings, never a model's policy
        out["operator's evaluation set"] = pd.read_parquet(svc.settings.gates.evaluation_set)
    return out


def optimize(svc: Services, st: ReleaseState, model_dir: Path, release_data: ReleaseData) -> Bundle:
    """Build the serving variants, hold each to the fp32 reference on the holdout, keep the fastest that agrees.

    The variant table goes to the release run (optimization/) whatever the outcome.
    """
    from mlflow.models import Model

    flavors = Model.load(str(model_dir)).flavors  # MLmodel is YAML: reading it runs nothing of the model's
    if not {"pytorch", "tensorflow", "keras"} & set(flavors):
        st.record(GateResult("optimization", Outcome.FAILED, f"flavors {sorted(flavors)}: canaryflow serves "
                                                               "pytorch and tensorflow models"))
        raise AssertionError("record raises on a failed gate")
    kwargs = {"name": st.model, "version": st.version, "settings": st.policy.optimization.model_dump(),
              "max_batch_rows": svc.settings.serving.max_batch_rows, "output": st.info.tags.get(Tag.OUTPUT),
              "class_labels": labels_from_tag(st.info.tags.get(Tag.CLASS_LABELS))}
    # Static int8 is calibrated on the reference (training) rows, parity is measured on the holdout: calibrating
    # on the rows it is judged on would flatter it. The sandbox gets both in one array, the reference rows last.
    holdout = release_data.features(release_data.holdout)
    calibration = release_data.features(release_data.reference)[:CALIBRATION_ROWS]
    kwargs["calibration_rows"] = len(calibration)
    result = from_sandbox(*st.model_code().optimize(
        model_dir, dataclasses.asdict(input_contract(model_dir)), np.concatenate([holdout, calibration]),
        st.workdir / "variants", kwargs))
    files = write_reports(result, _dir(st, "optimization"))
    svc.registry.log_to_run(st.run_id, files=list(files), artifact_path="optimization",
                            params={"serving_variant": result.variant or "none",
                                    "batch_variant": result.batch_variant or "none"})
    st.variant = result.variant or ""
    st.notes.append("## Optimization\n\n" + markdown(result.table))
    st.record(result.gate)
    assert result.serving is not None  # a passed gate always has a chosen variant
    return result.serving


def tune(svc: Services, st: ReleaseState, rows: np.ndarray) -> None:
    """Serving settings chosen by measurement on the staged candidate (:mod:`canaryflow.release.tuning`); the
    table goes to the release run and the notes."""
    archive = svc.paths.model_store / archive_name(st.model, st.version)
    tuning = tune_serving(svc.backend, ServingConfig.of(svc.settings.serving), svc.settings.router_url, st.model,
                          st.version, archive, rows, st.policy.loadtest, _dir(st, "load_test") / "tuning",
                          pin=svc.router.pin_credentials())
    if tuning is None:
        return
    c = tuning.chosen
    svc.registry.log_to_run(st.run_id, files=[_dir(st, "load_test") / "tuning" / "tuning.json"],
                            artifact_path="load_test", params={"serving_workers": c.workers,
                                                               "serving_batch_size": c.batch_size,
                                                               "serving_max_batch_delay_ms": c.max_batch_delay_ms})
    st.notes.append(f"## Serving settings (measured)\n\n{tuning.reason}\n\n{tuning.markdown()}")


def load_test(svc: Services, st: ReleaseState, rows: np.ndarray,
              sleep: Callable[[float], None] = time.sleep) -> GateResult:
    """locust against the staged candidate through the router (version pinned) and, in the same run, against a
    peer (the champion, or the stack's calibration model on a first release), so a busy machine is not taken for
    a slow model. An inconclusive (busy) or unmeasurable run, and a speed failure until a second measurement
    agrees, is repeated up to ``attempts`` times (validation.loadtest.retry_gate); every attempt's reason goes to
    the release notes, the verdict of all of them is recorded."""
    cfg = st.policy.loadtest
    tune(svc, st, rows)
    peer = choose_peer(svc, st.model, st.champion, st.version, rows)

    def measure(attempt: int) -> GateResult:
        result = run_load_test(svc.settings.router_url, st.model, st.version, rows, cfg,
                               _dir(st, "load_test") / f"attempt-{attempt}", peer=peer,
                               pin=svc.router.pin_credentials())
        return gate_load_test(result, cfg)

    tried = retry_gate(measure, cfg.attempts, cfg.retry_pause_s, sleep)
    if len(tried) > 1:
        st.notes.append("## Load test attempts\n\n" + "\n".join(
            f"{i}. {r.outcome.value}: {r.reason}" for i, r in enumerate(tried, 1)))
    return st.record(settle_busy(verdict(tried), len(tried), cfg))
