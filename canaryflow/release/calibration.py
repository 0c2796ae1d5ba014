"""The load-test gate's peer: the champion, or for a first release the stack's own calibration model.

A load test alone cannot tell a slow model from a busy machine. The gate therefore loads a peer in the same locust
run. With a champion serving, the champion is the peer (same contract, same rows). A first release has none, so the
stack owns a tiny model per input width, ``canaryflow-calibration`` version ``n<width>``: a seeded
``Linear(width, 2)``, packaged and served exactly like a released model (export -> .mar -> TorchServe), so its
latency is the serving path's own cost on this machine at this moment. It is built the first time a width needs it
and reused afterwards; it is not in the MLflow registry, so reconcile and rollback never see it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from canaryflow.core.errors import ServingError
from canaryflow.model.packaging import Bundle, InputContract, export_module
from canaryflow.services import Services
from deployments.archive import build_mar
from deployments.loadtest import Peer
from deployments.smoke import smoke_test

CALIBRATION_MODEL = "canaryflow-calibration"
_SEED = 0


def calibration_version(n_features: int) -> str:
    """The calibration model's TorchServe version for an input width (never a number: MLflow versions are)."""
    return f"n{n_features}"


def build_calibration(n_features: int, out_dir: Path, max_batch_rows: int) -> Bundle:
    """Export the seeded ``Linear(n_features, 2)`` as a serving bundle (as canaryflow.packaging does for models)."""
    import torch

    torch.manual_seed(_SEED)
    module = torch.nn.Linear(n_features, 2).eval()
    rows = np.random.default_rng(_SEED).normal(size=(4, n_features))
    bundle, _ = export_module(module, rows, out_dir, contract=InputContract(n_features, None, "float32"),
                              name=CALIBRATION_MODEL, version=calibration_version(n_features),
                              max_batch_rows=max_batch_rows, output="logits")
    return bundle


def ensure_calibration(svc: Services, n_features: int) -> str:
    """Register the calibration model for ``n_features`` on the serving backend unless it is there, and warm it
    up through the router like a staged candidate (a cold worker's first answers would make a quiet machine look
    busy); returns its version. Idempotent and safe to race: an existing .mar is reused, a second registration
    is a no-op.
    """
    version = calibration_version(n_features)
    if version in svc.backend.versions(CALIBRATION_MODEL):
        return version
    svc.paths.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=svc.paths.work_dir, prefix=".calibration-") as tmp:
        bundle = build_calibration(n_features, Path(tmp), svc.settings.serving.max_batch_rows)
        mar = build_mar(bundle.model_file, [bundle.meta_file], model=CALIBRATION_MODEL, version=version,
                        model_store=svc.paths.model_store)
    if svc.backend.register(CALIBRATION_MODEL, version, mar.path):
        rows = np.random.default_rng(_SEED).normal(size=(4, n_features))
        warm = smoke_test(svc.settings.router_url, CALIBRATION_MODEL, version, rows,
                          warmup=svc.settings.serving.warmup_requests, pin=svc.router.pin_credentials())
        if not warm.passed:
            raise ServingError(f"calibration model v{version} registered but not answering: {warm.reason}")
    return version


def choose_peer(svc: Services, model: str, champion: str | None, candidate: str, rows: np.ndarray) -> Peer:
    """The champion when it serves (and is not the candidate itself), else the calibration model for the rows'
    width. Never raises: a peer that cannot be had is a Peer with ``error``, and the gate judges without it."""
    rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    if champion and champion != candidate:
        try:
            if champion in svc.backend.versions(model):
                return Peer("champion", model, champion, rows)
        except Exception:  # the backend's view is only a preference here; the calibration model may still do
            pass
    try:
        version = ensure_calibration(svc, int(rows.shape[1]))
    except Exception as exc:  # a missing peer weakens the gate, it must not fail the release
        return Peer("calibration", CALIBRATION_MODEL, calibration_version(int(rows.shape[1])), rows,
                    error=f"the calibration model could not be served: {type(exc).__name__}: {exc}"[:500])
    return Peer("calibration", CALIBRATION_MODEL, version, rows)
