"""onnx_int8_static: int8 for models MLflow logs the default way (torch.export pt2 graphs), held to the parity gate.

Real libraries (torch.export, torch.onnx, onnxruntime's quantize_static), no servers: the variants are built by
:func:`optimize_pytorch`, judged through the handler exactly as served.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from test_optimization import Outlier  # the int8 weight-scale trap, shared

from canaryflow.core.serving_contract import ServingMeta
from canaryflow.core.settings import OptimizationSettings
from canaryflow.model.optimization import optimize_pytorch
from canaryflow.model.packaging import InputContract
from canaryflow.model.static_int8 import MAX_CALIBRATION_ROWS, calibration_batches
from deployments.handler import CanaryflowHandler

SETTINGS = OptimizationSettings(bench_repeats=10, bench_budget_s=0.5,
                                variants=["torch_fp32", "onnx_int8_static", "torch_int8"])


def exported(model: torch.nn.Module, n_features: int) -> torch.nn.Module:
    """What ``mlflow.pytorch.load_model`` gives for a pt2 model: an exported graph module, no nn.Linear left."""
    dims = ({0: torch.export.Dim("batch", min=1, max=1024)},)
    graph = torch.export.export(model.eval(), (torch.zeros(4, n_features),), dynamic_shapes=dims).module()
    assert not any(isinstance(m, torch.nn.Linear) for m in graph.modules())
    return graph


@pytest.fixture(scope="module")
def cancer_mlp() -> tuple[torch.nn.Module, np.ndarray]:
    """An MLP 30 -> 64 -> 32 -> 2 trained briefly on sklearn's breast-cancer data (standardised, clipped to
    +-3 sd as a feature pipeline would), exported as MLflow 3 does."""
    x, y = load_breast_cancer(return_X_y=True)
    x = np.clip((x - x.mean(0)) / x.std(0), -3, 3).astype(np.float32)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    assert (model(xt).argmax(1) == yt).float().mean() > 0.95
    return exported(model, 30), x


@pytest.fixture(scope="module")
def cancer_result(cancer_mlp, tmp_path_factory: pytest.TempPathFactory):
    graph, x = cancer_mlp
    return optimize_pytorch(graph, InputContract(30, None, "float32"), x, tmp_path_factory.mktemp("static"),
                            name="cancer", version="7", settings=SETTINGS)


def test_static_int8_is_built_for_an_exported_graph_and_passes_parity(cancer_result) -> None:
    rows = {r["variant"]: r for r in cancer_result.table}
    assert list(rows) == ["torch_fp32", "onnx_fp32", "onnx_int8_static", "torch_int8"]  # onnx_fp32: its source
    row = rows["onnx_int8_static"]
    assert row["status"] == "passed", row
    assert row["agreement"] >= SETTINGS.min_argmax_agreement and row["max_abs_diff"] <= SETTINGS.max_abs_diff
    assert 0 < row["max_abs_diff"]  # really quantized: not bit-identical to fp32
    assert row["p50_b1_ms"] > 0 and row["speedup_vs_fp32"] > 0
    # torchao still cannot quantize the graph, and says what does
    assert rows["torch_int8"]["status"] == "error"
    assert "onnx_int8_static quantizes it" in rows["torch_int8"]["reason"]
    assert cancer_result.gate.passed


def test_static_int8_bundle_is_int8_onnx_and_the_handler_serves_what_parity_measured(cancer_mlp,
                                                                                     cancer_result) -> None:
    graph, x = cancer_mlp
    bundle = cancer_result.bundles["onnx_int8_static"]
    assert bundle.meta == ServingMeta.load(bundle.meta_file)
    assert bundle.meta.format == "onnx" and bundle.meta.model_version == "7"
    proto = onnx.load(str(bundle.model_file))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8_weights) == 3  # the three Gemm/MatMul weights, per output channel
    assert sorted(p.name for p in bundle.directory.iterdir()) == ["canaryflow.json", "model.onnx"]
    served = CanaryflowHandler.for_bundle(bundle.directory).probabilities(x)
    with torch.no_grad():
        expected = torch.softmax(graph(torch.from_numpy(x)), -1).numpy()
    row = next(r for r in cancer_result.table if r["variant"] == "onnx_int8_static")
    assert float(np.abs(served - expected).max()) == pytest.approx(row["max_abs_diff"], rel=1e-6, abs=1e-7)
    assert float((served.argmax(1) == expected.argmax(1)).mean()) == pytest.approx(row["agreement"])


def test_static_int8_that_disagrees_is_refused_with_the_measured_reason(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    x[:, 0] = 0.0
    result = optimize_pytorch(exported(Outlier(), 8), InputContract(8, None, "float32"), x, tmp_path,
                              name="outlier", version="1", settings=SETTINGS)
    row = next(r for r in result.table if r["variant"] == "onnx_int8_static")
    assert row["status"] == "failed", row
    assert row["agreement"] < 0.9
    assert f"agreement {row['agreement']:.3f} < 0.990" in row["reason"]
    assert f"onnx_int8_static rejected: agreement {row['agreement']:.3f} < 0.990" in result.gate.reason
    assert not row["chosen"] and result.gate.passed and result.variant in ("torch_fp32", "onnx_fp32")


def test_calibration_rows_set_the_ranges_and_bad_ones_are_refused(cancer_mlp, tmp_path: Path) -> None:
    """Calibrated on rows 100x narrower than what is served, activations clip: the gate measures and refuses it."""
    graph, x = cancer_mlp
    result = optimize_pytorch(graph, InputContract(30, None, "float32"), x, tmp_path, name="cancer", version="8",
                              settings=SETTINGS, calibration=x * 0.01)
    row = next(r for r in result.table if r["variant"] == "onnx_int8_static")
    assert row["status"] == "failed", row
    assert f"max |diff| {row['max_abs_diff']:.4f} > 0.0500" in row["reason"]
    assert "onnx_int8_static rejected: " in result.gate.reason


def test_calibration_batches_respect_a_fixed_batch_program() -> None:
    meta = ServingMeta(model_name="m", model_version="1", format="onnx", model_file="model.onnx", n_features=3)
    rows = np.arange(300, dtype=np.float64).reshape(100, 3)
    batches = calibration_batches(rows, meta)
    assert [len(b) for b in batches] == [64, 36] and all(b.dtype == np.float32 for b in batches)
    fixed = ServingMeta.from_dict(meta.to_dict() | {"fixed_batch": 8})
    assert [len(b) for b in calibration_batches(rows, fixed)] == [8] * 12  # the short tail is dropped
    only = calibration_batches(rows[:3], fixed)  # but a short only batch is padded with its last row
    assert len(only) == 1 and only[0].shape == (8, 3) and (only[0][3:] == rows[2]).all()
    big = calibration_batches(np.zeros((MAX_CALIBRATION_ROWS + 500, 3)), meta)
    assert sum(len(b) for b in big) == MAX_CALIBRATION_ROWS
    with pytest.raises(ValueError, match=r"calibration rows have shape \(4, 2\), expected \(n >= 1, 3\)"):
        calibration_batches(np.zeros((4, 2)), meta)
