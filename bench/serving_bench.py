"""Serving benchmark: our endpoint (nginx router -> TorchServe, released by the real pipeline) against
``mlflow models serve`` of the SAME MLflow model version, on the same load, in one process run; and, in the same
run, TorchServe direct (same version, its inference key) to measure the router's own cost. A batched version is
served adaptively (the router sends lone requests to its own registration and overlapping ones to its batched twin):
direct then loads the registration the router uses at that load, the version's own at one connection and the twin
at more.

    .venv/bin/python bench/serving_bench.py            # 8 s per point: 3 models x 3 concurrencies x 3 targets
    .venv/bin/python bench/serving_bench.py --quick    # 3 s per point, shorter training

Load: Debian ``wrk`` with a Lua POST script (one fixed 1-row body), ``--latency``, and a Lua ``done()`` that prints
p50/p95/p99, requests and errors as JSON. With 2+ cores the server side is pinned to core 0 and wrk (plus the idle
stack services: MLflow, Prefect, bridge) to core 1; the router and TorchServe SHARE core 0. See bench/README.md.
Every process started here is stopped at the end, on error too (mlflow serve by process group, the stack by
``LocalStack.down()``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:  # run as a script: bench/ is not a package
    sys.path.insert(0, str(PROJECT))

from bench.models import (  # noqa: E402
    TEXT_CLASSES,
    TEXT_D,
    TEXT_LAYERS,
    TEXT_SEQ,
    DigitsCNN,
    TextClassifier,
    text_dataset,
)
from canaryflow.core.settings import OptimizationSettings, Ports, Settings  # noqa: E402
from canaryflow.local.demo import log_trained, pinned_requirements, register_model, wait_for_release  # noqa: E402
from canaryflow.local.stack import LocalStack  # noqa: E402
from canaryflow.model.datasets import frame, log_release_datasets  # noqa: E402

RESULTS = PROJECT / "bench" / "results"
SERVER_CORE, CLIENT_CORE = 0, 1
OPTIMIZATION_ARTIFACTS = ("optimization/variants.json", "optimization/optimization.json")
MODELS = {"mlp": "bench-mlp-breast-cancer", "cnn": "bench-cnn-digits", "transformer": "bench-transformer-text"}
TARGETS = ("ours", "direct", "mlflow")  # router -> TorchServe, TorchServe direct, mlflow models serve
# the text classifier: token ids in, 4 classes out (a real encoder architecture, trained a few seconds)
WRK_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
{headers}wrk.body = [==[{body}]==]

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {{"requests": %d, "duration_us": %d, "bytes": %d, '
    .. '"errors": {{"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}, '
    .. '"latency_us": {{"p50": %.1f, "p90": %.1f, "p95": %.1f, "p99": %.1f, "max": %.1f, "mean": %.1f}}}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(95), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the compute-heavy model -------------------------------------------------------------------------------
def register_digits_cnn(tracking_uri: str, name: str, epochs: int, seed: int = 0) -> tuple[str, np.ndarray, float]:
    """A CNN on sklearn's bundled digits behind our tabular contract: 64 floats in, 10 logits out.

    The rows are reshaped to 1x8x8 and upsampled to 32x32 inside the model, then 4 convolutions (32-64
    channels): about 2 ms per 1-row inference on one CPU core, so compute is a real share of a request.
    """
    import mlflow
    import torch
    from mlflow.models import infer_signature
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X.astype(np.float32), y, test_size=0.25, random_state=seed,
                                              stratify=y)
    torch.manual_seed(seed)

    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(X_tr), torch.from_numpy(y_tr).long()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(X_te)).argmax(1).numpy() == y_te).mean())
        logits = model(torch.from_numpy(X_te[:5])).numpy()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("canaryflow-bench")
    with mlflow.start_run(run_name=f"train-{name}"):
        mlflow.log_metric("holdout_accuracy", acc)
        log_release_datasets(frame(X_tr, y_tr), frame(X_te, y_te))  # reference + holdout for the release gates
        # >= 2 example rows: MLflow's pt2 export keeps the batch dimension dynamic (shared/FACTS.md)
        info = mlflow.pytorch.log_model(model, name="model", signature=infer_signature(X_te[:5], logits),
                                        input_example=X_te[:5], registered_model_name=name,
                                        pip_requirements=pinned_requirements("mlflow", "torch", "numpy"))
    return str(info.registered_model_version), X_te, acc


def train_text_transformer(steps: int, seed: int = 0) -> tuple[Any, tuple[np.ndarray, np.ndarray],
                                                                 tuple[np.ndarray, np.ndarray], float]:
    """A pre-norm ``nn.TransformerEncoder`` text classifier (embedding + learned positions, 3 layers, d_model 192,
    4 heads, mean pooling, linear head) on :func:`text_dataset`. The encoder keeps its random initialisation
    (training it costs minutes on 2 shared cores; serving cost is the same); only the head is fitted, ``steps``
    full-batch Adam steps on the pooled features. Returns (model, train, holdout, accuracy)."""
    import torch
    from torch import nn

    rng = np.random.default_rng(seed)
    (X_tr, y_tr), (X_te, y_te) = text_dataset(2000, rng), text_dataset(400, rng)
    torch.manual_seed(seed)
    model = TextClassifier()
    model.eval()
    with torch.no_grad():
        pooled = torch.cat([model.encoder(model.tokens(c.long()) + model.positions).mean(dim=1)
                            for c in torch.from_numpy(X_tr).split(256)])
    opt = torch.optim.Adam([*model.norm.parameters(), *model.head.parameters()], lr=1e-2)
    yt = torch.from_numpy(y_tr).long()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model.head(model.norm(pooled)), yt).backward()
        opt.step()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(X_te)).argmax(1).numpy() == y_te).mean())
    return model, (X_tr, y_tr), (X_te, y_te), acc


def register_text_transformer(tracking_uri: str, name: str, steps: int) -> tuple[str, np.ndarray, float]:
    """Train, log (pt2, MLflow's default) and register the text classifier; (version, holdout rows, accuracy)."""
    import mlflow

    model, train, holdout, acc = train_text_transformer(steps)
    model_uri = log_trained(tracking_uri, "canaryflow-bench", name, model, train, holdout, acc)
    return str(mlflow.register_model(model_uri, name).version), holdout[0], acc


# -- processes -----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_settings(state_dir: Path) -> Settings:
    names = [n for n in Ports.model_fields if n != "torchserve_worker_base"]
    socks = [socket.socket() for _ in names]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        ports = {n: s.getsockname()[1] for n, s in zip(names, socks, strict=True)}
    finally:
        for s in socks:
            s.close()
    # every variant the pipeline can build, onnx_int8_static included (not in the default list yet)
    variants = list(dict.fromkeys([*OptimizationSettings().variants, "onnx_int8_static"]))
    # TorchServe's Python worker ports: a block away from the test suite's (20000-28000)
    return Settings(state_dir=state_dir, ports=Ports(**ports, torchserve_worker_base=30000 + (os.getpid() % 100) * 20),
                    optimization=OptimizationSettings(variants=variants))


def pin_tree(pid: int, cpus: set[int]) -> int:
    """Pin every thread of ``pid`` and its descendants (``taskset -a -p``); returns the threads pinned."""
    pinned = 0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for proc in procs:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{proc.pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)
                    pinned += 1
    return pinned


def tree_rss_mb(pid: int) -> float:
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        return round(sum(p.memory_info().rss for p in procs) / 2**20, 1)
    except psutil.NoSuchProcess:
        return 0.0


class Pinning:
    """Server side on one core, client and idle services on another; a no-op below 2 cores."""

    def __init__(self, enabled: bool) -> None:
        cores = sorted(os.sched_getaffinity(0))
        self.enabled = enabled and len(cores) >= 2 and shutil.which("taskset") is not None
        self.server = {cores[SERVER_CORE]} if self.enabled else set(cores)
        self.client = {cores[CLIENT_CORE]} if self.enabled else set(cores)
        self.cores = len(cores)

    def stack(self, stack: LocalStack) -> dict[str, int]:
        """Pin the stack: TorchServe and the router to the server core, the rest to the client core.
        Returns the threads pinned per program."""
        if not self.enabled:
            return {}
        server = ("torchserve", "router")
        return {info["name"]: pin_tree(info["pid"], self.server if info["name"] in server else self.client)
                for info in stack.supervisor.processes() if info.get("pid")}

    def prefix(self, cpus: set[int]) -> list[str]:
        return ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if self.enabled else []


def start_mlflow_serve(uri: str, name: str, version: str, pinning: Pinning,
                       log_file: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow models serve`` of models:/name/version in its own process group; returns (process, url)."""
    port = free_port()
    cmd = [*pinning.prefix(pinning.server), str(Path(sys.executable).parent / "mlflow"), "models", "serve",
           "-m", f"models:/{name}/{version}", "--env-manager", "local", "--port", str(port),
           "--host", "127.0.0.1", "--workers", "1"]
    # one intra-op thread, as every TorchServe worker has (OMP_NUM_THREADS=1 in deployments/torchserve.py)
    # it execs `uvicorn` by name: the venv's bin must be on PATH
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
    with log_file.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we started (pgid == its pid), SIGKILL what is left after 15 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        proc.poll()  # reaps the leader, so it does not count as alive
        if not any(p.info["status"] != psutil.STATUS_ZOMBIE for p in _group(proc.pid)):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _group(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error):
            if os.getpgid(p.pid) == pgid:
                out.append(p)
    return out


def wait_answering(url: str, body: dict, n_rows: int, timeout_s: float, exited: Callable[[], str | None]) -> None:
    """Wait until ``url`` answers ``body`` with one prediction per row; ``exited`` says why the server died."""
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        if (why := exited()) is not None:
            raise RuntimeError(f"{url}: server exited before answering: {why}")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            resp = httpx.post(url, json=body, timeout=10)
            preds = resp.json().get("predictions") if resp.status_code == 200 else None
            if isinstance(preds, list) and len(preds) == n_rows:
                return
            last = f"HTTP {resp.status_code}: {resp.text[:200]}"
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s: {last}")


# -- load --------------------------------------------------------------------------------------------------
def run_wrk(url: str, lua: Path, connections: int, duration_s: float, pinning: Pinning) -> dict[str, Any]:
    cmd = [*pinning.prefix(pinning.client), "wrk", "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--latency",
           "--timeout", "10s", "-s", str(lua), url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {(done.stdout + done.stderr)[-800:]}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    lat, seconds = raw["latency_us"], raw["duration_us"] / 1e6
    return {"connections": connections, "requests": raw["requests"], "errors": sum(raw["errors"].values()),
            "error_kinds": raw["errors"], "rps": round(raw["requests"] / seconds, 1),
            **{f"{k}_ms": round(lat[k] / 1000, 3) for k in ("p50", "p90", "p95", "p99", "max", "mean")}}


def ratios(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, float | None]:
    def r(a: float, b: float) -> float | None:
        return round(a / b, 2) if b else None

    return {**{k: r(ours[f"{k}_ms"], peer[f"{k}_ms"]) for k in ("p50", "p95", "p99")},
            "rps": r(ours["rps"], peer["rps"])}


# -- reporting ---------------------------------------------------------------------------------------------
def optimization_of(uri: str, name: str, version: str, dst: Path) -> Any | None:
    """The optimization table the version's release run logged (``optimization/variants.json``, or the
    ``optimization/optimization.json`` canaryflow.gates writes), or None when the release logged none."""
    import mlflow.artifacts
    from mlflow import MlflowClient

    run_id = MlflowClient(uri).get_model_version(name, version).tags.get("canaryflow.release_run")
    for artifact in OPTIMIZATION_ARTIFACTS if run_id else ():
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(dst),
                                                       tracking_uri=uri)
        except Exception:  # absent artifact: MLflow raises its own exception types, which vary by store
            continue
        return {"artifact": artifact, **_as_dict(json.loads(Path(path).read_text()))}
    return None


def tuning_of(uri: str, name: str, version: str, dst: Path) -> dict[str, Any] | None:
    """The serving settings the release measured and chose (``load_test/tuning.json``), None when it tried none."""
    import mlflow.artifacts
    from mlflow import MlflowClient

    run_id = MlflowClient(uri).get_model_version(name, version).tags.get("canaryflow.release_run")
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="load_test/tuning.json",
                                                   dst_path=str(dst), tracking_uri=uri)
    except Exception:  # absent artifact: MLflow raises its own exception types, which vary by store
        return None
    return json.loads(Path(path).read_text())


def format_tuning(data: dict[str, Any] | None) -> str:
    if data is None:
        return "  serving settings: serving.* (the release tried none)"
    tried = "; ".join(f"{t['label']}: {t['rps']:g} req/s, p50 {t['p50_ms']:g} ms, p95 {t['p95_ms']:g} ms"
                      for t in data["trials"])
    return (f"  serving settings (the release's load test, at its offered load, while the other models released): "
            f"{data['reason']}\n    tried: {tried}")


def _as_dict(data: Any) -> dict[str, Any]:
    return data if isinstance(data, dict) else {"variants": data}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value) if not isinstance(value, dict | list) else json.dumps(value)
    return text if len(text) <= 70 else text[:67] + "..."


def format_optimization(data: Any | None) -> str:
    """A text table of whatever list of variant records the release logged (its format is the release's)."""
    if data is None:
        return f"  optimization: not logged (the release run holds none of {', '.join(OPTIMIZATION_ARTIFACTS)})"
    key = next((k for k in ("variants", "table") if k in data), None)
    rows = data[key] if key else {k: v for k, v in data.items() if k != "artifact"}
    if isinstance(rows, dict):
        rows = [{"variant": k, **v} if isinstance(v, dict) else {"variant": k, "value": v} for k, v in rows.items()]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows) or not rows:
        return "  optimization (raw): " + json.dumps(data)[:600]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    table = [cols] + [[_cell(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(cols))]
    lines = ["  " + "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)) for row in table]
    extra = []
    if "chosen" in data:
        extra.append(f"  chosen: {data['chosen']}")
    if isinstance(data.get("gate"), dict):
        extra.append(f"  gate: {data['gate'].get('outcome')}: {data['gate'].get('reason')}")
    return "\n".join([f"  optimization (release run, {data['artifact']}):", *lines, *extra])


def format_model(m: dict[str, Any]) -> str:
    head = (f"{m['name']} v{m['version']}  {m['description']}  [{m['rows_per_request']} row/request, "
            f"{m['duration_s']:g} s per point]")
    cols = (f"{'conns':>5} | {'ours p50':>8} {'p95':>7} {'p99':>7} {'req/s':>7} | {'mlflow p50':>10} {'p95':>7} "
            f"{'p99':>7} {'req/s':>7} | {'ratio p50':>9} {'p95':>5} {'p99':>5} {'req/s':>5} | errors o/m")
    lines = [head, cols, "-" * len(cols)]
    for ours, peer, ratio in zip(m["ours"]["points"], m["mlflow"]["points"], m["ratios"], strict=True):
        lines.append(f"{ours['connections']:>5} | {ours['p50_ms']:>8.2f} {ours['p95_ms']:>7.2f} {ours['p99_ms']:>7.2f} "
                     f"{ours['rps']:>7.0f} | {peer['p50_ms']:>10.2f} {peer['p95_ms']:>7.2f} {peer['p99_ms']:>7.2f} "
                     f"{peer['rps']:>7.0f} | {_r(ratio['p50']):>9} {_r(ratio['p95']):>5} {_r(ratio['p99']):>5} "
                     f"{_r(ratio['rps']):>5} | {ours['errors']}/{peer['errors']}")
    if "router_overhead" in m:
        lines.append(format_router(m))
    lines.append(f"  serving RSS: ours {m['ours']['rss_mb']} MB (TorchServe, all its workers, + nginx), "
                 f"mlflow serve {m['mlflow']['rss_mb']} MB")
    lines.append(format_tuning(m.get("tuning")))
    lines.append(format_optimization(m["optimization"]))
    return "\n".join(lines)


def format_router(m: dict[str, Any]) -> str:
    """The router-overhead table: ours (router -> TorchServe) vs TorchServe direct, same version, same run."""
    cols = (f"{'conns':>5} | {'router p50':>10} {'p95':>7} {'p99':>7} {'req/s':>7} | {'direct p50':>10} {'p95':>7} "
            f"{'p99':>7} {'req/s':>7} | {'ratio p50':>9} {'p95':>5} {'p99':>5} {'req/s':>5} | "
            f"{'added p50 ms':>12} | errors r/d")
    twin = " (direct above one connection: its batched twin, as the router)" if m["direct"].get("batched_url") else ""
    lines = ["  router overhead: ours (nginx router -> TorchServe) / TorchServe direct (same version, its key)" + twin,
             cols, "-" * len(cols)]
    for ours, direct, o in zip(m["ours"]["points"], m["direct"]["points"], m["router_overhead"], strict=True):
        lines.append(f"{ours['connections']:>5} | {ours['p50_ms']:>10.2f} {ours['p95_ms']:>7.2f} "
                     f"{ours['p99_ms']:>7.2f} {ours['rps']:>7.0f} | {direct['p50_ms']:>10.2f} {direct['p95_ms']:>7.2f} "
                     f"{direct['p99_ms']:>7.2f} {direct['rps']:>7.0f} | {_r(o['p50']):>9} {_r(o['p95']):>5} "
                     f"{_r(o['p99']):>5} {_r(o['rps']):>5} | {o['added_p50_ms']:>12.3f} | "
                     f"{ours['errors']}/{direct['errors']}")
    return "\n".join(lines)


def _r(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# -- the run -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 s per point, 1 s warm-up, 1 CNN training epoch")
    p.add_argument("--duration", type=float, default=None, help="seconds per point (default 8, quick 3)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per server (default 3, quick 1)")
    p.add_argument("--connections", default="1,8,32", help="wrk connection counts (default 1,8,32)")
    p.add_argument("--models", default=",".join(MODELS), help=f"which of {','.join(MODELS)} (default all)")
    p.add_argument("--no-direct", action="store_true",
                   help="skip TorchServe direct (the router-overhead table)")
    p.add_argument("--rows-per-request", type=int, default=1)
    p.add_argument("--epochs", type=int, default=None, help="CNN training epochs (default 2, quick 1)")
    p.add_argument("--no-pin", action="store_true", help="do not pin servers and wrk to separate cores")
    p.add_argument("--keep-state", action="store_true", help="keep the temporary stack state dir (logs)")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 8.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    args.epochs = args.epochs or (1 if args.quick else 2)
    args.connections = [int(c) for c in args.connections.split(",")]
    args.models = [m.strip() for m in args.models.split(",")]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {sorted(MODELS)}")
    return args


def release_models(stack: LocalStack, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Register each model in the stack's MLflow; the webhook starts the real release flow; wait for it."""
    uri = stack.settings.mlflow_uri
    models = []
    # the CNN trains longest: register it last, so the other releases run while it trains
    for key in sorted(args.models, key=lambda k: k == "cnn"):
        started = time.monotonic()
        if key == "mlp":
            version, rows, acc = register_model(uri, name=MODELS[key])
            desc = "breast-cancer MLP 30-64-32-2 (canaryflow.demo): HTTP dominates"
        elif key == "cnn":
            version, rows, acc = register_digits_cnn(uri, MODELS[key], args.epochs)
            desc = "digits CNN 64 -> 1x8x8 -> 32x32, 4 convs 32-64 ch: compute is a real share"
        else:
            version, rows, acc = register_text_transformer(uri, MODELS[key], steps=200)
            desc = (f"text transformer, {TEXT_SEQ} token ids -> {TEXT_LAYERS} encoder layers d{TEXT_D} -> "
                    f"{TEXT_CLASSES} classes (pt2): compute dominates")
        log(f"registered {MODELS[key]} v{version} (holdout accuracy {acc:.3f}, {time.monotonic() - started:.0f} s)")
        models.append({"key": key, "name": MODELS[key], "version": version, "rows": rows, "accuracy": acc,
                       "description": desc})
    for m in models:
        outcome = wait_for_release(uri, m["name"], m["version"], timeout_s=900)
        if outcome.status != "released":
            raise RuntimeError(f"release of {m['name']} v{m['version']} ended {outcome.status}: {outcome.reason}")
        log(f"{m['name']} v{m['version']} released through the pipeline (waited {outcome.seconds:.0f} s)")
    return sorted(models, key=lambda m: args.models.index(m["key"]))


def target_urls(stack: LocalStack, m: dict[str, Any], direct: bool) -> dict[str, tuple[str, dict[str, str]]]:
    """Each target's URL and extra headers: the router (what clients use), TorchServe's inference API for the
    same version (with the inference key the router otherwise adds), and mlflow serve."""
    from deployments.torchserve import read_keys

    urls = {"ours": (f"{stack.settings.router_url}/predictions/{m['name']}", {})}
    if direct:
        path = f"/predictions/{m['name']}/{m['version']}"
        key = read_keys(stack.paths)["inference"]
        urls["direct"] = (stack.settings.url("torchserve_inference", path), {"Authorization": f"Bearer {key}"})
    urls["mlflow"] = (f"{m['mlflow_url']}/invocations", {})
    return urls


def direct_batched_url(stack: LocalStack, m: dict[str, Any]) -> str | None:
    """TorchServe's URL of the version's batched twin when the release chose batching (adaptive batching: the
    router sends overlapping requests there and lone ones to the version), else None."""
    from deployments.torchserve import batched_twins

    for model, version, twin in batched_twins(stack.paths):
        if (model, version) == (m["name"], m["version"]):
            return stack.settings.url("torchserve_inference", f"/predictions/{twin}/{version}")
    return None


def measure(m: dict[str, Any], urls: dict[str, tuple[str, dict[str, str]]], work: Path, pinning: Pinning,
            args: argparse.Namespace, batched_url: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """wrk against every target at every concurrency, alternating targets at each concurrency. With
    ``batched_url``, "direct" is the registration the router sends that load to: the version's own at one
    connection (nothing else in flight), its batched twin at more."""
    rows = np.round(np.asarray(m["rows"][: args.rows_per_request], dtype=np.float64), 4).tolist()
    body = json.dumps({"inputs": rows})
    luas: dict[str, Path] = {}
    for label, (_, headers) in urls.items():
        luas[label] = work / f"post-{m['key']}-{label}.lua"
        extra = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
        luas[label].write_text(WRK_LUA.format(body=body, headers=extra))
        luas[label].chmod(0o600)  # it may hold TorchServe's inference key
    points: dict[str, list[dict[str, Any]]] = {label: [] for label in urls}
    for label, (url, _) in urls.items():
        run_wrk(url, luas[label], 8, args.warmup, pinning)
    for conns in args.connections:
        for label, (url, _) in urls.items():
            if label == "direct" and batched_url and conns > 1:
                url = batched_url
            point = run_wrk(url, luas[label], conns, args.duration, pinning)
            log(f"{m['name']} {label:>6} c={conns:<3} p50 {point['p50_ms']:.2f} ms p99 {point['p99_ms']:.2f} ms "
                f"{point['rps']:.0f} req/s errors {point['errors']}")
            points[label].append(point)
    return points


def router_overhead(ours: list[dict[str, Any]], direct: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per concurrency: ratios router / direct and the router's added latency (ms) at p50/p95/p99."""
    return [{"connections": o["connections"], **ratios(o, d),
             **{f"added_{k}_ms": round(o[f"{k}_ms"] - d[f"{k}_ms"], 3) for k in ("p50", "p95", "p99")}}
            for o, d in zip(ours, direct, strict=True)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally block on `kill` too
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    pinning = Pinning(not args.no_pin)
    work = Path(tempfile.mkdtemp(prefix="canaryflow-bench-"))
    stack = LocalStack(bench_settings(work / ".canaryflow"))
    serves: dict[str, subprocess.Popen] = {}
    ok = False
    try:
        log(f"starting a local stack in {work} (cores: {pinning.cores}, pinning: {pinning.enabled})")
        stack.up(progress=lambda msg: log(f"stack: {msg}"))
        pinning.stack(stack)
        uri = stack.settings.mlflow_uri
        models = release_models(stack, args)
        for m in models:
            m["serve_log"] = work / f"mlflow-serve-{m['key']}.log"
            serves[m["name"]], m["mlflow_url"] = start_mlflow_serve(uri, m["name"], m["version"], pinning,
                                                                     m["serve_log"])
        pinned = pinning.stack(stack)  # again: TorchServe workers of the released versions
        log(f"threads pinned per program: {pinned}")
        ts_pid = next(p["pid"] for p in stack.supervisor.processes() if p["name"] == "torchserve")
        nginx_pid = next(p["pid"] for p in stack.supervisor.processes() if p["name"] == "router")
        report = []
        for m in models:
            body = {"inputs": np.asarray(m["rows"][:2], dtype=np.float64).tolist()}
            urls = target_urls(stack, m, direct=not args.no_direct)
            proc = serves[m["name"]]
            wait_answering(urls["ours"][0], body, 2, 60, lambda: None)
            wait_answering(urls["mlflow"][0], body, 2, 180, lambda p=proc, m=m: None if p.poll() is None else
                           f"exit {p.returncode}: {m['serve_log'].read_text()[-600:]}")
            log(f"measuring {m['name']}: " + ", ".join(f"{k} {u}" for k, (u, _) in urls.items()))
            batched_url = direct_batched_url(stack, m) if "direct" in urls else None
            points = measure(m, urls, work, pinning, args, batched_url)
            entry = {
                "key": m["key"], "name": m["name"], "version": m["version"], "description": m["description"],
                "holdout_accuracy": round(m["accuracy"], 4), "rows_per_request": args.rows_per_request,
                "duration_s": args.duration,
                "ours": {"url": urls["ours"][0], "points": points["ours"],
                         "rss_mb": round(tree_rss_mb(ts_pid) + tree_rss_mb(nginx_pid), 1)},
                "mlflow": {"url": urls["mlflow"][0], "points": points["mlflow"], "rss_mb": tree_rss_mb(proc.pid)},
                "ratios": [{"connections": o["connections"], **ratios(o, p)}
                           for o, p in zip(points["ours"], points["mlflow"], strict=True)],
                "optimization": optimization_of(uri, m["name"], m["version"], work / "optimization" / m["key"]),
                "tuning": tuning_of(uri, m["name"], m["version"], work / "tuning" / m["key"]),
            }
            if "direct" in points:  # the URL only: the key stays out of the results
                entry["direct"] = {"url": urls["direct"][0], "batched_url": batched_url, "points": points["direct"]}
                entry["router_overhead"] = router_overhead(points["ours"], points["direct"])
            report.append(entry)
        write_results(report, pinning, args, pinned)
        ok = True
    finally:
        for proc in serves.values():
            stop_group(proc)
        killed = stack.down()
        if killed:
            log(f"stack: killed after the grace period: {killed}")
        if ok and not args.keep_state:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"state and logs kept in {work}")
    return 0


def write_results(report: list[dict[str, Any]], pinning: Pinning, args: argparse.Namespace,
                  pinned: dict[str, int]) -> None:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    note = (f"server side (nginx router + TorchServe, or mlflow serve) pinned to core {sorted(pinning.server)}; "
            f"wrk and the idle stack services to core {sorted(pinning.client)}; the router and TorchServe share "
            "their core" if pinning.enabled else "not pinned: client and servers share every core")
    out = {"timestamp": stamp, "quick": args.quick, "duration_s": args.duration, "warmup_s": args.warmup,
           "connections": args.connections, "rows_per_request": args.rows_per_request,
           "machine": {"cores": pinning.cores, "pinned": pinning.enabled, "note": note, "pinned_threads": pinned,
                       "wrk": "wrk -t1 --latency, Lua POST script, one fixed body"},
           "models": report}
    print()
    print(f"serving benchmark {stamp}: ratios are ours / mlflow serve (latency: < 1 is better; req/s: > 1 is better)")
    print(f"machine: {pinning.cores} cores; {note}")
    for m in report:
        print()
        print(format_model(m))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(out, indent=2) + "\n"
    (args.results_dir / f"serving-{stamp}.json").write_text(text)
    tmp = args.results_dir / "serving-latest.json.tmp"
    tmp.write_text(text)
    os.replace(tmp, args.results_dir / "serving-latest.json")
    print(f"\nwrote {args.results_dir / f'serving-{stamp}.json'} and serving-latest.json")


if __name__ == "__main__":
    sys.exit(main())
