"""The batch model call: an ONNX bundle runs on batch scoring's own onnxruntime session and answers exactly what
the TorchServe handler answers for the same rows, in any slicing; other formats go through the handler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from canaryflow.batch.scorer import Scorer, onnx_session
from canaryflow.core.serving_contract import META_FILE
from canaryflow.model.packaging import InputContract, export_module
from deployments.handler import CanaryflowHandler

FEATURES = [f"f{i}" for i in range(4)]


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same network as a torch.export bundle and as an ONNX bundle (as the optimization gate builds them)."""
    root = tmp_path_factory.mktemp("bundles")
    torch.manual_seed(0)
    net = Net().eval()
    rows = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    export_module(net, rows, root / "export", contract=InputContract(4, FEATURES, "float32"), name="scorer",
                  version="1", max_batch_rows=64, class_labels=["a", "b", "c"])
    onnx_dir = root / "onnx"
    onnx_dir.mkdir()
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(net, (torch.from_numpy(rows),), dynamic_shapes={"x": {0: batch}},
                      dynamo=True).save(str(onnx_dir / "model.onnx"))
    meta = json.loads((root / "export" / META_FILE).read_text())
    (onnx_dir / META_FILE).write_text(json.dumps({**meta, "format": "onnx", "model_file": "model.onnx"}))
    return {"export": root / "export", "onnx": onnx_dir}


@pytest.mark.parametrize("step", [1, 7, 1024])
def test_onnx_bundles_answer_what_the_handler_answers_in_any_slicing(bundles: dict[str, Path], step: int) -> None:
    x = np.random.default_rng(1).normal(size=(300, 4)).astype(np.float32)
    scorer = Scorer(str(bundles["onnx"]), score_rows=step, threads=1)
    assert scorer._session is not None and scorer._handler is None  # batch's own session, no torch in the call
    probs = scorer.probabilities(x)
    expected = CanaryflowHandler.for_bundle(bundles["onnx"]).probabilities(x)
    assert probs.dtype == np.float32 and probs.shape == (300, 3)
    np.testing.assert_allclose(probs, expected, rtol=1e-6, atol=1e-7)
    assert scorer.class_labels == ["a", "b", "c"] and scorer.n_classes == 3


def test_torch_export_bundles_go_through_the_handler_within_its_max_batch(bundles: dict[str, Path]) -> None:
    x = np.random.default_rng(2).normal(size=(200, 4)).astype(np.float32)
    scorer = Scorer(str(bundles["export"]), score_rows=1024, threads=1)
    assert scorer._handler is not None and scorer.step == 64  # the program refuses more rows per call
    handler = CanaryflowHandler.for_bundle(bundles["export"])
    expected = np.concatenate([handler.probabilities(x[i:i + 64]) for i in range(0, 200, 64)])
    np.testing.assert_allclose(scorer.probabilities(x), expected, rtol=1e-6)


def test_calls_default_to_the_size_the_optimization_measured(bundles: dict[str, Path]) -> None:
    """Unset score_rows: ONNX 1,024 rows a call (its activations stay in cache), a torch.export program as many
    as it takes; an operator's score_rows never exceeds what the program takes."""
    assert Scorer(str(bundles["onnx"]), threads=1).step == 1024
    assert Scorer(str(bundles["export"]), threads=1).step == 64
    assert Scorer(str(bundles["export"]), score_rows=4096, threads=1).step == 64


def test_no_rows_score_to_an_empty_matrix_with_every_class(bundles: dict[str, Path]) -> None:
    assert Scorer(str(bundles["onnx"])).probabilities(np.zeros((0, 4), np.float32)).shape == (0, 3)


def test_the_batch_session_uses_the_threads_it_is_given_and_no_spinning(bundles: dict[str, Path]) -> None:
    session = onnx_session(str(bundles["onnx"] / "model.onnx"), threads=1)
    options = session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_a_release_with_its_own_batch_variant_ships_it_in_the_archive_and_batch_scores_with_it(
        bundles: dict[str, Path], tmp_path: Path) -> None:
    """The .mar carries the served bundle at its root and the batch variant under batch/ (the handler never
    reads it); batch scoring finds it there and calls it with as many rows as its program takes (batch_rows),
    more than a request may carry (max_batch_rows)."""
    import dataclasses
    import zipfile

    from canaryflow.batch.model import _batch_bundle
    from canaryflow.core.serving_contract import BATCH_DIR, ServingMeta
    from canaryflow.model.packaging import Bundle, archive_files
    from deployments.archive import build_mar

    torch.manual_seed(0)
    rows = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    big, _ = export_module(Net().eval(), rows, tmp_path / "big", contract=InputContract(4, FEATURES, "float32"),
                           name="scorer", version="1", max_batch_rows=256)
    meta = dataclasses.replace(big.meta, max_batch_rows=64, batch_rows=256)
    meta.save(big.meta_file)
    served = Bundle(bundles["onnx"], ServingMeta.load(bundles["onnx"] / META_FILE), batch=Bundle(big.directory, meta))
    (tmp_path / "store").mkdir()
    mar = build_mar(served.model_file, archive_files(served, tmp_path / "extra"), model="scorer", version="1",
                    model_store=tmp_path / "store")
    with zipfile.ZipFile(mar.path) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "unpacked")
    assert {"model.onnx", META_FILE, f"{BATCH_DIR}/{META_FILE}", f"{BATCH_DIR}/model.pt2"} <= names
    assert ServingMeta.load(tmp_path / "unpacked" / META_FILE).format == "onnx"  # what TorchServe serves
    batch_dir = _batch_bundle(tmp_path / "unpacked" / BATCH_DIR)
    scorer = Scorer(str(batch_dir), threads=1)
    assert scorer._handler is not None and scorer.step == 256
    assert Scorer(str(batch_dir), score_rows=100, threads=1).step == 100  # the operator's smaller calls
    x = np.random.default_rng(3).normal(size=(600, 4)).astype(np.float32)
    served_answers = CanaryflowHandler.for_bundle(tmp_path / "unpacked").probabilities(x)
    np.testing.assert_allclose(scorer.probabilities(x), served_answers, atol=1e-5)  # the same network here


def test_a_batch_bundle_naming_a_file_outside_itself_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    from canaryflow.batch.model import _batch_bundle
    from canaryflow.core.errors import BatchError

    batch = tmp_path / "batch"
    batch.mkdir()
    meta = json.loads((bundles["onnx"] / META_FILE).read_text())
    (batch / META_FILE).write_text(json.dumps({**meta, "model_file": "../model.onnx"}))
    with pytest.raises(BatchError, match="is not a file of its bundle"):
        _batch_bundle(batch)
