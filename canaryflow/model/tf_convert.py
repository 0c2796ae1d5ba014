"""Keras/TensorFlow models logged with ``mlflow.tensorflow``: convert to ONNX and serve through the ONNX path.

In mlflow 3.17 ``mlflow.tensorflow.load_model`` gives back the Keras 3 model itself (e.g. a
``keras.Sequential``; the flavor stores ``data/model.keras``). tf2onnx's ``from_keras`` fails on Keras 3
(FACTS.md), so the model is wrapped in a ``tf.function`` with the signature ``[None, n_features]`` float32 and
converted with ``from_function``. The variants are onnx_fp32 and onnx_int8, judged against TensorFlow's own
outputs with the same parity rule as PyTorch models. TensorFlow is an optional extra and slow to import: it is
imported only inside these functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from canaryflow.core.serving_contract import META_FILE, ServingMeta, output_kind, to_probabilities
from canaryflow.core.settings import OptimizationSettings
from canaryflow.model.optimization import (
    ONNX_FILE,
    Builder,
    OptimizationResult,
    holdout_rows,
    quantize_onnx_bundle,
    quiet_exporters,
    select_variant,
)
from canaryflow.model.packaging import Bundle, InputContract
from canaryflow.model.static_int8 import quantize_onnx_static

TF_VARIANTS = ("onnx_fp32", "onnx_int8")
_PROBABILITY_ACTIVATIONS = {"softmax", "sigmoid"}


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before the first import: silences the C++ banner
    import tensorflow as tf

    return tf


def load_tensorflow(model_dir: Path) -> Any:
    """The Keras model of an MLflow TensorFlow model directory (``mlflow.tensorflow.load_model``)."""
    _tf()
    import mlflow.tensorflow

    return mlflow.tensorflow.load_model(str(model_dir))


def keras_output_kind(model: Any) -> str | None:
    """"probabilities" when the last layer ends in softmax/sigmoid, "logits" when linear, None when unknown."""
    layers = getattr(model, "layers", None) or []
    activation = getattr(layers[-1], "activation", None) if layers else None
    name = getattr(activation, "__name__", None)
    if name in _PROBABILITY_ACTIVATIONS:
        return "probabilities"
    return "logits" if name == "linear" else None


def _first(out: Any) -> Any:
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out[0] if isinstance(out, list | tuple) else out


def tf_predict(model: Any, rows: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """TensorFlow's own outputs on float32 rows (inference mode, in chunks)."""
    tf = _tf()
    parts = [np.asarray(_first(model(tf.constant(rows[i : i + chunk]), training=False)))
             for i in range(0, len(rows), chunk)]
    return np.concatenate(parts).astype(np.float32)


def to_onnx(model: Any, n_features: int, path: Path, opset: int | None = None) -> Path:
    """Convert with ``tf2onnx.convert.from_function`` (dynamic batch, one float32 input named "input")."""
    tf = _tf()
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = [tf.TensorSpec([None, n_features], tf.float32, name="input")]
    fn = tf.function(lambda x: _first(model(x, training=False)), input_signature=spec)
    # Freeze first: tensors the function captures (a Normalization layer's mean and variance, for one) would
    # otherwise become extra graph inputs of the ONNX model.
    frozen = convert_variables_to_constants_v2(fn.get_concrete_function())
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_exporters():
        tf2onnx.convert.from_graph_def(frozen.graph.as_graph_def(), input_names=[t.name for t in frozen.inputs],
                                       output_names=[t.name for t in frozen.outputs], opset=opset,
                                       output_path=str(path))
    return path


def optimize_tensorflow(model: Any, contract: InputContract, holdout: np.ndarray, out_dir: Path, *, name: str,
                        version: str, settings: OptimizationSettings, max_batch_rows: int = 1024,
                        output: str | None = None, class_labels: list[str] | None = None,
                        calibration: np.ndarray | None = None) -> OptimizationResult:
    """Build the ONNX variants of a Keras model under ``out_dir/<variant>/``, check them against TensorFlow on
    the holdout, benchmark them and choose (baseline onnx_fp32). Variants in ``settings.variants`` that are not
    ONNX are not built for TensorFlow models. ``calibration``: rows that set onnx_int8_static's activation ranges
    (the holdout when None)."""
    holdout = holdout_rows(holdout, contract.n_features)
    raw = tf_predict(model, holdout)
    kind = output or keras_output_kind(model) or output_kind(raw, None)

    def onnx_fp32(d: Path) -> Bundle:
        to_onnx(model, contract.n_features, d / ONNX_FILE)
        meta = ServingMeta(model_name=name, model_version=str(version), format="onnx", model_file=ONNX_FILE,
                           n_features=contract.n_features, feature_names=contract.feature_names,
                           input_dtype="float32", output=kind, class_labels=class_labels,
                           max_batch_rows=max_batch_rows)
        meta.save(d / META_FILE)
        return Bundle(d, meta)

    def reference(rows: np.ndarray) -> np.ndarray:
        out = raw if rows is holdout else tf_predict(model, rows)
        return to_probabilities(out, kind)

    builders: dict[str, Builder] = {"onnx_fp32": onnx_fp32}
    if "onnx_int8" in settings.variants:
        builders["onnx_int8"] = lambda d: quantize_onnx_bundle(out_dir / "onnx_fp32", d)
    if "onnx_int8_static" in settings.variants:
        rows = holdout if calibration is None else holdout_rows(calibration, contract.n_features)
        builders["onnx_int8_static"] = lambda d: quantize_onnx_static(out_dir / "onnx_fp32", d, rows)
    return select_variant(builders, reference, holdout, out_dir, settings, baseline="onnx_fp32")
