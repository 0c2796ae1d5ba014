"""ONNX static int8 quantization of a serving bundle, calibrated on real rows (variant ``onnx_int8_static``).

Works on any model the torch_fp32 export accepts, MLflow's pt2 graphs included (torchao's ``torch_int8`` needs
``nn.Linear`` modules, which an exported graph no longer has): the ONNX program is quantized, not the module.
Activation ranges come from a MinMax pass of onnxruntime over calibration rows (the release's holdout, or rows
the caller passes); weights are int8 per output channel. Only the weighted ops (MatMul, Gemm, Conv) are
quantized, as QDQ pairs that onnxruntime fuses into int8 kernels; the result is an ordinary "onnx" bundle the
handler serves as is, and the parity gate judges it like every other variant.

PT2E (torchao.quantization.pt2e with X86InductorQuantizer, torch 2.13 + torchao 0.18) was measured too: the
converted program runs its quantize/dequantize ops eagerly (5x slower than fp32 on a 20-256-256-2 MLP) and its
.pt2 needs the ``quantized_decomposed`` ops registered before ``torch.export.load``; it pays only once lowered by
Inductor/AOTInductor, a serving format the handler does not have.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from canaryflow.core.serving_contract import META_FILE, ServingMeta
from canaryflow.model.packaging import Bundle

ONNX_FILE = "model.onnx"
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
CALIBRATION_BATCH = 64
MAX_CALIBRATION_ROWS = 2048  # MinMax needs coverage, not volume; this bounds the release's time


def calibration_batches(rows: np.ndarray, meta: ServingMeta, batch: int = CALIBRATION_BATCH) -> list[np.ndarray]:
    """The calibration rows in batches the program accepts: of ``meta.fixed_batch`` rows exactly when it has one
    (a short last batch is dropped, unless it is the only one: then it is padded with its last row)."""
    rows = np.ascontiguousarray(rows[:MAX_CALIBRATION_ROWS], dtype=meta.input_dtype)
    if rows.ndim != 2 or rows.shape[1] != meta.n_features or len(rows) == 0:
        raise ValueError(f"calibration rows have shape {rows.shape}, expected (n >= 1, {meta.n_features})")
    step = meta.fixed_batch or min(batch, meta.max_batch_rows)
    out = [rows[i : i + step] for i in range(0, len(rows), step)]
    if meta.fixed_batch and len(out[-1]) < step:
        last = out.pop()
        if not out:
            out.append(np.concatenate([last, np.repeat(last[-1:], step - len(last), axis=0)]))
    return out


class _Reader:
    """onnxruntime's CalibrationDataReader over prepared batches (``get_next`` until None; its ABC's subclass
    hook accepts any class with ``get_next``, so onnxruntime is not imported before it is needed)."""

    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter([{input_name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed


def quantize_onnx_static(fp32_dir: Path, out_dir: Path, rows: np.ndarray) -> Bundle:
    """Static int8 quantization of the ONNX bundle in ``fp32_dir`` into ``out_dir``, calibrated on ``rows``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not (fp32_dir / META_FILE).exists():
        raise RuntimeError(f"needs the onnx_fp32 bundle, which was not built ({fp32_dir})")
    meta = ServingMeta.load(fp32_dir / META_FILE)
    proto = onnx.load(str(fp32_dir / meta.model_file))
    if len(proto.graph.input) != 1:
        raise RuntimeError(f"ONNX model has {len(proto.graph.input)} inputs, expected one")
    del proto.graph.value_info[:]  # stale dynamo shape annotations break the quantizer's shape inference
    out_dir.mkdir(parents=True, exist_ok=True)
    cleaned = out_dir / "fp32-cleaned.onnx"
    onnx.save(proto, str(cleaned))
    reader = _Reader(proto.graph.input[0].name, calibration_batches(rows, meta))
    try:
        quantize_static(str(cleaned), str(out_dir / ONNX_FILE), reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        cleaned.unlink(missing_ok=True)
    new = ServingMeta.from_dict(meta.to_dict() | {"format": "onnx", "model_file": ONNX_FILE})
    new.save(out_dir / META_FILE)
    return Bundle(out_dir, new)
