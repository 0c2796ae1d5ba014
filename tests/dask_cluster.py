"""A real Dask cluster on loopback for tests: ``dask scheduler`` and ``dask worker`` processes (the CLI a user runs),
each worker its own process without a nanny, so killing one kills the worker itself and nothing restarts it.
Stopped by pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
DASK = str(Path(sys.executable).parent / "dask")
START_TIMEOUT_S = 120  # two workers importing torch on a busy 2-core machine


class DaskCluster:
    """A scheduler and ``len(worker_env)`` single-thread workers; ``worker_env[i]`` is added to worker i's
    environment (a fault to inject, the Prefect API to report to)."""

    def __init__(self, root: Path, worker_env: list[dict[str, str]]) -> None:
        self.root, self.worker_env = root, worker_env
        self.scheduler_file = root / "scheduler.json"
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return json.loads(self.scheduler_file.read_text())["address"]

    def start(self) -> DaskCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.scheduler = self._spawn("scheduler", [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                                   "--no-dashboard", "--scheduler-file", str(self.scheduler_file)])
        _wait_for(lambda: self.scheduler_file.exists(), self.scheduler, "the scheduler file")
        for i, extra in enumerate(self.worker_env):
            self.workers.append(self._spawn(
                f"worker-{i}", [DASK, "worker", "--scheduler-file", str(self.scheduler_file), "--host", "127.0.0.1",
                                "--nthreads", "1", "--no-nanny", "--no-dashboard", "--memory-limit", "0",
                                "--name", f"w{i}", "--local-directory", str(self.root / f"w{i}")], extra))
        from distributed import Client

        with Client(self.address, timeout=START_TIMEOUT_S, set_as_default=False) as client:
            client.wait_for_workers(len(self.workers), timeout=START_TIMEOUT_S)
        return self

    def _spawn(self, name: str, cmd: list[str], extra: dict[str, str] | None = None) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(PROJECT), **(extra or {})}
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the process writes it until it ends
        return subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def kill_worker(self, i: int) -> None:
        os.kill(self.workers[i].pid, signal.SIGKILL)
        self.workers[i].wait(timeout=30)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in [*self.workers, self.scheduler]:
            if proc is None:
                continue
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


def _wait_for(ready, proc: subprocess.Popen, what: str) -> None:  # noqa: ANN001 - a predicate
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"dask exited ({proc.returncode}) before {what} appeared")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {START_TIMEOUT_S} s")
        time.sleep(0.1)  # polling a condition with a deadline, not waiting for time to pass


@contextmanager
def dask_cluster(root: Path, worker_env: list[dict[str, str]] | None = None) -> Iterator[DaskCluster]:
    """A started cluster (two plain workers unless ``worker_env`` says otherwise), stopped on exit."""
    cluster = DaskCluster(root, worker_env if worker_env is not None else [{}, {}])
    try:
        yield cluster.start()
    finally:
        cluster.stop()
