"""TorchServe handler for canaryflow serving bundles.

It is copied into the .mar with ``serving_contract.py`` and ``serving_request.py`` and runs in TorchServe's Python
worker, so it imports only the standard library, numpy, torch, ``ts`` (and onnxruntime, lazily, for the "onnx"
format) and those two modules. The pipeline imports the contract from ``deployments.serving_contract``, never
this file's TorchServe machinery.

A small :class:`BaseHandler` subclass: ``initialize`` (load, warm up), ``preprocess`` (validate, sample live rows),
``inference`` (the model, as probabilities), ``postprocess`` (answers and headers); ``handle`` also reports each
live request to Prometheus (:class:`LiveMetrics`). Fault injection lives in a
subclass (``chaos_handler.py``) that the archiver ships only into chaos builds. TorchServe 0.12 calls the
module-level :func:`handle`. Server-side batching is safe: in a batch TorchServe grouped, a malformed request gets
its own 400 and the others are answered (per-request status); a model failure fails the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.export.passes import move_to_device_pass
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

try:  # in a .mar: the contract and the request rules sit next to this file in the model directory
    import serving_contract as contract
    import serving_request as requests_in
except ModuleNotFoundError:  # imported from the repository: the pipeline, batch scoring, tests
    from canaryflow.core import serving_contract as contract
    from deployments import serving_request as requests_in


@dataclasses.dataclass
class Batch:
    """One TorchServe batch on its way through the hooks."""

    x: torch.Tensor  # all rows of the batch
    counts: list[int]  # how many rows each request sent
    live: list[bool]  # per request: live traffic (not pinned by the pipeline's own warm-up, smoke and load tests)
    probs: np.ndarray | None = None  # (rows, classes), set by inference
    refused: dict[int, PredictionException] = dataclasses.field(default_factory=dict)  # request -> its 4xx


def _onnx_model(path: str, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
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

    def run(x: np.ndarray) -> np.ndarray:  # numpy in and out, whatever the provider (it copies to the GPU itself)
        return session.run(None, {name: x.astype(dtype, copy=False)})[0]

    return run



class TrafficSample:
    """A bounded sample of served rows, for the drift gate of the next release (``<dir>/<model>.jsonl``).

    Up to ``rows_per_request`` validated rows of each request are appended as one JSON line each (single small
    O_APPEND writes, so workers do not interleave); past ``max_bytes`` the file is rotated to ``.1``. Writing
    never fails a request: a full disk costs the sample, not the answer.

    The file stays open between requests (one ``write`` a request instead of five system calls): it is looked at
    again (``stat``) when what this worker wrote would take it past ``max_bytes``, and every ``check_every``
    writes, so a file another worker rotated or someone removed is reopened after at most that many lines.
    """

    ENV = contract.TRAFFIC_DIR_ENV

    def __init__(self, path: str, rows_per_request: int = 4, max_bytes: int = 4 << 20,
                 check_every: int = 64) -> None:
        self.path, self.rows_per_request, self.max_bytes = path, rows_per_request, max_bytes
        self.check_every = check_every
        self._fd: int | None = None
        self._size = self._writes = 0  # the file's size as last seen plus what this worker wrote since

    @classmethod
    def from_env(cls, model_name: str) -> TrafficSample | None:
        directory = os.environ.get(cls.ENV)
        return cls(os.path.join(directory, f"{model_name}.jsonl")) if directory else None

    def add(self, arrays: list[np.ndarray]) -> None:
        data = "".join(json.dumps(row) + "\n" for a in arrays for row in a[: self.rows_per_request].tolist()).encode()
        try:
            if self._fd is None or self._size > self.max_bytes or self._writes % self.check_every == 0:
                self._check()
            assert self._fd is not None
            os.write(self._fd, data)
            self._size += len(data)
            self._writes += 1
        except OSError:
            self.close()

    def _check(self) -> None:
        """Rotate the file when it is over ``max_bytes``; (re)open it when it is not the one held open."""
        try:
            seen = os.stat(self.path)
        except FileNotFoundError:
            seen = None
        if seen is not None and seen.st_size > self.max_bytes:
            os.replace(self.path, self.path + ".1")
            seen = None
        if self._fd is not None and (seen is None or not os.path.samestat(seen, os.fstat(self._fd))):
            self.close()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size, self._writes = os.fstat(self._fd).st_size, 0

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


PER_REQUEST_GAUGES = ("[METRICS]HandlerTime.", "[METRICS]PredictionTime.")
"""TorchServe's own per-request gauges (the last request's time, one stdout line each): Prometheus learns nothing
from a last value sampled every scrape; the router's access log and :class:`LiveMetrics` carry the latencies."""


def _drop_per_request_gauges(record: logging.LogRecord) -> bool:
    return not (isinstance(record.msg, str) and record.msg.startswith(PER_REQUEST_GAUGES))


def _drop_client_errors(record: logging.LogRecord) -> bool:
    """TorchServe logs every PredictionException with its traceback ("Prediction error"): a malformed request's
    400 is the client's mistake, already in the router's access log with its message."""
    error = record.exc_info[1] if record.exc_info else None
    return not (isinstance(error, PredictionException) and error.error_code < 500)


def quiet_worker_logging() -> None:
    """Production log levels inside the worker. TorchServe's worker logs at INFO to stdout, which the frontend
    reads line by line: "Backend received inference at" for every request, plus two gauges (8 % and 2 x 3 % of a
    1 ms model's worker time, py-spy; each line is parsed again by the Java side), and a traceback for every
    client's 4xx. Warnings and errors still reach ``model_log.log``; the ``ts.metrics`` loggers keep INFO, which
    is how metric lines reach Prometheus."""
    logging.getLogger().setLevel(logging.WARNING)
    service = logging.getLogger("ts.service")
    if _drop_client_errors not in service.filters:
        service.addFilter(_drop_client_errors)
    metrics = logging.getLogger("ts.metrics")
    metrics.setLevel(logging.INFO)
    caching = logging.getLogger("ts.metrics.caching_metric")  # where TorchServe 0.12's metric lines are logged
    if _drop_per_request_gauges not in caching.filters:
        caching.addFilter(_drop_per_request_gauges)


class LiveMetrics:
    """Per-request metrics of live traffic as TorchServe ``[METRICS]`` lines on the worker's stdout, which the
    frontend turns into Prometheus counters (declared in ``templates/torchserve-metrics.yaml``).

    TorchServe 0.12's own histograms have fixed buckets (0.005 to 10, in the value's unit), so the latency goes
    out as a counter of the one bucket each request falls in (``le`` its upper bound); Prometheus recording rules
    sum those into the cumulative ``canaryflow_request_latency_ms_bucket`` (deployments/prometheus.py).

    Counters are summed in the worker and written at most every ``flush_s`` (a daemon thread writes what a quiet
    second left): one line per bucket, class and counter that moved, instead of three or more per request, each
    formatted, printed and parsed again by the frontend (a fifth of a batched 1 ms model's worker time). What a
    killed worker had not written yet (under ``flush_s`` of traffic) is lost, as a scrape interval's would be."""

    FLUSH_S = 1.0

    def __init__(self, model: str, version: str, flush_s: float | None = None) -> None:
        from ts.metrics.caching_metric import CachingMetric
        from ts.metrics.metric_type_enum import MetricTypes

        dims, counter = ["model_name", "model_version"], MetricTypes.COUNTER
        self.dims, self.flush_s = [model, version], self.FLUSH_S if flush_s is None else flush_s
        self.bins = CachingMetric(contract.BIN_METRIC, "ms", [*dims, "le"], counter)
        self.sum = CachingMetric(contract.SUM_METRIC, "ms", dims, counter)
        self.errors = CachingMetric(contract.ERRORS_METRIC, "Count", dims, counter)
        self.predictions = CachingMetric(contract.PREDICTIONS_METRIC, "Count", [*dims, "class"], counter)
        self._lock = threading.Lock()
        self._bins: Counter[str] = Counter()
        self._classes: Counter[int] = Counter()
        self._ms, self._errors, self._last = 0.0, 0, time.monotonic()
        self._flusher: threading.Thread | None = None

    def observe(self, ms: float, failed: bool, classes: Counter[int]) -> None:
        """One live request: its handler time, whether it failed on our side, its predicted rows per class."""
        le = next((b for b in contract.LATENCY_BUCKETS_MS if ms <= b), None)
        with self._lock:
            self._bins["+Inf" if le is None else f"{le:g}"] += 1
            self._ms += ms
            self._errors += failed
            self._classes.update(classes)
            due = time.monotonic() - self._last >= self.flush_s
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_forever, name="canaryflow-live-metrics", daemon=True)
            self._flusher.start()
        if due:
            self.flush()

    def flush(self) -> None:
        """Write what was counted since the last flush (nothing when nothing was)."""
        with self._lock:
            bins, ms, errors, classes = self._bins, self._ms, self._errors, self._classes
            self._bins, self._classes, self._ms, self._errors = Counter(), Counter(), 0.0, 0
            self._last = time.monotonic()
        for le, n in sorted(bins.items()):
            self.bins.add_or_update(n, [*self.dims, le])
        if bins:
            self.sum.add_or_update(round(ms, 4), self.dims)
        if errors:
            self.errors.add_or_update(errors, self.dims)
        for cls, rows in sorted(classes.items()):
            self.predictions.add_or_update(rows, [*self.dims, str(cls)])

    def _flush_forever(self) -> None:
        while True:
            time.sleep(self.flush_s)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a metric never takes the worker down
                pass


class CanaryflowHandler(BaseHandler):
    """Validates JSON rows, runs the model (in fixed-size chunks if needed), returns class probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.meta: contract.ServingMeta | None = None
        self.traffic: TrafficSample | None = None
        self.live_metrics: LiveMetrics | None = None
        # per request of a batch: failed (None: refused, the client's 4xx), classes
        self._outcome: list[tuple[bool | None, Counter[int]]] | None = None

    def initialize(self, context: Any) -> None:
        props = context.system_properties
        self.manifest = context.manifest
        self._setup(props["model_dir"], props.get("gpu_id"))
        self.traffic = TrafficSample.from_env(self.meta.model_name)
        self.live_metrics = LiveMetrics(self.meta.model_name, self.meta.model_version)
        quiet_worker_logging()
        # Full collections of the model's objects caused the 100+ ms tails (FACTS.md); freeze them out of GC.
        gc.collect()
        gc.freeze()
        self.initialized = True

    @classmethod
    def for_bundle(cls, model_dir: str | os.PathLike[str], gpu_id: int | None = None) -> CanaryflowHandler:
        """A handler serving the bundle in ``model_dir`` outside TorchServe, for parity checks, batch scoring and
        benchmarks: same loading, warm-up and post-processing as in a worker (no context, no GC freeze)."""
        handler = cls()
        handler._setup(os.fspath(model_dir), gpu_id)
        return handler

    def probabilities(self, rows: np.ndarray) -> np.ndarray:
        """Class probabilities of already-validated rows, exactly as :meth:`handle` would answer them."""
        return self._predict(torch.from_numpy(np.ascontiguousarray(rows, dtype=self.meta.input_dtype)))

    def _setup(self, model_dir: str, gpu_id: int | None) -> None:
        on_gpu = torch.cuda.is_available() and gpu_id is not None
        self.device = torch.device(f"cuda:{gpu_id}" if on_gpu else "cpu")
        self.meta = contract.ServingMeta.load(os.path.join(model_dir, contract.META_FILE))
        self.model = self._load_model(os.path.join(model_dir, self.meta.model_file))
        # Warm up now, so a model that cannot serve fails registration instead of the first client.
        rows = self.meta.fixed_batch or 1
        warm = torch.zeros(rows, self.meta.n_features, dtype=getattr(torch, self.meta.input_dtype))
        n_classes = self.n_classes = self._predict(warm).shape[1]
        labels = self.meta.class_labels
        if labels is not None and len(labels) != n_classes:
            raise ValueError(f"model has {n_classes} classes but the meta lists {len(labels)} class_labels")

    def _load_model(self, path: str) -> Callable[[Any], Any]:
        if self.meta.format == "torch_export":
            program = torch.export.load(path)
            if self.device.type != "cpu":
                program = move_to_device_pass(program, self.device)
            return program.module()
        return _onnx_model(path, self.device)

    def _predict(self, x: torch.Tensor) -> np.ndarray:
        """The model on validated rows, as probabilities: in chunks the program takes (exactly ``fixed_batch`` rows,
        padded; else at most what it was exported for, :func:`batch_call_rows`), since a server-side batch of
        requests can hold more rows than one request may (``max_batch_rows`` each). An ONNX model gets numpy
        arrays all the way (tensors around onnxruntime were 5 % of a 1 ms model's worker time)."""
        if len(x) == 0 and getattr(self, "n_classes", None):  # every request of a batch was refused
            return np.zeros((0, self.n_classes), dtype=np.float32)
        if self.meta.format == "onnx":
            out = self._chunked(x.numpy(), np.concatenate,
                                lambda c, k: np.concatenate([c, np.repeat(c[-1:], k, axis=0)]))
            out = np.asarray(out, dtype=np.float32)
        else:
            with torch.no_grad():  # not inference_mode: TorchScript/exported modules can fail under it (FACTS.md)
                out = self._chunked(x.to(self.device), torch.cat,
                                    lambda c, k: torch.cat([c, c[-1:].expand(k, -1)])).float().cpu().numpy()
        if len(out) != len(x):
            raise ValueError(f"model returned {len(out)} rows for {len(x)} input rows")
        return contract.to_probabilities(out, self.meta.output)

    def _chunked(self, x: Any, cat: Callable[[list[Any]], Any], pad: Callable[[Any, int], Any]) -> Any:
        """The model's first output on ``x`` (a tensor or an array, with that library's ``cat`` and ``pad``),
        called on chunks of what the program takes; a fixed-batch program's last chunk padded with its last row."""
        fixed = self.meta.fixed_batch
        step, outputs = fixed or contract.batch_call_rows(self.meta), []
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            n = len(chunk)
            if fixed and n < fixed:  # a fixed-batch program takes only full chunks: pad with the last row
                chunk = pad(chunk, fixed - n)
            out = self.model(chunk)
            outputs.append((out[0] if isinstance(out, tuple | list) else out)[:n])
        return outputs[0] if len(outputs) == 1 else cat(outputs)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
        """BaseHandler's handle, timed: each live request's time from preprocess to postprocess, whether it
        failed on our side (a client's 4xx is not counted at all) and its predicted classes go to
        :class:`LiveMetrics`. Requests pinned by the pipeline or replayed by the canary are not live traffic."""
        started, self._outcome = time.perf_counter(), None
        try:
            out = self._handle(data, context)
        except PredictionException as e:
            if e.error_code >= 500:
                self._report(context, len(data), started, failed=True)
            raise
        except Exception:
            self._report(context, len(data), started, failed=True)
            raise
        self._report(context, len(data), started, failed=False)
        return out

    def _handle(self, data: list[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
        """BaseHandler.handle's steps (describe, preprocess, inference or explain, postprocess) without its
        HandlerTime gauge, formatted for every request only to be dropped (:func:`quiet_worker_logging`).
        With TorchServe's profiler on (``ENABLE_TORCH_PROFILER``), BaseHandler.handle itself."""
        if os.environ.get("ENABLE_TORCH_PROFILER"):
            return super().handle(data, context)
        self.context = context
        if self._is_describe():
            return [self.describe_handle()]
        batch = self.preprocess(data)
        if self._is_explain():
            return self.explain_handle(batch, data)
        return self.postprocess(self.inference(batch))

    def _report(self, context: Any, n: int, started: float, failed: bool) -> None:
        if self.live_metrics is None or (not failed and self._outcome is None):
            return  # outside TorchServe, or no prediction at all (describe)
        ms = (time.perf_counter() - started) * 1000
        try:
            for k in range(n):
                if any(requests_in.marked(context, k, h) for h in (contract.PINNED_HEADER, contract.REPLAY_HEADER)):
                    continue
                bad, classes = (True, Counter()) if failed or self._outcome is None else self._outcome[k]
                if bad is None:
                    continue  # the client's own 4xx: not the model's error, not a prediction
                self.live_metrics.observe(ms, bad, classes)
        except Exception:  # noqa: BLE001 - a metric never costs the answer (as the traffic sample)
            pass

    def preprocess(self, data: list[dict[str, Any]]) -> Batch:
        arrays, refused = [], {}
        empty = np.zeros((0, self.meta.n_features), dtype=self.meta.input_dtype)
        for k, request in enumerate(data):
            try:
                arrays.append(requests_in.rows_to_array(requests_in.decode_body(request), self.meta))
            except PredictionException as e:
                if len(data) == 1:
                    raise
                # In a server-side batch only this request is refused; the others are answered.
                refused[k] = e
                arrays.append(empty)
        # Pinned requests are the pipeline's own (warm-up, smoke and load tests): not live traffic, so neither
        # sampled nor given faults. Shadow copies are live; replayed rows are live but already sampled.
        context = getattr(self, "context", None)
        live = [not requests_in.marked(context, k, contract.PINNED_HEADER) for k in range(len(arrays))]
        if self.traffic is not None:
            fresh = [a for k, a in enumerate(arrays)
                     if live[k] and k not in refused and not requests_in.marked(context, k, contract.REPLAY_HEADER)]
            if fresh:
                self.traffic.add(fresh)
        x = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        return Batch(torch.from_numpy(x), [len(a) for a in arrays], live, refused=refused)

    def inference(self, data: Batch, *args: Any, **kwargs: Any) -> Batch:
        data.probs = self._predict(data.x)
        return data

    def postprocess(self, data: Batch) -> list[dict[str, Any]]:
        return self.answers(data.probs, data.counts, refused=data.refused)

    def answers(self, probs: np.ndarray, counts: list[int], failed: dict[int, str] | None = None,
                refused: dict[int, PredictionException] | None = None) -> list[dict[str, Any]]:
        """One response per request; instead, ``failed`` (request index -> message) answers a 500 and
        ``refused`` (request index -> its 4xx, a malformed request in a server-side batch) its own status."""
        meta, labels, failed, refused = self.meta, self.meta.class_labels, failed or {}, refused or {}
        rows, top = probs.tolist(), probs.argmax(axis=1).tolist()
        responses, start, self._outcome = [], 0, []
        for idx, count in enumerate(counts):
            first, start = start, start + count
            self.context.set_response_header(idx, contract.VERSION_HEADER, meta.model_version)
            self.context.set_response_content_type(idx, "application/json")
            if idx in refused:
                self._outcome.append((None, Counter()))
                error = refused[idx]
                self.context.set_response_status(error.error_code, error.message, idx)
                responses.append({"code": error.error_code, "type": "BadRequestException", "message": error.message})
                continue
            self._outcome.append((idx in failed, Counter() if idx in failed else Counter(top[first:start])))
            if idx in failed:
                self.context.set_response_status(500, failed[idx], idx)
                responses.append({"code": 500, "type": "InternalServerException", "message": failed[idx]})
                continue
            predictions = [
                {"class": labels[top[r]] if labels else top[r], "class_index": top[r],
                 "probabilities": rows[r], "model_version": meta.model_version}
                for r in range(first, start)
            ]
            responses.append({"model_name": meta.model_name, "model_version": meta.model_version,
                              "predictions": predictions})
            self.context.set_response_header(idx, contract.PREDICTION_HEADER,
                                             contract.prediction_summary(rows[first:start], top[first:start]))
        return responses

    def describe_handle(self) -> dict[str, Any]:
        """The serving meta, for a request with header ``describe: True``."""
        return self.meta.to_dict()

    def explain_handle(self, data_preprocess: Any, raw_data: Any) -> Any:
        # BaseHandler routes a request with header "explain: True" here; without this it is a 503.
        raise PredictionException("explanations are not supported by this model", 400)


class EntryPoint:
    """TorchServe's module-level ``handle``: one handler per worker, created by the model-load call
    (``data=None``)."""

    def __init__(self, cls: type[CanaryflowHandler]) -> None:
        self.cls, self.handler = cls, None

    def __call__(self, data: list[dict[str, Any]] | None, context: Any) -> list[dict[str, Any]] | None:
        if self.handler is None or not self.handler.initialized:
            self.handler = self.cls()
            self.handler.initialize(context)
        return None if data is None else self.handler.handle(data, context)


handle = EntryPoint(CanaryflowHandler)
