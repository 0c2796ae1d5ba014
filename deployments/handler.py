"""TorchServe handler for canaryflow serving bundles.

It is copied into the .mar and runs in TorchServe's Python worker, so it imports only the standard library,
numpy, torch and ``ts`` (and onnxruntime, lazily, for the "onnx" format). The release pipeline imports it for
:class:`ServingMeta`, the contract between the bundle it writes and this handler.

TorchServe 0.12 calls the module-level :func:`handle`: its class entry point demands exactly one class in the
module, and this one defines two. Keep server-side batching off (batch_size 1): a bad request fails the whole
batch TorchServe grouped it into.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import random
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.export.passes import move_to_device_pass
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

META_FILE = "canaryflow.json"
VERSION_HEADER = "X-Model-Version"
PREDICTION_HEADER = "X-Prediction"  # "<class_index>:<top probability>" per row, for the router's access log
PREDICTION_MAX_ROWS = 32
CHAOS_KEYS = ("error_ratio", "latency_ms", "flip", "permute", "armed_by")
CHAOS_ERROR = "chaos: injected error"
FORMATS = ("torch_export", "onnx")
OUTPUTS = ("logits", "probabilities")
INPUT_DTYPES = ("float32", "float64", "float16")
_REPR_MAX = 40

Batch = tuple[torch.Tensor, list[int]]  # all rows of a TorchServe batch, and how many rows each request sent


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


def prediction_summary(probs: list[list[float]], top: list[int], max_rows: int = PREDICTION_MAX_ROWS) -> str:
    """``"<class_index>:<top probability, 3 decimals>"`` per row, comma-joined, at most ``max_rows`` rows and then
    ``",+N"``: the router logs it (X-Prediction) so the canary analysis sees what each version predicts."""
    parts = [f"{top[r]}:{probs[r][top[r]]:.3f}" for r in range(min(len(top), max_rows))]
    if len(top) > max_rows:
        parts.append(f"+{len(top) - max_rows}")
    return ",".join(parts)


class Chaos:
    """Injected faults, to show that the canary analysis catches a bad version. Applied per unpinned request:

    - ``error_ratio``: that share of requests answers HTTP 500 ``chaos: injected error`` (the worker lives on);
    - ``latency_ms``: each request is delayed that long;
    - ``flip`` ``{"column": j, "above": v}``: rows with feature j > v get their probability vector reversed;
    - ``permute``: every row's probability vector is rolled by one class;
    - ``armed_by`` NAME: the faults apply only while ``<traffic dir>/chaos-armed-NAME`` exists (a test arms a
      fault at a chosen moment, e.g. after promotion).
    """

    def __init__(self, spec: dict[str, Any], seed: int | None = None) -> None:
        self.error_ratio = float(spec.get("error_ratio", 0.0))
        self.latency_s = float(spec.get("latency_ms", 0)) / 1000
        self.flip = spec.get("flip")
        self.permute = bool(spec.get("permute", False))
        self.rng = random.Random(seed)
        armed_by = re.sub(r"[^A-Za-z0-9_-]", "", str(spec.get("armed_by") or ""))[:64]
        directory = os.environ.get(TrafficSample.ENV)
        self.armed_file = os.path.join(directory, f"chaos-armed-{armed_by}") if armed_by and directory else None

    def active(self) -> bool:
        return self.armed_file is None or os.path.exists(self.armed_file)

    def delay(self, live: int) -> None:
        if self.latency_s and live:
            time.sleep(self.latency_s * live)

    def fails(self) -> bool:
        return self.error_ratio > 0 and self.rng.random() < self.error_ratio

    def distort(self, probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``probs`` (rows, classes) of one live request after flip and permute."""
        if self.flip is not None:
            hit = rows[:, self.flip["column"]].to(probs.device) > self.flip["above"]
            probs = torch.where(hit.unsqueeze(1), probs.flip(1), probs)
        if self.permute:
            probs = probs.roll(1, dims=1)
        return probs


def _bad(message: str) -> PredictionException:
    return PredictionException(message, 400)


def _short(value: Any, limit: int = _REPR_MAX) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number" if isinstance(value, int | float) else type(value).__name__)


def _column(j: int, names: list[str] | None) -> str:
    return f"{j} ({names[j]!r})" if names else str(j)


def decode_body(request: dict[str, Any]) -> list[Any]:
    """The rows of one request, from whichever form TorchServe delivered its body in.

    TorchServe json-decodes the body only for Content-Type exactly ``application/json`` (bytes forwarded when
    that fails), utf-8-decodes ``text/*`` to str, and passes anything else as bytearray.
    """
    key = next((k for k in ("body", "data") if k in request), None)
    if key is None:
        raise _bad("empty request: no body")
    body = request[key]
    if isinstance(body, bytes | bytearray | str):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, deep nesting
            raise _bad(f"malformed JSON body: {str(e)[:120]}") from None
    if not isinstance(body, dict):
        raise _bad(f"body must be a JSON object with 'inputs' or 'instances', got {_json_type(body)}")
    keys = [k for k in ("inputs", "instances") if k in body]
    if len(keys) != 1:
        found = "both" if keys else f"neither (keys: {_short(sorted(body))})"
        raise _bad(f"body must have one of 'inputs' or 'instances', found {found}")
    rows = body[keys[0]]
    if not isinstance(rows, list):
        raise _bad(f"'{keys[0]}' must be a list of rows, got {_json_type(rows)}")
    if not rows:
        raise _bad(f"'{keys[0]}' is empty: send at least one row")
    return rows


def rows_to_array(rows: list[Any], meta: ServingMeta) -> np.ndarray:
    """Validate rows (lists, or objects keyed by feature name) and return an (n, n_features) array."""
    if len(rows) > meta.max_batch_rows:
        raise _bad(f"{len(rows)} rows in one request, more than the limit of {meta.max_batch_rows}")
    names, n = meta.feature_names, meta.n_features
    matrix = []
    for i, row in enumerate(rows):
        if isinstance(row, dict) and names:
            missing = [name for name in names if name not in row]
            unknown = [key for key in row if key not in meta._name_set]
            if missing or unknown:
                found = (f"{what} features {_short(keys, 200)}" for what, keys in
                         (("missing", missing), ("unknown", unknown)) if keys)
                raise _bad(f"row {i}: " + ", ".join(found))
            row = [row[name] for name in names]
        elif not isinstance(row, list):
            keyed = " or an object keyed by feature name" if names else " (this model has no feature names)"
            raise _bad(f"row {i} must be a list of {n} numbers{keyed}, got {_json_type(row)}")
        elif len(row) != n:
            raise _bad(f"row {i} has {len(row)} values, expected {n}")
        for j, v in enumerate(row):
            if type(v) is not float and type(v) is not int:  # bool subclasses int: refuse it too
                why = " (booleans are refused)" if isinstance(v, bool) else ""
                raise _bad(f"row {i}, column {_column(j, names)}: {_short(v)} is not a number{why}")
        matrix.append(row)
    dtype = np.dtype(meta.input_dtype)
    with np.errstate(over="ignore"):
        try:
            array = np.asarray(matrix, dtype=dtype)
            if np.isfinite(array).all():
                return array
        except OverflowError:  # an int too large even for float64
            pass
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                try:
                    finite = bool(np.isfinite(dtype.type(v)))
                except OverflowError:
                    finite = False
                if not finite:
                    raise _bad(f"row {i}, column {_column(j, names)}: {_short(v)} is not a finite "
                               f"{dtype} value (NaN, infinity or out of range)")
    raise AssertionError("unreachable: a non-finite value was detected but not located")


def to_probabilities(out: torch.Tensor, output: str) -> torch.Tensor:
    """Class probabilities (rows, classes) from a model's output: softmax of logits, sigmoid of one logit
    (as two classes), probabilities unchanged. The release pipeline's parity checks use this very function."""
    if out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1):
        p = out.reshape(-1)
        p = torch.sigmoid(p) if output == "logits" else p
        probs = torch.stack([1 - p, p], dim=1)
    elif out.dim() == 2:
        probs = torch.softmax(out, dim=-1) if output == "logits" else out
    else:
        raise ValueError(f"model output has shape {tuple(out.shape)}, expected (rows, classes)")
    if not torch.isfinite(probs).all():
        raise ValueError("model produced NaN or infinite outputs")  # json.dumps would emit invalid JSON
    return probs


def _onnx_model(path: str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort  # only the "onnx" format needs it

    options = ort.SessionOptions()
    # One intra-op thread per worker under OMP_NUM_THREADS=1 (FACTS.md): follow torch's setting, which honours it.
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    session = ort.InferenceSession(path, options, providers=providers)
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"ONNX model has {len(inputs)} inputs {[i.name for i in inputs]}, expected one")
    name = inputs[0].name
    dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}.get(
        inputs[0].type)
    if dtype is None:
        raise ValueError(f"ONNX input {name!r} has type {inputs[0].type}, expected a float tensor")

    def run(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {name: x.cpu().numpy().astype(dtype, copy=False)})[0]
        return torch.from_numpy(out).to(x.device)

    return run


PINNED_HEADER = "x-canaryflow-pinned"  # set by the router when the client pinned a version
# Set by the canary's pairwise replay (straight to TorchServe, never through the router, which strips it): the
# rows are live traffic answered again, so they get what live rows get (faults included) but are not sampled twice.
REPLAY_HEADER = "x-canaryflow-replay"


def _pinned(context: Any, idx: int, header: str = PINNED_HEADER) -> bool:
    try:
        names = context.get_all_request_header(idx) if context is not None else {}
    except (AttributeError, IndexError, KeyError):
        return False
    return any(str(name).lower() == header for name in names)


class TrafficSample:
    """A bounded sample of served rows, for the drift gate of the next release (``<dir>/<model>.jsonl``).

    Up to ``rows_per_request`` validated rows of each request are appended as one JSON line each (single small
    O_APPEND writes, so workers do not interleave); past ``max_bytes`` the file is rotated to ``.1``. Writing
    never fails a request: a full disk costs the sample, not the answer.
    """

    ENV = "CANARYFLOW_TRAFFIC_DIR"

    def __init__(self, path: str, rows_per_request: int = 4, max_bytes: int = 4 << 20) -> None:
        self.path, self.rows_per_request, self.max_bytes = path, rows_per_request, max_bytes

    @classmethod
    def from_env(cls, model_name: str) -> TrafficSample | None:
        directory = os.environ.get(cls.ENV)
        return cls(os.path.join(directory, f"{model_name}.jsonl")) if directory else None

    def add(self, arrays: list[np.ndarray]) -> None:
        lines = "".join(json.dumps(row) + "\n" for a in arrays for row in a[: self.rows_per_request].tolist())
        try:
            if os.path.exists(self.path) and os.path.getsize(self.path) > self.max_bytes:
                os.replace(self.path, self.path + ".1")
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, lines.encode())
            finally:
                os.close(fd)
        except OSError:
            pass


class CanaryflowHandler(BaseHandler):
    """Validates JSON rows, runs the model (in fixed-size chunks if needed), returns class probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.meta: ServingMeta | None = None
        self.chaos: Chaos | None = None

    def initialize(self, context: Any) -> None:
        props = context.system_properties
        self.manifest = context.manifest
        self._setup(props["model_dir"], props.get("gpu_id"))
        self.traffic = TrafficSample.from_env(self.meta.model_name)
        # Only in a TorchServe worker: parity checks (for_bundle) always see the model's own answers.
        self.chaos = Chaos(self.meta.chaos) if self.meta.chaos else None
        # Full collections of the model's objects caused the 100+ ms tails (FACTS.md); freeze them out of GC.
        gc.collect()
        gc.freeze()
        self.initialized = True

    @classmethod
    def for_bundle(cls, model_dir: str | os.PathLike[str], gpu_id: int | None = None) -> CanaryflowHandler:
        """A handler serving the bundle in ``model_dir`` outside TorchServe, for parity checks and benchmarks:
        same loading, warm-up and post-processing as in a worker (no context, no GC freeze)."""
        handler = cls()
        handler._setup(os.fspath(model_dir), gpu_id)
        return handler

    def probabilities(self, rows: np.ndarray) -> np.ndarray:
        """Class probabilities of already-validated rows, exactly as :meth:`handle` would answer them."""
        x = torch.from_numpy(np.ascontiguousarray(rows, dtype=self.meta.input_dtype)).to(self.device)
        return self.inference((x, [len(x)]))[0].cpu().numpy()

    def _setup(self, model_dir: str, gpu_id: int | None) -> None:
        on_gpu = torch.cuda.is_available() and gpu_id is not None
        self.device = torch.device(f"cuda:{gpu_id}" if on_gpu else "cpu")
        self.meta = ServingMeta.load(os.path.join(model_dir, META_FILE))
        self.model = self._load_model(os.path.join(model_dir, self.meta.model_file))
        # Warm up now, so a model that cannot serve fails registration instead of the first client.
        rows = self.meta.fixed_batch or 1
        warm = torch.zeros(rows, self.meta.n_features, dtype=getattr(torch, self.meta.input_dtype))
        n_classes = self.inference((warm.to(self.device), [rows]))[0].shape[1]
        labels = self.meta.class_labels
        if labels is not None and len(labels) != n_classes:
            raise ValueError(f"model has {n_classes} classes but the meta lists {len(labels)} class_labels")

    def _load_model(self, path: str) -> Callable[[torch.Tensor], Any]:
        if self.meta.format == "torch_export":
            program = torch.export.load(path)
            if self.device.type != "cpu":
                program = move_to_device_pass(program, self.device)
            return program.module()
        return _onnx_model(path, self.device)

    def preprocess(self, data: list[dict[str, Any]]) -> Batch:
        arrays = []
        for k, request in enumerate(data):
            try:
                arrays.append(rows_to_array(decode_body(request), self.meta))
            except PredictionException as e:
                if len(data) > 1:
                    e.message = f"request {k} of a server-side batch of {len(data)}: {e.message}"
                raise
        traffic, chaos = getattr(self, "traffic", None), getattr(self, "chaos", None)
        if traffic is not None or chaos is not None:
            # Pinned requests are the pipeline's own (warm-up, smoke and load tests): not live traffic, so neither
            # sampled nor given faults. Shadow copies are live.
            context = getattr(self, "context", None)
            live = [not _pinned(context, k) for k in range(len(arrays))]
            fresh = [keep and not _pinned(context, k, REPLAY_HEADER) for k, keep in enumerate(live)]
            if traffic is not None and any(fresh):
                traffic.add([a for a, keep in zip(arrays, fresh, strict=True) if keep])
        x = torch.from_numpy(np.concatenate(arrays)).to(self.device)
        if chaos is not None:
            self._chaos_batch = (x, live)
        return x, [len(a) for a in arrays]

    def inference(self, data: Batch, *args: Any, **kwargs: Any) -> Batch:
        x, counts = data
        step = self.meta.fixed_batch or len(x)
        outputs = []
        with torch.no_grad():  # not inference_mode: TorchScript/exported modules can fail under it (FACTS.md)
            for start in range(0, len(x), step):
                chunk = x[start : start + step]
                n = len(chunk)
                if n < step:  # a fixed-batch program takes only full chunks: pad with the last row
                    chunk = torch.cat([chunk, chunk[-1:].expand(step - n, -1)])
                out = self.model(chunk)
                outputs.append((out[0] if isinstance(out, tuple | list) else out)[:n])
        out = torch.cat(outputs).float()
        if len(out) != len(x):
            raise ValueError(f"model returned {len(out)} rows for {len(x)} input rows")
        probs = to_probabilities(out, self.meta.output)
        return probs, counts

    def postprocess(self, data: Batch) -> list[dict[str, Any]]:
        probs, counts = data
        failed: set[int] = set()
        if getattr(self, "chaos", None) is not None:
            probs, failed = self._inject_chaos(probs, counts)
        meta, labels = self.meta, self.meta.class_labels
        rows, top = probs.cpu().tolist(), probs.argmax(dim=1).tolist()
        responses, start = [], 0
        for idx, count in enumerate(counts):
            first, start = start, start + count
            self.context.set_response_header(idx, VERSION_HEADER, meta.model_version)
            self.context.set_response_content_type(idx, "application/json")
            if idx in failed:
                self.context.set_response_status(500, CHAOS_ERROR, idx)
                responses.append({"code": 500, "type": "InternalServerException", "message": CHAOS_ERROR})
                continue
            predictions = [
                {"class": labels[top[r]] if labels else top[r], "class_index": top[r],
                 "probabilities": rows[r], "model_version": meta.model_version}
                for r in range(first, start)
            ]
            responses.append({"model_name": meta.model_name, "model_version": meta.model_version,
                              "predictions": predictions})
            self.context.set_response_header(idx, PREDICTION_HEADER,
                                             prediction_summary(rows[first:start], top[first:start]))
        return responses

    def _inject_chaos(self, probs: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, set[int]]:
        """Faults for the live (unpinned) requests of a batch: delay, failed requests, distorted probabilities."""
        chaos = self.chaos
        x, live = self._chaos_batch
        if not chaos.active():
            return probs, set()
        chaos.delay(sum(live))
        parts, failed, start = [], set(), 0
        for idx, count in enumerate(counts):
            part = probs[start : start + count]
            if live[idx]:
                if chaos.fails():
                    failed.add(idx)
                else:
                    part = chaos.distort(part, x[start : start + count])
            parts.append(part)
            start += count
        return torch.cat(parts), failed

    def describe_handle(self) -> dict[str, Any]:
        """The serving meta, for a request with header ``describe: True``."""
        return self.meta.to_dict()

    def explain_handle(self, data_preprocess: Any, raw_data: Any) -> Any:
        # BaseHandler routes a request with header "explain: True" here; without this it is a 503.
        raise _bad("explanations are not supported by this model")


_handler: CanaryflowHandler | None = None


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[dict[str, Any]] | None:
    """TorchServe entry point; the model-load call passes ``data=None`` and only initializes."""
    global _handler
    if _handler is None or not _handler.initialized:
        _handler = CanaryflowHandler()
        _handler.initialize(context)
    return None if data is None else _handler.handle(data, context)
