"""The handler's sample of served rows and its reader (the drift gate's live-traffic input)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from canaryflow.model.datasets import load_traffic
from deployments.handler import TrafficSample


def test_sample_keeps_a_few_rows_per_request_and_rotates(tmp_path: Path) -> None:
    sample = TrafficSample(str(tmp_path / "m.jsonl"), rows_per_request=2, max_bytes=200)
    sample.add([np.arange(6, dtype=np.float32).reshape(3, 2), np.array([[9.0, 9.5]], dtype=np.float32)])
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [[0.0, 1.0], [2.0, 3.0], [9.0, 9.5]]
    for _ in range(30):
        sample.add([np.ones((1, 2), dtype=np.float32)])
    assert (tmp_path / "m.jsonl.1").exists() and (tmp_path / "m.jsonl").stat().st_size <= 200 + 20


def test_sample_follows_a_file_another_worker_rotated_or_someone_removed(tmp_path: Path) -> None:
    """The file stays open between requests: a rotation by another worker (or a removal) is noticed within
    ``check_every`` writes; lines written before that land in the rotated file, none in a lost one."""
    path, rotated = tmp_path / "m.jsonl", tmp_path / "m.jsonl.1"
    worker, other = (TrafficSample(str(path), rows_per_request=1, check_every=4) for _ in range(2))
    worker.add([np.array([[0.0]])])
    other.add([np.array([[1.0]])])
    path.replace(rotated)  # what the other worker's rotation does
    for i in range(2, 6):
        worker.add([np.array([[float(i)]])])
    assert path.read_text().splitlines() == ["[5.0]"]
    assert rotated.read_text().splitlines() == ["[0.0]", "[1.0]", "[2.0]", "[3.0]", "[4.0]"]
    path.unlink()
    for i in range(6, 10):
        worker.add([np.array([[float(i)]])])
    assert path.read_text().splitlines() == ["[9.0]"]  # reopened at the fourth write after its last look
    worker.close()
    worker.add([np.array([[10.0]])])  # closed: opened again on the next request
    assert path.read_text().splitlines() == ["[9.0]", "[10.0]"]


def test_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert TrafficSample.from_env("m") is None
    monkeypatch.setenv(TrafficSample.ENV, str(tmp_path))
    assert TrafficSample.from_env("m").path == str(tmp_path / "m.jsonl")


def test_load_traffic_reads_newest_rows_and_skips_other_widths(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    (tmp_path / "m.jsonl.1").write_text("[1, 2]\n[3, 4]\n")
    path.write_text('[5, 6]\n[7, 8, 9]\n{"cut\n[10, 11]\n')
    frame = load_traffic(path, ["a", "b"], max_rows=3)
    assert frame.to_numpy().tolist() == [[3.0, 4.0], [5.0, 6.0], [10.0, 11.0]]
    assert load_traffic(tmp_path / "none.jsonl", ["a", "b"]).empty


def test_pinned_requests_are_not_sampled(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from canaryflow.core.serving_contract import PINNED_HEADER
    from deployments.handler import CanaryflowHandler
    from deployments.serving_request import marked

    headers = [{"X-Canaryflow-Pinned": "1"}, {"content-type": "application/json"}]
    ctx = SimpleNamespace(get_all_request_header=lambda idx: headers[idx])
    pinned = [marked(ctx, 0, PINNED_HEADER), marked(ctx, 1, PINNED_HEADER), marked(None, 0, PINNED_HEADER)]
    assert pinned == [True, False, False]
    handler = CanaryflowHandler()
    handler.traffic = TrafficSample(str(tmp_path / "m.jsonl"))
    handler.context = ctx
    handler.meta = SimpleNamespace(n_features=2, feature_names=None, max_batch_rows=10, input_dtype="float32")
    handler.device = "cpu"
    handler.preprocess([{"body": {"inputs": [[1.0, 2.0]]}}, {"body": {"inputs": [[3.0, 4.0]]}}])
    assert (tmp_path / "m.jsonl").read_text().splitlines() == ["[3.0, 4.0]"]
