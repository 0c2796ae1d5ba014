"""The model call of batch scoring: class probabilities of checked rows, with the serving bundle's own model file.

An ONNX bundle is run here on a plain onnxruntime session tuned for batch work (one compute thread per chunk in
flight, no spinning, numpy in and out, slices sized for the CPU cache); its outputs go through the same
post-processing as the TorchServe handler's (:func:`serving_contract.to_probabilities`), so batch answers equal
served answers (a unit test holds them to the handler's). Other formats (torch.export, fixed-batch programs) go
through the handler's own code.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from canaryflow.core import serving_contract as contract
from canaryflow.core.registry import MlflowRegistry
from canaryflow.core.serving_contract import META_FILE

if TYPE_CHECKING:
    from canaryflow.batch.model import BatchModel

_ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def onnx_session(path: str, threads: int) -> Any:
    """An onnxruntime CPU session for batch scoring.

    Chunks run in parallel, so each call gets ``threads`` intra-op threads (1 on 2 cores with 2 chunks: 1.05M
    rows/s each, against 1.64M for one session on 2 threads) and no inter-op pool; spinning off, because idle
    spinning threads steal the core the other chunk needs. Full graph optimization (fusions, layout).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class Scorer:
    """Class probabilities of rows of a serving bundle, ``score_rows`` rows per model call.

    A torch.export program refuses batches above the ``max_batch_rows`` it was exported with; ONNX does not.
    """

    def __init__(self, bundle_dir: str, score_rows: int | None = None, threads: int = 1) -> None:
        self.meta = meta = contract.ServingMeta.load(os.path.join(bundle_dir, META_FILE))
        self.class_labels = meta.class_labels
        self._session: Any = None
        self._handler: Any = None
        if meta.format == "onnx" and meta.fixed_batch is None:
            self._session = onnx_session(os.path.join(bundle_dir, meta.model_file), threads)
            (spec,) = self._session.get_inputs()  # the handler refuses other models; so does this
            self._input, self._dtype = spec.name, _ONNX_DTYPES[spec.type]
            self.step = score_rows or contract.batch_call_rows(meta)
        else:
            import torch

            from deployments.handler import CanaryflowHandler

            torch.set_num_threads(threads)  # process-wide; every scorer of the process asks for the same
            self._handler = CanaryflowHandler.for_bundle(bundle_dir)
            limit = contract.batch_call_rows(meta)  # what the exported program takes
            self.step = min(score_rows or limit, limit) if meta.format == "torch_export" else (score_rows or limit)
        # an all-rejected chunk still writes a part with every column: the class count comes from one zero row
        zero = np.zeros((1, meta.n_features), meta.input_dtype)
        if self._session is not None:
            self._out_shape = self._run(zero).shape[1:]
            self.n_classes = self.probabilities(zero).shape[1]
        else:
            self.n_classes = self._handler.probabilities(zero).shape[1]

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """(rows, classes) float32. ONNX: the model's outputs slice by slice into one array, then the handler's
        post-processing once (it is row by row: the same answers as per slice, without its per-call cost)."""
        if self._session is None:
            probs = np.empty((len(x), self.n_classes), np.float32)
            for i in range(0, len(x), self.step):
                probs[i : i + self.step] = self._handler.probabilities(x[i : i + self.step])
            return probs
        out = np.empty((len(x), *self._out_shape), np.float32)  # the handler's path: float32 outputs
        for i in range(0, len(x), self.step):
            out[i : i + self.step] = self._run(x[i : i + self.step])
        return contract.to_probabilities(out, self.meta.output).astype(np.float32, copy=False)

    def _run(self, x: np.ndarray) -> np.ndarray:
        out = np.asarray(self._session.run(None, {self._input: np.ascontiguousarray(x, dtype=self._dtype)})[0])
        if len(out) != len(x):
            raise ValueError(f"model returned {len(out)} rows for {len(x)} input rows")
        return out


_scorers: dict[tuple[str, int | None, int], Scorer] = {}
_lock = threading.Lock()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_threads() -> int | None:
    """Threads of the Dask worker running this code (None outside one)."""
    if "distributed" not in sys.modules:  # a worker has imported it; importing it here would cost ~50 MB
        return None
    from distributed import get_worker

    try:
        return get_worker().state.nthreads
    except ValueError:  # not in a worker
        return None


def scorer_for(model: BatchModel, score_rows: int | None, parallel: int = 1) -> Scorer:
    """One scorer per model and process (threads share it; a Dask worker without the bundle fetches it), with
    the process's cores shared out between the ``parallel`` chunks it scores at once. On a Dask worker each chunk
    gets one compute thread: Dask's parallelism is its worker threads and processes, which the operator sized
    to the machine (more threads per task would oversubscribe the cores)."""
    threads = 1 if worker_threads() is not None else max(1, cores() // max(parallel, 1))
    key = (model.bundle_dir, score_rows, threads)
    with _lock:
        if key not in _scorers:
            if not (Path(model.bundle_dir) / META_FILE).exists():
                from canaryflow.batch.model import fetch_model

                registry = MlflowRegistry(model.tracking_uri)
                fetch_model(registry, model.name, model.version, model.alias,
                            Path(model.work_dir) if model.work_dir else Path(model.bundle_dir).parent,
                            allow_unreleased=model.variant == "export", expect_sha256=model.archive_sha256)
            _scorers[key] = Scorer(model.bundle_dir, score_rows, threads)
        return _scorers[key]
