"""The serving contract: what the pipeline writes into a serving bundle, what the handler answers with, and what
the router's log and the metrics read back.

One module, standard library and numpy only (no ``ts``, no torch): it is archived into every .mar next to the
handler (``serving_contract.py`` in the model directory) and imported by the pipeline, the gates, batch scoring
and the metrics from here, at the bottom of the layers (``canaryflow.core``). Everything two sides must agree
on lives here, once:

- :class:`ServingMeta` (``canaryflow.json`` in a bundle) and its checks;
- the score -> probability rule (:func:`output_kind`, :func:`to_probabilities`): one heuristic for the handler,
  the parity and quality gates, local prediction and batch scoring;
- the header names (version pin, prediction summary, the router's pin and replay markers);
- the prediction summary (``X-Prediction``): :func:`prediction_summary` writes it, :func:`parse_prediction`
  reads it back from the router's access log.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any

import numpy as np

META_FILE = "canaryflow.json"
# In a .mar, the bundle batch scoring uses when the optimization found another variant faster for big batches than
# the one served (its own canaryflow.json and model file); TorchServe's handler never loads it.
BATCH_DIR = "batch"
VERSION_HEADER = "X-Model-Version"  # a client pins a version; every answer names the version that gave it
PREDICTION_HEADER = "X-Prediction"  # "<class_index>:<top probability>" per row, for the router's access log
PINNED_HEADER = "x-canaryflow-pinned"  # set by the router when the client pinned a version
PIN_KEY_HEADER = "X-Canaryflow-Pin-Key"  # the pipeline's proof that it may pin (the router checks and strips it)
# Set by the canary's pairwise replay (straight to TorchServe, never through the router, which strips it): the
# rows are live traffic answered again, so they get what live rows get (faults included) but are not sampled twice.
REPLAY_HEADER = "x-canaryflow-replay"
TRAFFIC_DIR_ENV = "CANARYFLOW_TRAFFIC_DIR"  # where the handler samples served rows (and chaos is armed)
PREDICTION_MAX_ROWS = 32
CHAOS_KEYS = ("error_ratio", "latency_ms", "flip", "permute", "armed_by")
FORMATS = ("torch_export", "onnx")

# The handler's live-traffic metrics (deployments/handler.py emits them, deployments/prometheus.py reads them)
LATENCY_METRIC = "canaryflow_request_latency_ms"
BIN_METRIC = f"{LATENCY_METRIC}_bin_total"  # requests whose latency fell in bucket ``le`` and in no smaller one
SUM_METRIC = f"{LATENCY_METRIC}_sum"
ERRORS_METRIC = "canaryflow_request_errors_total"
PREDICTIONS_METRIC = "canaryflow_predictions_total"
LATENCY_BUCKETS_MS = tuple(round(m * 10.0**e, 6) for e in range(-1, 4)
                           for m in (1, 1.2, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 9)) + (10_000.0,)
"""Bucket upper bounds, 0.1 ms to 10 s, neighbours at most 25 % apart: the handler picks one per request, the
metrics source rebuilds samples from them."""
OUTPUTS = ("logits", "probabilities")
INPUT_DTYPES = ("float32", "float64", "float16")


@dataclasses.dataclass(frozen=True)
class ServingMeta:
    """What the handler must know about the model in a serving bundle (``canaryflow.json``)."""

    model_name: str
    model_version: str
    format: str
    model_file: str
    n_features: int
    feature_names: list[str] | None = None
    input_dtype: str = "float32"
    output: str = "logits"
    class_labels: list[str] | None = None
    max_batch_rows: int = 1024
    fixed_batch: int | None = None
    chaos: dict[str, Any] | None = None
    """Fault injection for canary tests, on unpinned requests only (see :class:`Chaos`); None in production."""
    batch_rows: int | None = None
    """Rows per model call in batch scoring, where the program takes more than ``max_batch_rows`` (None: those)."""

    def __post_init__(self) -> None:
        def positive(v: Any) -> bool:
            return type(v) is int and v > 0

        names, labels = self.feature_names, self.class_labels
        checks = [
            (all(isinstance(v, str) and v for v in (self.model_name, self.model_version, self.model_file)),
             "model_name, model_version and model_file must be non-empty strings"),
            (self.format in FORMATS, f"format {self.format!r} not in {FORMATS}"),
            (self.output in OUTPUTS, f"output {self.output!r} not in {OUTPUTS}"),
            (self.input_dtype in INPUT_DTYPES, f"input_dtype {self.input_dtype!r} not in {INPUT_DTYPES}"),
            (positive(self.n_features), "n_features must be a positive int"),
            (positive(self.max_batch_rows), "max_batch_rows must be a positive int"),
            (self.fixed_batch is None or positive(self.fixed_batch), "fixed_batch must be None or positive"),
            (self.batch_rows is None or positive(self.batch_rows), "batch_rows must be None or positive"),
            (names is None or (len(names) == self.n_features and len(set(names)) == len(names)),
             f"feature_names must be None or {self.n_features} distinct names"),
            (labels is None or len(labels) > 0, "class_labels must be None or non-empty"),
        ]
        problems = [message for ok, message in checks if not ok] + _chaos_problems(self.chaos, self.n_features)
        if problems:
            raise ValueError("invalid serving meta: " + "; ".join(problems))

    @functools.cached_property
    def _name_set(self) -> frozenset[str]:
        return frozenset(self.feature_names or ())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingMeta:
        """Build from a dict; unknown keys are an error (they mean pipeline and handler disagree)."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"invalid serving meta: unknown keys {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServingMeta:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ServingMeta:
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())



def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)


def _chaos_problems(chaos: Any, n_features: Any) -> list[str]:
    """What is wrong with a ``chaos`` meta field (None is fine)."""
    if chaos is None:
        return []
    if not isinstance(chaos, dict):
        return [f"chaos must be None or an object with keys {list(CHAOS_KEYS)}"]
    unknown = sorted(set(chaos) - set(CHAOS_KEYS))
    problems = [f"chaos has unknown keys {unknown}"] if unknown else []
    ratio, latency, flip = chaos.get("error_ratio", 0.0), chaos.get("latency_ms", 0), chaos.get("flip")
    if not (_number(ratio) and 0 <= ratio <= 1):
        problems.append("chaos.error_ratio must be a number from 0 to 1")
    if not (_number(latency) and 0 <= latency <= 60_000):
        problems.append("chaos.latency_ms must be a number from 0 to 60000")
    if not isinstance(chaos.get("permute", False), bool):
        problems.append("chaos.permute must be true or false")
    armed = chaos.get("armed_by")
    if armed is not None and not (isinstance(armed, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", armed)):
        problems.append("chaos.armed_by must be 1 to 64 characters of A-Z a-z 0-9 _ -")
    if flip is not None:
        column = flip.get("column") if isinstance(flip, dict) else None
        if not (isinstance(flip, dict) and set(flip) == {"column", "above"} and type(column) is int
                and type(n_features) is int and 0 <= column < n_features and _number(flip["above"])):
            problems.append(f"chaos.flip must be {{\"column\": 0..{n_features}-1, \"above\": number}}")
    return problems



def output_kind(out: np.ndarray, override: str | None = None) -> str:
    """``override`` if given, else "probabilities" when every row of ``out`` looks like a distribution (two or more
    columns, values in [0, 1], rows summing to 1), else "logits"."""
    if override:
        return override
    two_d = out.ndim == 2 and out.shape[1] >= 2
    is_prob = two_d and bool((out >= 0).all() and (out <= 1).all()) and np.allclose(out.sum(axis=1), 1, atol=1e-4)
    return "probabilities" if is_prob else "logits"


def to_probabilities(out: np.ndarray, output: str) -> np.ndarray:
    """Class probabilities (rows, classes) from a model's output: softmax of logits, sigmoid of one logit (as two
    classes), probabilities unchanged. The handler answers with it; every gate and batch scoring use it too."""
    out = np.asarray(out)
    if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
        p = out.reshape(-1)
        p = np.exp(-np.logaddexp(0, -p)) if output == "logits" else p  # sigmoid, no overflow
        probs = np.stack([1 - p, p], axis=1)
    elif out.ndim == 2:
        if output == "logits":
            z = np.exp(out - out.max(axis=1, keepdims=True))
            probs = z / z.sum(axis=1, keepdims=True)
        else:
            probs = out
    else:
        raise ValueError(f"model output has shape {tuple(out.shape)}, expected (rows, classes)")
    if not np.isfinite(probs).all():
        raise ValueError("model produced NaN or infinite outputs")  # json.dumps would emit invalid JSON
    return probs


def prediction_summary(probs: list[list[float]], top: list[int], max_rows: int = PREDICTION_MAX_ROWS) -> str:
    """``"<class_index>:<top probability, 3 decimals>"`` per row, comma-joined, at most ``max_rows`` rows and then
    ``",+N"``: the router logs it (X-Prediction) so the canary analysis sees what each version predicts."""
    parts = [f"{top[r]}:{probs[r][top[r]]:.3f}" for r in range(min(len(top), max_rows))]
    if len(top) > max_rows:
        parts.append(f"+{len(top) - max_rows}")
    return ",".join(parts)



def parse_prediction(summary: str) -> tuple[list[str], list[float], int] | None:
    """``"0:0.973,2:0.511,+3"`` -> (classes, top scores, rows left out); None when empty or malformed."""
    if not summary:
        return None
    classes, scores, more = [], [], 0
    try:
        for part in summary.split(","):
            if part.startswith("+"):
                more = int(part[1:])
                continue
            cls, _, score = part.partition(":")
            if not cls:
                return None
            scores.append(float(score))
            classes.append(cls)
    except ValueError:
        return None
    return classes, scores, more


ONNX_BATCH_ROWS = 1024  # onnxruntime on one thread: 512-1,024-row calls keep the activations in cache (bench/README)


def batch_call_rows(meta: ServingMeta) -> int:
    """Rows per model call in batch scoring: 1,024 for ONNX; as many as a torch.export program takes
    (``batch_rows``, else ``max_batch_rows``). The optimization gate measures batch variants at this size."""
    if meta.format == "onnx":
        return ONNX_BATCH_ROWS
    return meta.batch_rows or meta.max_batch_rows
