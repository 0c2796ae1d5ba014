"""Keras model logged with mlflow.tensorflow -> ONNX (tf2onnx) -> parity with TensorFlow -> served by the handler."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from ts.context import Context, RequestProcessor

from canaryflow.core.settings import OptimizationSettings
from canaryflow.model.packaging import input_contract
from canaryflow.model.tf_convert import keras_output_kind, load_tensorflow, optimize_tensorflow, tf_predict
from deployments.handler import CanaryflowHandler

N_FEATURES = 5


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A tiny Keras MLP (5 -> 8 -> 3, softmax) trained a little and saved with mlflow.tensorflow (no server)."""
    import keras
    import mlflow.tensorflow

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, N_FEATURES)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    model = keras.Sequential([keras.Input((N_FEATURES,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=3, verbose=0)
    model_dir = tmp_path_factory.mktemp("tf") / "model"
    # pip_requirements given: inferring them would import-scan the environment for seconds
    mlflow.tensorflow.save_model(model, str(model_dir), input_example=x[:4], pip_requirements=["tensorflow-cpu"])
    return model_dir, x


@pytest.fixture(scope="module")
def result(logged, tmp_path_factory: pytest.TempPathFactory):
    model_dir, x = logged
    model = load_tensorflow(model_dir)
    return optimize_tensorflow(model, input_contract(model_dir), x, tmp_path_factory.mktemp("variants"),
                               name="keras", version="2", settings=OptimizationSettings(bench_repeats=10),
                               class_labels=["a", "b", "c"])


def test_mlflow_loads_the_keras_model_itself(logged) -> None:
    import keras

    model = load_tensorflow(logged[0])
    assert isinstance(model, keras.Model)
    assert keras_output_kind(model) == "probabilities"
    assert input_contract(logged[0]).n_features == N_FEATURES
    assert tf_predict(model, logged[1][:7]).shape == (7, 3)


def test_onnx_variants_checked_against_tensorflow(result) -> None:
    rows = {r["variant"]: r for r in result.table}
    assert list(rows) == ["onnx_fp32", "onnx_int8", "onnx_int8_static"]  # the ONNX ones of the default variants
    fp32 = rows["onnx_fp32"]
    assert fp32["status"] == "passed" and fp32["agreement"] == 1.0 and fp32["max_abs_diff"] < 1e-5
    assert fp32["speedup_vs_fp32"] == 1.0
    for int8 in ("onnx_int8", "onnx_int8_static"):
        assert rows[int8]["status"] in ("passed", "failed") and rows[int8]["agreement"] is not None
    assert result.gate.passed and result.variant in rows
    assert result.chosen.meta.format == "onnx" and result.chosen.meta.output == "probabilities"


def test_onnx_variant_served_through_the_handler(result, logged) -> None:
    model_dir, x = logged
    bundle = result.bundles["onnx_fp32"]
    context = Context("keras", str(bundle.directory), {"model": {"modelName": "keras"}}, 1, None, "0.12.0",
                      metrics=mock.MagicMock(), model_yaml_config={})
    handler = CanaryflowHandler()
    try:
        handler.initialize(context)
        context.request_processor = [RequestProcessor({})]
        [response] = handler.handle([{"body": json.dumps({"inputs": x[:6].tolist()}).encode()}], context)
    finally:
        gc.unfreeze()
    served = np.array([p["probabilities"] for p in response["predictions"]])
    expected = tf_predict(load_tensorflow(model_dir), x[:6])
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert [p["class"] for p in response["predictions"]] == [["a", "b", "c"][i] for i in expected.argmax(1)]
    assert response["model_version"] == "2"


def test_normalization_layer_constants_are_frozen_into_the_graph(tmp_path: Path) -> None:
    """A Keras Normalization layer's captured mean/variance must not become extra ONNX inputs."""
    import onnxruntime as ort
    import tensorflow as tf

    from canaryflow.model.tf_convert import to_onnx

    x = np.random.default_rng(0).random((50, 30)).astype("float32")
    model = tf.keras.Sequential([tf.keras.Input(shape=(30,)),
                                 tf.keras.layers.Normalization(mean=x.mean(0), variance=x.var(0) + 1e-3),
                                 tf.keras.layers.Dense(2)])
    session = ort.InferenceSession(str(to_onnx(model, 30, tmp_path / "m.onnx")))
    assert len(session.get_inputs()) == 1
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert np.abs(got - model(x).numpy()).max() < 1e-4
