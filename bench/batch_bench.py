"""Batch bench: canaryflow's batch scoring against the common approach, same model, same files, same run.

    .venv/bin/python bench/batch_bench.py               # 1M and 4M rows x 20 float32 features: a few minutes
    .venv/bin/python bench/batch_bench.py --quick       # 200k and 800k rows

Setup (once per run, in this process): Parquet files of N rows x 20 float32 features (pyarrow's default row
groups of 1Mi rows); an MLP 20-256-256-2 trained briefly and logged to a local MLflow (SQLite, no server) with
its reference/holdout data; then what a release records for it, done with the release's own functions: the
optimization gate (``optimize_pytorch``: variants, parity, micro-benchmark, choice), the .mar
(``build_mar``), the data suite (``build_suite``), all on a release run, the version tagged released and
aliased ``champion``. No TorchServe or Prefect here: the batch path scores in-process and needs neither.

Measured, each in a fresh subprocess: peak RSS of the whole process (VmHWM) and while scoring (sampled every
20 ms), so imports and the model (the same for any input size) are told apart from what streaming costs, and
the CPU seconds spent while scoring (rows per CPU-second: what the work costs, whatever else the shared machine
runs at the time; rows/s is the headline, but on 2 shared cores it moves with the neighbours' load):
- ``canaryflow``: ``prepare`` (resolve champion, fetch .mar/suite/reference) then the same functions the
  Prefect flow runs (``run_chunks`` on 2 threads: checks, scoring with the release's serving artifact
  (canaryflow/batch/scorer.py), atomic parts, manifest; then ``finish``: verification, Evidently drift, MLflow
  run). rows/s is over the scoring phase (model already loaded), end-to-end seconds are reported too.
- ``dask`` (when the ``dask`` extra is installed; ``--no-dask`` skips it): the same on a Dask cluster on loopback,
  a scheduler and 2 single-thread worker processes (``LocalCluster``); this process reads the input and keeps
  the manifest, the workers check, score and write. RSS and CPU are this process plus the workers.
- ``pyfunc``: the common approach: ``mlflow.pyfunc.load_model("models:/<name>@champion")``, then pandas chunks
  (``ParquetFile.iter_batches(65536).to_pandas()``) into ``.predict``, predictions appended to a Parquet file
  with a ParquetWriter. Bounded memory too, but no validation, no ids, no resumption.
``--repeat N`` runs every approach N times per size, alternating, and keeps each one's fastest run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:  # run as a script: bench/ is not a package
    sys.path.insert(0, str(PROJECT))

RESULTS = PROJECT / "bench" / "results"
MODEL = "bench-batch-mlp"
N_FEATURES = 20
CHUNK_ROWS = 65536


def log(msg: str) -> None:
    print(f"[batch-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- setup -------------------------------------------------------------------------------------------------
def make_data(path: Path, rows: int, seed: int) -> None:
    """N rows x 20 float32 from the training distribution, written in slices of 1M rows (bounded memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    schema = pa.schema([(f"f{i}", pa.float32()) for i in range(N_FEATURES)])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 1 << 20):
            x = rng.normal(size=(min(1 << 20, rows - start), N_FEATURES)).astype(np.float32)
            writer.write_table(pa.table({f"f{i}": x[:, i] for i in range(N_FEATURES)}, schema=schema))


def train_and_release(work: Path, tracking_uri: str) -> dict[str, Any]:
    """Train, log, register; then record a release of it the way the release flow does (see module doc)."""
    import mlflow
    import torch
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from canaryflow.core import seal
    from canaryflow.core.paths import StatePaths
    from canaryflow.core.registry import MlflowRegistry
    from canaryflow.core.settings import OptimizationSettings
    from canaryflow.local.demo import pinned_requirements
    from canaryflow.model.datasets import frame, log_release_datasets
    from canaryflow.model.optimization import optimize_pytorch, write_reports
    from canaryflow.model.packaging import InputContract, archive_files
    from deployments.archive import build_mar
    from validation.data import build_suite, suite_to_json

    rng = np.random.default_rng(0)
    x = rng.normal(size=(24_000, N_FEATURES)).astype(np.float32)
    w = rng.normal(size=N_FEATURES).astype(np.float32)
    y = (x @ w + 0.3 * np.sin(3 * x[:, 0]) > 0).astype(np.int64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x[:20_000]), torch.from_numpy(y[:20_000])
    for _ in range(3):
        for idx in torch.randperm(len(xt)).split(256):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x[20_000:])).argmax(1).numpy() == y[20_000:]).mean())

    client = MlflowClient(tracking_uri)
    for exp in ("canaryflow-bench", "canaryflow-releases", "canaryflow-batch"):
        if client.get_experiment_by_name(exp) is None:
            client.create_experiment(exp, artifact_location=(work / "artifacts" / exp).as_uri())
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    mlflow.set_experiment("canaryflow-bench")
    reference, holdout = frame(x[:20_000], y[:20_000]), frame(x[20_000:], y[20_000:])
    with mlflow.start_run(run_name=f"train-{MODEL}"):
        log_release_datasets(reference, holdout)
        with torch.no_grad():
            example_out = model(torch.from_numpy(x[:5])).numpy()
        info = mlflow.pytorch.log_model(model, name="model", signature=infer_signature(x[:5], example_out),
                                        input_example=x[:5], registered_model_name=MODEL,
                                        pip_requirements=pinned_requirements("mlflow", "torch", "numpy"))
    version = str(info.registered_model_version)

    registry = MlflowRegistry(tracking_uri)
    run_id = registry.release_run("canaryflow-releases", MODEL, version)
    result = optimize_pytorch(model, InputContract(N_FEATURES, None, "float32"), x[20_000:], work / "variants",
                              name=MODEL, version=version, settings=OptimizationSettings())
    assert result.serving is not None, result.gate.reason
    files = write_reports(result, work / "reports" / "optimization")
    registry.log_to_run(run_id, files=list(files), artifact_path="optimization")
    (work / "store").mkdir(exist_ok=True)
    bundle = result.serving
    mar = build_mar(bundle.model_file, archive_files(bundle, work / "archive-extra"), model=MODEL, version=version,
                    model_store=work / "store")
    registry.log_to_run(run_id, files=[mar.path, bundle.meta_file], artifact_path="torchserve")
    suite_file = work / "reports" / "expectation_suite.json"
    suite_file.write_text(json.dumps(suite_to_json(build_suite(reference, [f"f{i}" for i in range(N_FEATURES)]))))
    registry.log_to_run(run_id, files=[suite_file], artifact_path="gates/data")
    registry.set_tags(MODEL, version, {"canaryflow.release_run": run_id, "canaryflow.status": "released"})
    # what the release pipeline leaves for the champion: the seal that batch scoring checks the archive against
    seal.seal_champion(registry, StatePaths(work / "state"), MODEL, version, mar.path)
    registry.set_alias(MODEL, "champion", version)
    return {"version": version, "variant": result.variant, "batch_variant": result.batch_variant,
            "holdout_accuracy": round(acc, 4),
            "optimization": [{k: r.get(k) for k in ("variant", "status", "p50_b64_ms", "batch_rows",
                                                    "batch_rows_per_s", "max_abs_diff")} for r in result.table]}


# -- the two contenders, each in its own process -----------------------------------------------------------
def _plan(data: Path, out: Path, state: Path, tracking_uri: str) -> tuple[Any, Any, Any]:
    """(settings, the champion's batch model, the job): what both canaryflow contenders start from."""
    from canaryflow.batch.io import discover
    from canaryflow.batch.model import fetch_model, resolve_version
    from canaryflow.batch.run import plan_job
    from canaryflow.core.paths import StatePaths
    from canaryflow.core.registry import MlflowRegistry
    from canaryflow.core.settings import Settings

    settings = Settings(state_dir=state)
    registry = MlflowRegistry(tracking_uri)
    version = resolve_version(registry, MODEL, "champion", None)
    model = fetch_model(registry, MODEL, version, "champion", state / "work", paths=StatePaths(state))
    job = plan_job(settings, model, str(data), discover(str(data)), output_dir=str(out), chunk_rows=CHUNK_ROWS)
    return settings, model, job


def _measured(job: Any, settings: Any, model: Any, stats: dict[str, float], started: float, scoring_s: float,
              setup_rss: float, rss: RssPeak) -> dict[str, Any]:
    from canaryflow.batch.run import finish

    summary = finish(job, settings, stats, started=started)
    assert summary["rows_scored"] == summary["rows_in"], summary
    return {"rows": summary["rows_in"], "scoring_s": scoring_s, "end_to_end_s": time.monotonic() - started,
            "setup_rss_mb": setup_rss, "scoring_peak_rss_mb": rss.peak, "scoring_cpu_s": rss.cpu,
            "variant": model.variant, "drift": summary["drift"]["outcome"], "parts": summary["parts"]}


def run_canaryflow(data: Path, out: Path, state: Path, tracking_uri: str) -> dict[str, Any]:
    from canaryflow.batch.run import ThreadExecutor, run_chunks
    from canaryflow.batch.scorer import scorer_for

    started = time.monotonic()
    settings, model, job = _plan(data, out, state, tracking_uri)
    scorer_for(model, job.score_rows, job.max_parallel)  # load the model before the clock, as the pyfunc side does
    setup_rss = _rss_mb()
    executor = ThreadExecutor(job.max_parallel)
    t0 = time.monotonic()
    with RssPeak() as rss:
        stats = run_chunks(job, executor)
    scoring_s = time.monotonic() - t0
    executor.close()
    return _measured(job, settings, model, stats, started, scoring_s, setup_rss, rss)


def run_dask(data: Path, out: Path, state: Path, tracking_uri: str) -> dict[str, Any]:
    """canaryflow on a Dask cluster on loopback: a scheduler and 2 single-thread worker processes (LocalCluster,
    the same processes ``dask scheduler`` / ``dask worker`` start); this process reads and keeps the manifest, the
    workers check, score and write. RSS is this process plus the workers."""
    from distributed import LocalCluster

    from canaryflow.batch.cluster import DaskExecutor
    from canaryflow.batch.run import run_chunks

    started = time.monotonic()
    settings, model, job = _plan(data, out, state, tracking_uri)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                      memory_limit=0) as cluster:
        executor = DaskExecutor(cluster.scheduler_address)
        executor.client.run(_load_scorer, model, job.score_rows)  # load the model before the clock, on each worker
        setup_rss = _rss_mb(children=True)
        t0 = time.monotonic()
        with RssPeak(children=True) as rss:
            stats = run_chunks(job, executor)
        scoring_s = time.monotonic() - t0
        executor.close()
    return _measured(job, settings, model, stats, started, scoring_s, setup_rss, rss)


def _load_scorer(model: Any, score_rows: int | None) -> None:
    from canaryflow.batch.scorer import scorer_for

    scorer_for(model, score_rows)


def run_pyfunc(data: Path, out: Path, tracking_uri: str) -> dict[str, Any]:
    import mlflow.pyfunc
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.monotonic()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    model.predict(np.zeros((2, N_FEATURES), np.float32))  # warm, like our scorer's warm-up
    setup_rss = _rss_mb()
    t0, rows, writer = time.monotonic(), 0, None
    out.mkdir(parents=True, exist_ok=True)
    with RssPeak() as rss:
        for batch in pq.ParquetFile(data).iter_batches(batch_size=CHUNK_ROWS):
            df = batch.to_pandas()
            pred = np.asarray(model.predict(df.to_numpy(np.float32)))
            table = pa.table({"row": np.arange(rows, rows + len(df)), "prediction": pred.argmax(1),
                              **{f"score_{k}": pred[:, k] for k in range(pred.shape[1])}})
            writer = writer or pq.ParquetWriter(out / "predictions.parquet", table.schema)
            writer.write_table(table)
            rows += len(df)
        writer.close()
    scoring_s = time.monotonic() - t0
    return {"rows": rows, "scoring_s": scoring_s, "end_to_end_s": time.monotonic() - started,
            "setup_rss_mb": setup_rss, "scoring_peak_rss_mb": rss.peak, "scoring_cpu_s": rss.cpu}


def _rss_mb(children: bool = False) -> float:
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)] if children else [me]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def _cpu_s(children: bool = False) -> float:
    """CPU seconds (user + system) of this process and, with ``children``, its worker processes: what the work
    cost whatever else the shared machine runs meanwhile."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)] if children else [me]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _peak_rss_mb() -> float:
    """VmHWM: this process's own high-water mark. Not ru_maxrss: Linux carries the parent's peak across
    fork + exec into it, so every worker reported the orchestrator's 1.2 GB (it held the generated data)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssPeak:
    """The highest RSS seen every 20 ms while the block runs (the scoring phase alone)."""

    def __init__(self, children: bool = False) -> None:
        self.children = children

    def __enter__(self) -> RssPeak:
        import threading

        self.peak, self._stop = _rss_mb(self.children), threading.Event()
        self.cpu = -_cpu_s(self.children)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb(self.children))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb(self.children))
        self.cpu += _cpu_s(self.children)


def worker(args: argparse.Namespace) -> None:
    os.chdir(args.work)  # MLflow's defaults write ./mlruns: keep everything under the bench's directory
    data, out, uri = Path(args.data), Path(args.out), args.tracking_uri
    state = Path(args.work) / "state"
    if args.approach == "canaryflow":
        result = run_canaryflow(data, out, state, uri)
    elif args.approach == "dask":
        result = run_dask(data, out, state, uri)
    else:
        result = run_pyfunc(data, out, uri)
    result["peak_rss_mb"] = _peak_rss_mb() if args.approach != "dask" else result["scoring_peak_rss_mb"]
    result["rows_per_s"] = result["rows"] / result["scoring_s"]
    result["rows_per_cpu_s"] = result["rows"] / max(result["scoring_cpu_s"], 1e-9)
    print("RESULT " + json.dumps(result), flush=True)


def measure(approach: str, data: Path, work: Path, tracking_uri: str) -> dict[str, Any]:
    out = work / f"out-{approach}-{data.stem}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--worker", approach, "--data", str(data), "--out", str(out), "--work",
           str(work), "--tracking-uri", tracking_uri]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "DO_NOT_TRACK": "1", "MLFLOW_ENABLE_TELEMETRY": "false"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{approach} on {data.name} failed ({done.returncode}): {done.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200k and 800k rows")
    parser.add_argument("--rows", type=int, nargs="+", help="row counts (default 1M and 4M)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--no-dask", action="store_true", help="skip the Dask row")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per approach and size, alternating; the fastest counts (a shared machine)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    for hidden in ("--data", "--out", "--work", "--tracking-uri"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.approach = args.worker
        return worker(args)

    sizes = args.rows or ([200_000, 800_000] if args.quick else [1_000_000, 4_000_000])
    approaches = ["pyfunc", "canaryflow"] + ([] if args.no_dask or not _has_dask() else ["dask"])
    begun = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="canaryflow-batch-bench-", dir="/tmp"))
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    os.chdir(work)
    try:
        log(f"work dir {work}; training, logging and releasing {MODEL}")
        release = train_and_release(work, tracking_uri)
        log(f"released v{release['version']}: serving variant {release['variant']}, batch variant "
            f"{release['batch_variant']}")
        runs = []
        for rows in sizes:
            data = work / f"data-{rows}.parquet"
            make_data(data, rows, seed=rows)
            log(f"{rows:,} rows x {N_FEATURES}: {data.stat().st_size / 2**20:.0f} MiB of Parquet")
            best: dict[str, dict[str, Any]] = {}
            for _ in range(max(args.repeat, 1)):
                for approach in approaches:
                    result = measure(approach, data, work, tracking_uri)
                    log(f"  {approach:>10}: {result['rows_per_s']:>10,.0f} rows/s, peak RSS while scoring "
                        f"{result['scoring_peak_rss_mb']:,.0f} MB, whole process {result['peak_rss_mb']:,.0f} MB "
                        f"(after model load {result['setup_rss_mb']:,.0f} MB)")
                    if approach not in best or result["rows_per_s"] > best[approach]["rows_per_s"]:
                        best[approach] = result
            runs += [{"approach": a, **best[a]} for a in approaches]
            data.unlink()
        report(runs, release, sizes, time.monotonic() - begun)
    finally:
        if not args.keep:
            os.chdir(PROJECT)
            shutil.rmtree(work, ignore_errors=True)


def _has_dask() -> bool:
    import importlib.util

    return importlib.util.find_spec("distributed") is not None


def report(runs: list[dict[str, Any]], release: dict[str, Any], sizes: list[int], seconds: float) -> None:
    print()
    print(f"{'rows':>10} {'approach':>10} {'rows/s':>10} {'rows/CPU-s':>11} {'RSS scoring':>12} {'RSS process':>12} "
          f"{'RSS setup':>10} {'scoring s':>10} {'end-to-end s':>13}")
    for r in runs:
        print(f"{r['rows']:>10,} {r['approach']:>10} {r['rows_per_s']:>10,.0f} {r['rows_per_cpu_s']:>11,.0f} "
              f"{r['scoring_peak_rss_mb']:>12,.0f} {r['peak_rss_mb']:>12,.0f} {r['setup_rss_mb']:>10,.0f} "
              f"{r['scoring_s']:>10.1f} {r['end_to_end_s']:>13.1f}")
    by = {(r["approach"], r["rows"]): r for r in runs}
    ratios = {}
    ours_all = [a for a in ("canaryflow", "dask") if any(r["approach"] == a for r in runs)]
    for rows in sizes:
        theirs = by[("pyfunc", rows)]
        for approach in ours_all:
            ours = by[(approach, rows)]
            ratios[f"{rows}/{approach}"] = ratio = {
                "rows_per_s": ours["rows_per_s"] / theirs["rows_per_s"],
                "rows_per_cpu_s": ours["rows_per_cpu_s"] / theirs["rows_per_cpu_s"],
                "scoring_peak_rss": ours["scoring_peak_rss_mb"] / theirs["scoring_peak_rss_mb"]}
            print(f"{rows:>10,} {approach} / pyfunc: {ratio['rows_per_s']:.2f}x rows/s, "
                  f"{ratio['rows_per_cpu_s']:.2f}x rows per CPU-second, {ratio['scoring_peak_rss']:.2f}x peak RSS "
                  "while scoring")
    small, large = sizes[0], sizes[-1]
    growth = {a: by[(a, large)]["scoring_peak_rss_mb"] - by[(a, small)]["scoring_peak_rss_mb"] for a in ours_all}
    for approach, mb in growth.items():
        print(f"{approach} peak RSS while scoring, {small:,} -> {large:,} rows: {mb:+,.0f} MB "
              f"(input {large / small:.0f}x larger); batch variant {release['batch_variant']}")
    print(f"bench took {seconds:.0f} s")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    result = {"when": stamp, "machine": {"cpus": os.cpu_count()}, "model": "MLP 20-256-256-2",
              "chunk_rows": CHUNK_ROWS, "release": release, "runs": runs, "ratios": ratios,
              "canaryflow_rss_growth_mb": growth.get("canaryflow"), "rss_growth_mb": growth, "seconds": seconds}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in (f"batch-{stamp}.json", "batch-latest.json"):
        (RESULTS / name).write_text(json.dumps(result, indent=2))
    log(f"results in {RESULTS / f'batch-{stamp}.json'}")


if __name__ == "__main__":
    main()
