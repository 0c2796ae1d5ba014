"""Serving variants of a model (torch.export fp32 and bf16, ONNX fp32, ONNX int8 dynamic and static, torchao
int8), their parity with the fp32 reference, a micro-benchmark, and the choice of the fastest variant that answers
like the reference: at batch 1 for serving, and at big batches for batch scoring (the same variant, or another one
that the .mar carries beside it, see :data:`serving_contract.BATCH_DIR`).

Pure: no Prefect, no servers. Every variant is a bundle directory the TorchServe handler serves as is, and
parity and latency are measured through that handler (:meth:`CanaryflowHandler.for_bundle`), so what is
checked here is what will be served. TensorFlow models come in through :mod:`canaryflow.tf_convert`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from canaryflow.core.serving_contract import (
    META_FILE,
    ServingMeta,
    batch_call_rows,
    output_kind,
    to_probabilities,
)
from canaryflow.core.settings import OptimizationSettings
from canaryflow.model.packaging import MIN_EXAMPLE_ROWS, Bundle, InputContract, cast_module, export_module
from canaryflow.model.static_int8 import quantize_onnx_static
from deployments.handler import CanaryflowHandler
from validation.parity import parity
from validation.results import GateResult, Outcome, judged

TORCH_VARIANTS = ("torch_fp32", "onnx_fp32", "onnx_int8", "onnx_int8_static", "torch_int8", "torch_bf16")
ONNX_DERIVED = ("onnx_int8", "onnx_int8_static")  # built from the onnx_fp32 bundle
ONNX_FILE = "model.onnx"
BENCH_BATCHES = (1, 64)
# Batch scoring's model calls (measured by bench_batch): torch_bf16's program takes this many rows a call; a
# model whose call would take longer than BATCH_CALL_S (from its batch-64 latency) is measured on fewer rows.
BATCH_ROWS = 4096
BATCH_CALL_S = 0.1
COLUMNS = ("variant", "status", "agreement", "max_abs_diff", "p50_b1_ms", "p95_b1_ms", "p50_b64_ms",
           "batch_rows", "batch_rows_per_s", "speedup_vs_fp32", "reason")

Builder = Callable[[Path], Bundle]  # builds one variant into the given (empty) directory


@dataclass(frozen=True)
class OptimizationResult:
    """The chosen bundle (None when no variant passed), one table row per variant, and the gate verdict."""

    chosen: Bundle | None
    variant: str | None
    table: list[dict[str, Any]]
    gate: GateResult
    bundles: dict[str, Bundle] = field(default_factory=dict)
    batch_variant: str | None = None  # what batch scoring uses: ``variant`` or a faster one at big batches

    @property
    def serving(self) -> Bundle | None:
        """The chosen bundle, carrying the batch variant's bundle when that is another one."""
        if self.chosen is None or self.batch_variant in (None, self.variant):
            return self.chosen
        return dataclasses.replace(self.chosen, batch=self.bundles[str(self.batch_variant)])


def optimize_pytorch(model: Any, contract: InputContract, holdout: np.ndarray, out_dir: Path, *, name: str,
                     version: str, settings: OptimizationSettings, max_batch_rows: int = 1024,
                     output: str | None = None, class_labels: list[str] | None = None,
                     calibration: np.ndarray | None = None) -> OptimizationResult:
    """Build the variants in ``settings.variants`` of a loaded torch module under ``out_dir/<variant>/`` and choose.

    ``holdout`` holds float32 rows (n, n_features). torch_fp32 is always built: it is the baseline of speed and
    the program the ONNX variants are exported from. ``calibration``: rows that set onnx_int8_static's
    activation ranges (the reference data, where the caller has it); the holdout when None.
    """
    import torch

    holdout = holdout_rows(holdout, contract.n_features)
    example = np.resize(holdout, (max(MIN_EXAMPLE_ROWS, min(len(holdout), 16)), contract.n_features))
    state: dict[str, Any] = {}

    def torch_fp32(d: Path) -> Bundle:
        bundle, state["program"] = export_module(model, example, d, contract=contract, name=name, version=version,
                                                 max_batch_rows=max_batch_rows, output=output,
                                                 class_labels=class_labels)
        state["meta"] = bundle.meta
        return bundle

    def onnx_fp32(d: Path) -> Bundle:
        if "program" not in state:
            raise RuntimeError("needs the torch_fp32 export, which failed")
        d.mkdir(parents=True, exist_ok=True)
        with quiet_exporters():
            torch.onnx.export(state["program"], dynamo=True).save(str(d / ONNX_FILE))
        return _write_meta(d, state["meta"], format="onnx", model_file=ONNX_FILE)

    def torch_int8(d: Path) -> Bundle:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        if "meta" not in state:
            raise RuntimeError("needs the torch_fp32 export, which failed")
        if not isinstance(model, torch.nn.Module) or not any(
                isinstance(m, torch.nn.Linear) for m in model.modules()):
            raise RuntimeError("no torch.nn.Linear layers to quantize (an MLflow pt2 model loads as an exported "
                               "graph; onnx_int8_static quantizes it, or log it pickled)")
        quantized = copy.deepcopy(model)
        with quiet_exporters():
            quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
        fixed = state["meta"].fixed_batch
        x = torch.from_numpy(example[:fixed] if fixed else example)
        dims = None if fixed else ({0: torch.export.Dim("batch", min=1, max=max(max_batch_rows, 2))},)
        d.mkdir(parents=True, exist_ok=True)
        # The loaded .pt2 imports torchao by itself: the serving environment needs torchao installed.
        torch.export.save(torch.export.export(quantized, (x,), dynamic_shapes=dims), str(d / "model.pt2"))
        return _write_meta(d, state["meta"], model_file="model.pt2")

    def torch_bf16(d: Path) -> Bundle:
        # bfloat16 weights and activations, float32 in and out: on CPUs with AMX or AVX512-BF16 oneDNN's bf16
        # matmuls run several times faster than fp32 at big batches (slower at batch 1: the measurement decides)
        if "meta" not in state:
            raise RuntimeError("needs the torch_fp32 export, which failed")
        meta = state["meta"]
        if meta.fixed_batch:
            raise RuntimeError("a fixed-batch program: nothing for bf16 to gain at batch scoring")
        rows = max(max_batch_rows, BATCH_ROWS)
        half = cast_module(copy.deepcopy(model), torch.bfloat16)
        program = torch.export.export(half, (torch.from_numpy(example),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=rows)},))
        d.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(d / "model.pt2"))
        return _write_meta(d, meta, model_file="model.pt2", batch_rows=rows)

    def onnx_int8_static(d: Path) -> Bundle:
        rows = holdout if calibration is None else holdout_rows(calibration, contract.n_features)
        with quiet_exporters():
            return quantize_onnx_static(out_dir / "onnx_fp32", d, rows)

    def reference(rows: np.ndarray) -> np.ndarray:
        step = state["meta"].fixed_batch if "meta" in state else None
        x = torch.from_numpy(rows)
        with torch.no_grad():
            out = torch.cat([_first(model(c)) for c in (x.split(step) if step else [x])]).float()
        kind = state["meta"].output if "meta" in state else output_kind(out.numpy(), output)
        return to_probabilities(out.numpy(), kind)

    builders: dict[str, Builder] = {"torch_fp32": torch_fp32, "onnx_fp32": onnx_fp32,
                                    "onnx_int8": lambda d: quantize_onnx_bundle(out_dir / "onnx_fp32", d),
                                    "onnx_int8_static": onnx_int8_static, "torch_int8": torch_int8,
                                    "torch_bf16": torch_bf16}
    if set(ONNX_DERIVED) & set(settings.variants) and "onnx_fp32" not in settings.variants:
        settings = settings.model_copy(update={"variants": [*settings.variants, "onnx_fp32"]})
    wanted = ["torch_fp32", *(v for v in TORCH_VARIANTS[1:] if v in settings.variants)]
    unknown = [v for v in settings.variants if v not in TORCH_VARIANTS]
    return select_variant({v: builders[v] for v in wanted}, reference, holdout, out_dir, settings,
                          baseline="torch_fp32", unknown=unknown)


def quantize_onnx_bundle(fp32_dir: Path, out_dir: Path) -> Bundle:
    """onnxruntime dynamic int8 quantization of an ONNX bundle (MatMul/Gemm only; see FACTS.md)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not (fp32_dir / META_FILE).exists():
        raise RuntimeError(f"needs the onnx_fp32 bundle, which was not built ({fp32_dir})")
    meta = ServingMeta.load(fp32_dir / META_FILE)
    proto = onnx.load(str(fp32_dir / meta.model_file))
    del proto.graph.value_info[:]  # stale dynamo shape annotations make quantize_dynamic's inference fail
    out_dir.mkdir(parents=True, exist_ok=True)
    cleaned = out_dir / "fp32-cleaned.onnx"
    onnx.save(proto, str(cleaned))
    with quiet_exporters():
        quantize_dynamic(str(cleaned), str(out_dir / ONNX_FILE), op_types_to_quantize=["MatMul", "Gemm"],
                         weight_type=QuantType.QInt8)
    cleaned.unlink()
    return _write_meta(out_dir, meta, model_file=ONNX_FILE)


def select_variant(builders: dict[str, Builder], reference: Callable[[np.ndarray], np.ndarray],
                   holdout: np.ndarray, out_dir: Path, settings: OptimizationSettings, *, baseline: str,
                   unknown: list[str] | None = None) -> OptimizationResult:
    """Build each variant (in order; a builder may use an earlier one), check parity with ``reference``
    (probabilities as served) on the holdout, benchmark the passing ones, and choose."""
    rows: list[dict[str, Any]] = []
    bundles: dict[str, Bundle] = {}
    expected: np.ndarray | None = None
    for variant, build in builders.items():
        row = dict.fromkeys(COLUMNS) | {"variant": variant}
        rows.append(row)
        shutil.rmtree(out_dir / variant, ignore_errors=True)  # never judge a stale file of an earlier run
        try:
            bundle = build(out_dir / variant)
            if expected is None:  # after the first build: the reference may need the export's meta
                expected = reference(holdout)
            with _single_thread():
                handler = CanaryflowHandler.for_bundle(bundle.directory)
                got = np.concatenate([handler.probabilities(c) for c in _chunks(holdout, bundle.meta)])
                row |= parity(got, expected, settings)
                row |= bench(handler, holdout, settings.bench_repeats, settings.bench_budget_s)
            bundles[variant] = bundle
        except Exception as exc:  # one broken variant must not fail the release
            row |= {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:400]}
    rows += [dict.fromkeys(COLUMNS) | {"variant": v, "status": "error", "reason": "unknown variant"}
             for v in unknown or []]
    base = next((r for r in rows if r["variant"] == baseline and r["p50_b1_ms"]), None)
    for row in rows:
        if base and row["p50_b1_ms"]:
            row["speedup_vs_fp32"] = round(base["p50_b1_ms"] / row["p50_b1_ms"], 3)
    chosen, why = _choose(rows, baseline, settings.min_speedup)
    batch_variant, batch_why = _choose_batch(rows, chosen, settings.min_batch_speedup)
    for row in rows:
        row["chosen"] = row["variant"] == chosen
        row["batch_chosen"] = row["variant"] == batch_variant
    rejected = [f"{r['variant']} {'rejected' if r['status'] == 'failed' else 'error'}: {r['reason']}"
                for r in rows if r["status"] != "passed"]
    measured = {"chosen": chosen, "batch_chosen": batch_variant,
                "variants": {r["variant"]: {k: r[k] for k in COLUMNS[1:]} for r in rows}}
    thresholds = {"min_argmax_agreement": settings.min_argmax_agreement, "max_abs_diff": settings.max_abs_diff,
                  "min_speedup": settings.min_speedup, "min_batch_speedup": settings.min_batch_speedup}
    gate = judged("optimization", chosen is not None, "; ".join(filter(None, [why, batch_why, *rejected])),
                  measured, thresholds)
    return OptimizationResult(bundles.get(chosen) if chosen else None, chosen, rows, gate, bundles, batch_variant)


def _choose(rows: list[dict[str, Any]], baseline: str, min_speedup: float) -> tuple[str | None, str]:
    ok = [r for r in rows if r["status"] == "passed"]
    if not ok:
        return None, "no variant passed parity"
    fastest = min(ok, key=lambda r: r["p50_b1_ms"])
    base = next((r for r in ok if r["variant"] == baseline), None)
    if base is None:
        return fastest["variant"], f"chose {fastest['variant']}: fastest passing variant ({baseline} did not pass)"
    if fastest is base:
        return baseline, f"chose {baseline}: fastest at batch 1 ({base['p50_b1_ms']:.3f} ms)"
    speedup = base["p50_b1_ms"] / fastest["p50_b1_ms"]
    if speedup < min_speedup:
        return baseline, (f"chose {baseline}: {fastest['variant']} only {speedup:.2f}x faster at batch 1 "
                          f"(< {min_speedup:.2f}x)")
    return fastest["variant"], f"chose {fastest['variant']}: {speedup:.1f}x faster than {baseline} at batch 1"


def _choose_batch(rows: list[dict[str, Any]], chosen: str | None, min_gain: float) -> tuple[str | None, str]:
    """The variant batch scoring uses: the served one, unless a passing variant scores ``min_gain`` times its
    rows per second at big batches (then the .mar carries both)."""
    served = next((r for r in rows if r["variant"] == chosen and r["batch_rows_per_s"]), None)
    ok = [r for r in rows if r["status"] == "passed" and r["batch_rows_per_s"]]
    best = max(ok, key=lambda r: r["batch_rows_per_s"], default=None)
    if served is None or best is None or best is served:
        return chosen, ""
    gain = best["batch_rows_per_s"] / served["batch_rows_per_s"]
    if gain < min_gain:
        return chosen, ""
    return best["variant"], (f"batch scoring uses {best['variant']}: {gain:.1f}x the rows/s of {chosen} at "
                             f"{best['batch_rows']} rows per call")


def bench(handler: CanaryflowHandler, holdout: np.ndarray, repeats: int, budget_s: float = 3.0) -> dict[str, float]:
    """Median and p95 latency (ms) of the handler's inference at batch 1 and 64, after a warm-up, and the rows
    per second of batch scoring's model calls (:func:`bench_batch`).

    At most ``repeats`` runs and about ``budget_s`` seconds per batch size (at least 5 runs), so a slow model
    costs the release seconds, not minutes.
    """
    out: dict[str, float] = {}
    for batch in BENCH_BATCHES:
        rows = np.resize(holdout, (batch, holdout.shape[1]))
        deadline = time.perf_counter() + budget_s / 4
        for _ in range(max(5, repeats // 10)):
            handler.probabilities(rows)
            if time.perf_counter() > deadline:
                break
        times_list: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times_list) < repeats and (len(times_list) < 5 or time.perf_counter() < deadline):
            start = time.perf_counter()
            handler.probabilities(rows)
            times_list.append(time.perf_counter() - start)
        times = np.asarray(times_list)
        out[f"p50_b{batch}_ms"] = round(float(np.median(times)) * 1e3, 4)
        if batch == 1:
            out["p95_b1_ms"] = round(float(np.percentile(times, 95)) * 1e3, 4)
    return out | bench_batch(handler, holdout, out["p50_b64_ms"] / 1e3 / 64, max(3, repeats // 20), budget_s / 3)


def bench_batch(handler: CanaryflowHandler, holdout: np.ndarray, row_s: float, calls: int,
                budget_s: float) -> dict[str, float]:
    """Rows per second of calls as batch scoring makes them (:func:`serving_contract.batch_call_rows`: ONNX 1,024
    rows, a torch.export program as many as it takes), fewer when the batch-64 latency (``row_s`` a row) says such
    a call would take over :data:`BATCH_CALL_S`. One warm-up call, then ``calls`` calls, fewer past ``budget_s``
    (at least 3)."""
    n = max(1, min(batch_call_rows(handler.meta), int(BATCH_CALL_S / max(row_s, 1e-9))))
    rows = np.ascontiguousarray(np.resize(holdout, (n, holdout.shape[1])))
    handler.probabilities(rows)
    done, start = 0, time.perf_counter()
    while done < 3 or (done < calls and time.perf_counter() < start + budget_s):
        handler.probabilities(rows)
        done += 1
    return {"batch_rows": n, "batch_rows_per_s": round(n * done / (time.perf_counter() - start))}


def markdown(table: list[dict[str, Any]]) -> str:
    """The variant table as markdown (for the Prefect artifact and the release run)."""
    def cell(v: Any) -> str:
        text = "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in table:
        roles = [r for r, key in (("chosen", "chosen"), ("batch", "batch_chosen")) if row.get(key)]
        name = f"**{row['variant']}** ({', '.join(roles)})" if roles else row["variant"]
        lines.append("| " + " | ".join(cell(name if c == "variant" else row.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def from_sandbox(head: dict[str, Any], dirs: dict[str, Path]) -> OptimizationResult:
    """The result of :func:`optimize_pytorch` / ``optimize_tensorflow`` run in the sandbox, rebuilt from its JSON
    report and the variant directories copied out of it; each bundle's ``canaryflow.json`` is validated again and
    must name a file inside its own directory."""
    bundles: dict[str, Bundle] = {}
    for variant, directory in dirs.items():
        try:
            bundles[variant] = Bundle.load(directory)
        except ValueError as exc:
            raise ValueError(f"variant {variant}: {exc}") from exc
    g = head["gate"]
    gate = GateResult(str(g["gate"]), Outcome(g["outcome"]), str(g["reason"]), dict(g.get("measured") or {}),
                      dict(g.get("thresholds") or {}))
    variant, batch = head.get("variant"), head.get("batch_variant")
    table = [dict(row) for row in head.get("table", [])]
    if gate.passed and variant not in bundles:
        raise ValueError(f"the optimization chose {variant!r} but did not build it")
    if gate.passed and batch is not None and batch not in bundles:
        raise ValueError(f"the optimization chose {batch!r} for batch scoring but did not build it")
    return OptimizationResult(bundles.get(variant) if variant else None, variant, table, gate, bundles,
                              batch if gate.passed else None)


def write_reports(result: OptimizationResult, directory: Path) -> tuple[Path, Path]:
    """Write ``optimization.json`` (table, choice, gate) and ``optimization.md`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    js, md = directory / "optimization.json", directory / "optimization.md"
    js.write_text(json.dumps({"chosen": result.variant, "batch_chosen": result.batch_variant, "table": result.table,
                              "gate": result.gate.to_dict()}, indent=2))
    md.write_text(f"{markdown(result.table)}\n\n{result.gate.outcome.value}: {result.gate.reason}\n")
    return js, md


def _write_meta(d: Path, meta: ServingMeta, **change: Any) -> Bundle:
    new = ServingMeta.from_dict(meta.to_dict() | change)
    new.save(d / META_FILE)
    return Bundle(d, new)


def holdout_rows(holdout: np.ndarray, n_features: int) -> np.ndarray:
    """The holdout as contiguous float32 (n, n_features) rows; anything else is a ValueError."""
    rows = np.ascontiguousarray(holdout, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != n_features or len(rows) == 0:
        raise ValueError(f"holdout has shape {rows.shape}, expected (n >= 1, {n_features})")
    return rows


def _chunks(rows: np.ndarray, meta: ServingMeta) -> list[np.ndarray]:
    return [rows[i : i + meta.max_batch_rows] for i in range(0, len(rows), meta.max_batch_rows)]


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple | list) else out


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """One torch thread (and so one ORT intra-op thread in the handler), as workers run with OMP_NUM_THREADS=1."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """Silence the exporters' progress chatter and advice on the root logger while they run."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
