"""Batch chunks on a Dask cluster (the ``dask`` extra): the coordinator reads the input and keeps the manifest, Dask
workers check, score and write the parts.

Every guarantee of the local run holds because a chunk is idempotent: its outputs have fixed names and are
written atomically, so a chunk that Dask runs again on another worker (its first worker died mid-write) replaces
nothing that was trusted and leaves one copy; the manifest is written by the coordinator alone, from the records
the finished chunks return.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from canaryflow.batch.io import ChunkSpec
from canaryflow.batch.score import score_chunk
from canaryflow.core.errors import BatchError

if TYPE_CHECKING:
    from canaryflow.batch.job import BatchJob

CONNECT_TIMEOUT_S = 30


class DaskExecutor:
    """:class:`canaryflow.batch.run.ChunkExecutor` on the Dask scheduler at ``address``.

    ``parallel`` is the cluster's thread count when connected: the run keeps that many chunks (plus one read
    ahead) in flight, so the coordinator's memory is bounded by the cluster's size, not the input's.
    """

    def __init__(self, address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        try:
            from distributed import Client
        except ImportError as exc:
            raise BatchError(f"a Dask scheduler ({address}) was named but dask.distributed is not installed: "
                             "pip install 'canaryflow[dask]'") from exc
        try:
            self.client = Client(address, timeout=timeout_s, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise BatchError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
        self.parallel = max(1, sum(self.client.nthreads().values()))
        from distributed import as_completed

        self._done = as_completed(loop=self.client.loop)  # every submitted chunk, yielded once as it finishes

    def submit(self, job: BatchJob, spec: ChunkSpec, table: pa.Table) -> Any:
        # pure=False and a unique key: a re-run must score again, never reuse a result the cluster remembers
        future = self.client.submit(score_chunk, job, spec, table, pure=False,
                                    key=f"score-chunk-{job.run_key}-{spec.key}-{uuid.uuid4().hex[:8]}")
        self._done.add(future)
        return future

    def first_done(self, handles: list[Any]) -> Any:
        # the run asks with the chunks in flight, which are the submitted ones not yet returned here
        return next(self._done)

    def close(self) -> None:
        self.client.close()
