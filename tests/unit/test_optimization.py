"""Serving variants on real libraries (torch.export, torch.onnx, onnxruntime, torchao): parity, bench, choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer

from canaryflow.core.serving_contract import ServingMeta
from canaryflow.core.settings import OptimizationSettings
from canaryflow.model.optimization import BATCH_ROWS, COLUMNS, _choose, _choose_batch, optimize_pytorch, write_reports
from canaryflow.model.packaging import InputContract
from deployments.handler import CanaryflowHandler

SETTINGS = OptimizationSettings(bench_repeats=10)
ALL = ["torch_fp32", "onnx_fp32", "onnx_int8", "onnx_int8_static", "torch_int8", "torch_bf16"]


@pytest.fixture(scope="module")
def cancer() -> tuple[torch.nn.Module, np.ndarray]:
    """An MLP 30 -> 64 -> 2 trained briefly on sklearn's bundled breast-cancer data (standardised)."""
    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    assert (model(xt).argmax(1) == yt).float().mean() > 0.95
    return model, x


@pytest.fixture(scope="module")
def cancer_result(cancer, tmp_path_factory: pytest.TempPathFactory):
    model, x = cancer
    return optimize_pytorch(model, InputContract(30, None, "float32"), x, tmp_path_factory.mktemp("variants"),
                            name="cancer", version="3", settings=SETTINGS)


class Outlier(torch.nn.Module):
    """Linear 8 -> 2 deciding on x1 - x2, plus a weight of +-1000 on feature 0, which is always 0 in the data.

    fp32 ignores feature 0; int8 weight scales (per tensor in onnxruntime, per output row in torchao) are set by
    the outlier, so the informative weights of size 1 round to 0 and every row gets the same logits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 2)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()
            self.linear.weight[1, 1:3] = torch.tensor([1.0, -1.0])
            self.linear.weight[0, 1:3] = torch.tensor([-1.0, 1.0])
            self.linear.weight[:, 0] = torch.tensor([1000.0, -1000.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_all_variants_built_measured_and_one_chosen(cancer_result) -> None:
    result = cancer_result
    assert [r["variant"] for r in result.table] == ALL
    for row in result.table:
        assert set(COLUMNS) <= set(row), row
        assert row["status"] in ("passed", "failed"), row  # every variant built and loaded in the handler
        assert all(row[c] is not None for c in COLUMNS), row
        assert 0 < row["p50_b1_ms"] <= row["p95_b1_ms"]
        assert row["reason"]
    rows = {r["variant"]: r for r in result.table}
    for exact in ("torch_fp32", "onnx_fp32"):
        assert rows[exact]["status"] == "passed"
        assert rows[exact]["agreement"] == 1.0 and rows[exact]["max_abs_diff"] < 1e-5
    assert rows["torch_fp32"]["speedup_vs_fp32"] == 1.0
    assert result.gate.gate == "optimization" and result.gate.passed
    assert result.variant in rows and rows[result.variant]["status"] == "passed" and rows[result.variant]["chosen"]
    assert result.gate.reason.startswith(f"chose {result.variant}")
    assert result.chosen is not None and result.chosen.meta.format == (
        "onnx" if result.variant.startswith("onnx") else "torch_export")
    assert set(result.bundles) == set(ALL)
    assert result.gate.thresholds["min_argmax_agreement"] == SETTINGS.min_argmax_agreement


def test_choice_follows_the_rule(cancer_result) -> None:
    ok = [r for r in cancer_result.table if r["status"] == "passed"]
    fastest = min(ok, key=lambda r: r["p50_b1_ms"])
    base = next(r for r in ok if r["variant"] == "torch_fp32")
    worth_it = base["p50_b1_ms"] / fastest["p50_b1_ms"] >= SETTINGS.min_speedup
    assert cancer_result.variant == (fastest["variant"] if worth_it else "torch_fp32")


def test_rule_prefers_the_baseline_unless_clearly_faster() -> None:
    def row(variant: str, ms: float, status: str = "passed") -> dict:
        return {"variant": variant, "status": status, "p50_b1_ms": ms}

    assert _choose([row("torch_fp32", 1.0), row("onnx_fp32", 0.97)], "torch_fp32", 1.05)[0] == "torch_fp32"
    chosen, why = _choose([row("torch_fp32", 1.0), row("onnx_fp32", 0.32)], "torch_fp32", 1.05)
    assert (chosen, why) == ("onnx_fp32", "chose onnx_fp32: 3.1x faster than torch_fp32 at batch 1")
    assert _choose([row("torch_fp32", 1.0), row("onnx_int8", 0.1, "failed")], "torch_fp32", 1.05)[0] == "torch_fp32"
    assert _choose([row("torch_fp32", 1.0, "error")], "torch_fp32", 1.05)[0] is None


def test_chosen_bundle_serves_what_parity_measured(cancer, cancer_result) -> None:
    model, x = cancer
    bundle = cancer_result.chosen
    assert ServingMeta.load(bundle.meta_file) == bundle.meta
    served = CanaryflowHandler.for_bundle(bundle.directory).probabilities(x)
    expected = torch.softmax(model(torch.from_numpy(x)), -1).detach().numpy()
    assert (served.argmax(1) == expected.argmax(1)).mean() >= SETTINGS.min_argmax_agreement
    assert np.abs(served - expected).max() <= SETTINGS.max_abs_diff


def test_reports_written_as_json_and_markdown(cancer_result, tmp_path: Path) -> None:
    js, md = write_reports(cancer_result, tmp_path / "reports")
    data = json.loads(js.read_text())
    assert data["chosen"] == cancer_result.variant and len(data["table"]) == len(ALL)
    assert data["batch_chosen"] == cancer_result.batch_variant
    assert data["gate"]["gate"] == "optimization" and data["gate"]["outcome"] == "passed"
    text = md.read_text()
    assert text.startswith("| " + " | ".join(COLUMNS) + " |")
    assert f"**{cancer_result.variant}** (chosen" in text and all(v in text for v in ALL)
    assert f"**{cancer_result.batch_variant}** (" in text and "batch)" in text


def test_batch_choice_follows_the_rule(cancer_result) -> None:
    """Batch scoring gets the passing variant with the most rows/s at big batches when it beats the served one
    by min_batch_speedup; otherwise the served one. Every variant was measured at a big batch."""
    rows = {r["variant"]: r for r in cancer_result.table}
    for row in rows.values():
        assert 1 <= row["batch_rows"] <= BATCH_ROWS and row["batch_rows_per_s"] > 0, row
    served = rows[cancer_result.variant]
    best = max((r for r in rows.values() if r["status"] == "passed"), key=lambda r: r["batch_rows_per_s"])
    worth_it = best["batch_rows_per_s"] >= SETTINGS.min_batch_speedup * served["batch_rows_per_s"]
    assert cancer_result.batch_variant == (best["variant"] if worth_it else cancer_result.variant)
    assert [r["variant"] for r in rows.values() if r["batch_chosen"]] == [cancer_result.batch_variant]
    assert cancer_result.gate.measured["batch_chosen"] == cancer_result.batch_variant
    serving = cancer_result.serving
    assert serving.directory == cancer_result.chosen.directory
    assert serving.batch == (None if cancer_result.batch_variant == cancer_result.variant
                             else cancer_result.bundles[cancer_result.batch_variant])


def test_bf16_variant_takes_big_batches_and_is_held_to_parity(cancer, cancer_result) -> None:
    """torch_bf16: float32 in and out, bf16 inside; its program takes batch scoring's calls (batch_rows), more
    than a request may carry (max_batch_rows), and it answers like the fp32 model within the parity bounds."""
    model, x = cancer
    row = next(r for r in cancer_result.table if r["variant"] == "torch_bf16")
    assert row["status"] == "passed" and 0 < row["max_abs_diff"] <= SETTINGS.max_abs_diff, row
    bundle = cancer_result.bundles["torch_bf16"]
    assert bundle.meta.format == "torch_export" and bundle.meta.batch_rows == BATCH_ROWS
    assert bundle.meta.max_batch_rows == 1024
    handler = CanaryflowHandler.for_bundle(bundle.directory)
    big = np.resize(x, (BATCH_ROWS, x.shape[1]))
    got = handler.probabilities(big)
    expected = torch.softmax(model(torch.from_numpy(big)), -1).detach().numpy()
    assert got.dtype == np.float32 and got.shape == (BATCH_ROWS, 2)
    assert np.abs(got - expected).max() <= SETTINGS.max_abs_diff


def test_batch_rule_keeps_the_served_variant_unless_clearly_faster() -> None:
    def row(v: str, rps: float | None, status: str = "passed") -> dict:
        return {"variant": v, "status": status, "batch_rows": 4096, "batch_rows_per_s": rps}

    table = [row("onnx_fp32", 800_000), row("torch_bf16", 1_500_000), row("onnx_int8", 3_000_000, "failed")]
    chosen, why = _choose_batch(table, "onnx_fp32", 1.25)
    assert chosen == "torch_bf16" and why == "batch scoring uses torch_bf16: 1.9x the rows/s of onnx_fp32 at " \
                                            "4096 rows per call"
    assert _choose_batch(table, "onnx_fp32", 2.0) == ("onnx_fp32", "")  # 1.9x < 2x: not worth a second copy
    assert _choose_batch([row("onnx_fp32", 800_000)], "onnx_fp32", 1.25) == ("onnx_fp32", "")
    assert _choose_batch(table, None, 1.25) == (None, "")  # nothing passed: no batch variant either


def test_int8_variants_that_disagree_are_rejected_with_the_measured_agreement(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    x[:, 0] = 0.0
    result = optimize_pytorch(Outlier().eval(), InputContract(8, None, "float32"), x, tmp_path, name="outlier",
                              version="1", settings=SETTINGS)
    rows = {r["variant"]: r for r in result.table}
    for variant in ("onnx_int8", "torch_int8"):
        row = rows[variant]
        assert row["status"] == "failed", row
        assert row["agreement"] < 0.9
        assert f"agreement {row['agreement']:.3f} < 0.990" in row["reason"]
        assert f"{variant} rejected: agreement {row['agreement']:.3f} < 0.990" in result.gate.reason
    assert result.gate.passed and result.variant in ("torch_fp32", "onnx_fp32")
    assert rows["torch_fp32"]["agreement"] == rows["onnx_fp32"]["agreement"] == 1.0


def test_a_variant_that_cannot_be_built_is_an_error_not_a_failed_release(tmp_path: Path) -> None:
    """An MLflow pt2 model loads as an exported graph: torchao finds no Linear layer to quantize."""
    x = np.random.default_rng(1).normal(size=(64, 8)).astype(np.float32)
    dims = ({0: torch.export.Dim("batch", min=1, max=1024)},)
    graph = torch.export.export(Outlier().eval(), (torch.from_numpy(x[:4]),), dynamic_shapes=dims).module()
    settings = SETTINGS.model_copy(update={"variants": ["torch_fp32", "torch_int8", "bogus"]})
    result = optimize_pytorch(graph, InputContract(8, None, "float32"), x, tmp_path, name="g", version="1",
                              settings=settings)
    rows = {r["variant"]: r for r in result.table}
    assert list(rows) == ["torch_fp32", "torch_int8", "bogus"]
    assert rows["torch_int8"]["status"] == "error" and "no torch.nn.Linear layers" in rows["torch_int8"]["reason"]
    assert rows["bogus"] == rows["bogus"] | {"status": "error", "reason": "unknown variant"}
    assert result.gate.passed and result.variant == "torch_fp32"
    assert "torch_int8 error: RuntimeError: no torch.nn.Linear layers" in result.gate.reason


def test_holdout_of_the_wrong_width_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"holdout has shape \(4, 3\), expected \(n >= 1, 8\)"):
        optimize_pytorch(Outlier(), InputContract(8, None, "float32"), np.zeros((4, 3)), tmp_path, name="o",
                         version="1", settings=SETTINGS)
