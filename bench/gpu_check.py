"""GPU check of the serving path, for a session whose task is lent a GPU machine (the `device` tool).

What it runs: the code a TorchServe worker runs (``CanaryflowHandler``, deployments/handler.py, which puts the
model on ``cuda:<gpu_id>`` when TorchServe gives the worker a GPU) on the bench's three models (bench/models.py:
the tabular MLP, the digits CNN, the text transformer; seeded random weights: parity and latency do not need
trained ones), each exported the way a release exports it: ``torch_fp32`` (canaryflow.model.packaging.export_module)
and the reduced-precision programs (``cast_module``: ``torch_bf16`` as the optimization gate builds it, and fp16).
For every program, on the CPU and on the GPU: parity with the CPU fp32 answers, judged as the release's parity gate
judges a variant (argmax agreement >= 0.99 and max |probability difference| <= 0.05 on 2,048 rows), and the
handler's latency p50/p95 at 1, 64 and 1,024 rows per call. Results: a table on stdout and ``gpu_check.json``.

What it cannot run there: the lent machine has no Java, nginx or package registry, so TorchServe's frontend, its
GPU assignment (``number_of_gpu``), the router and locust are not part of this check; ``make bench`` on a host with
CUDA TorchServe is the end-to-end measurement. ONNX variants run on onnxruntime's CPU provider unless
onnxruntime-gpu is installed, which the lent machine does not have.

Here (prepares what the machine lacks; the handler imports TorchServe's ``ts`` package):

    .venv/bin/python bench/gpu_check.py --prepare      # copies ts (without its Java frontend) into .gpu/site
    .venv/bin/python bench/gpu_check.py --device cpu   # the same check on this machine's CPU

There (one call; its CPU half takes about 3 minutes, the GPU half less; the device's python3 holds CUDA
PyTorch):

    run(command="PYTHONPATH=.gpu/site:. PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT",
        carry=[".gpu"], timeout_s=420)
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:  # run as a script: bench/ is not a package
    sys.path.insert(0, str(PROJECT))

from bench.models import TEXT_SEQ, DigitsCNN, TextClassifier, tabular_mlp, text_dataset  # noqa: E402

PARITY_ROWS = 2048
BATCHES = (1, 64, 1024)
MIN_AGREEMENT, MAX_ABS_DIFF = 0.99, 0.05  # the release's parity gate defaults (OptimizationSettings)
DTYPES = {"torch_fp32": None, "torch_bf16": torch.bfloat16, "torch_fp16": torch.float16}


def prepare(target: Path) -> None:
    """Copy the ``ts`` package of this venv, without its Java frontend (44 MB), to ``target`` (.gpu/ is in
    .gitignore: the device tool carries it only when a call names it)."""
    import ts

    source = Path(ts.__file__).parent
    shutil.rmtree(target / "ts", ignore_errors=True)
    shutil.copytree(source, target / "ts", ignore=shutil.ignore_patterns("frontend", "__pycache__"))
    print(f"copied {source} to {target / 'ts'}; carry .gpu in the device call")


def models(seed: int = 0) -> dict[str, tuple[torch.nn.Module, np.ndarray]]:
    """The bench's three architectures, seeded, with rows of their input space."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    digits = rng.integers(0, 17, size=(PARITY_ROWS, 64)).astype(np.float32)
    return {"mlp": (tabular_mlp(30).eval(), rng.normal(size=(PARITY_ROWS, 30)).astype(np.float32)),
            "cnn": (DigitsCNN().eval(), digits),
            "transformer": (TextClassifier().eval(), text_dataset(PARITY_ROWS, rng)[0])}


def build(name: str, model: torch.nn.Module, rows: np.ndarray, root: Path) -> dict[str, Path]:
    """torch_fp32 exactly as a release exports it, and the bf16/fp16 programs as the optimization builds bf16."""
    from canaryflow.model.packaging import InputContract, cast_module, export_module

    contract = InputContract(rows.shape[1], None, "float32")
    out = {}
    for variant, dtype in DTYPES.items():
        module = model if dtype is None else cast_module(copy.deepcopy(model), dtype)
        bundle, _ = export_module(module, rows[:8], root / variant, contract=contract, name=name, version="1",
                                  max_batch_rows=max(BATCHES), atol=float("inf") if dtype else 1e-4)
        out[variant] = bundle.directory
    return out


def answers(handler: Any, rows: np.ndarray) -> np.ndarray:
    """Probabilities of every row, in calls of the most rows the programs take."""
    step = max(BATCHES)
    return np.concatenate([handler.probabilities(rows[i : i + step]) for i in range(0, len(rows), step)])


def latency(handler: Any, rows: np.ndarray, batch: int, budget_s: float = 1.5) -> dict[str, float]:
    """p50/p95 (ms) of ``handler.probabilities`` at ``batch`` rows (its answer is numpy: the GPU work is done)."""
    x = np.ascontiguousarray(np.resize(rows, (batch, rows.shape[1])))
    for _ in range(2):
        handler.probabilities(x)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 2000):
        start = time.perf_counter()
        handler.probabilities(x)
        times.append(time.perf_counter() - start)
    t = np.asarray(times) * 1e3
    return {f"p50_b{batch}_ms": round(float(np.median(t)), 4),
            f"p95_b{batch}_ms": round(float(np.percentile(t, 95)), 4)}


def check(devices: list[str], out_dir: Path) -> list[dict[str, Any]]:
    from deployments.handler import CanaryflowHandler

    results = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name, (model, rows) in models().items():
            bundles = build(name, model, rows, Path(tmp) / name)
            reference = answers(CanaryflowHandler.for_bundle(bundles["torch_fp32"]), rows)
            for device in devices:
                for variant, directory in bundles.items():
                    row: dict[str, Any] = {"model": name, "variant": variant, "device": device}
                    try:
                        handler = CanaryflowHandler.for_bundle(directory, gpu_id=0 if device == "cuda" else None)
                        row["ran_on"] = str(handler.device)
                        got = answers(handler, rows)
                        agreement = float((got.argmax(1) == reference.argmax(1)).mean())
                        diff = float(np.abs(got - reference).max())
                        row |= {"agreement": round(agreement, 4), "max_abs_diff": round(diff, 5),
                                "parity": "passed" if agreement >= MIN_AGREEMENT and diff <= MAX_ABS_DIFF
                                else "failed"}
                        for batch in BATCHES:
                            row |= latency(handler, rows, batch)
                    except Exception as exc:  # noqa: BLE001 - one variant's failure is a result, not the end
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    results.append(row)
                    print(format_row(row), flush=True)
    (out_dir / "gpu_check.json").write_text(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                                                        "gpu": _gpu_name(), "text_seq": TEXT_SEQ,
                                                        "results": results}, indent=2))
    return results


def format_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['model']:>11} {r['variant']:>10} {r['device']:>4}  error: {r['error']}"
    lat = "  ".join(f"b{b} {r[f'p50_b{b}_ms']:.3f}/{r[f'p95_b{b}_ms']:.3f}" for b in BATCHES)
    return (f"{r['model']:>11} {r['variant']:>10} {r['ran_on']:>6}  parity {r['parity']} (agreement "
            f"{r['agreement']:.4f}, max |dp| {r['max_abs_diff']:.4f})  p50/p95 ms {lat}")


def _gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", action="store_true", help="copy the ts package into .gpu/site and exit")
    parser.add_argument("--device", choices=["cpu", "cuda", "both"], default="both",
                        help="where the handler runs (both: CPU and GPU, the default; cuda needs a GPU)")
    parser.add_argument("--out", type=Path, default=PROJECT / "bench" / "results")
    args = parser.parse_args()
    if args.prepare:
        prepare(PROJECT / ".gpu" / "site")
        return 0
    devices = ["cpu", "cuda"] if args.device == "both" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu, or on the lent GPU machine", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # as TorchServe's workers (OMP_NUM_THREADS=1)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {_gpu_name()}")
    results = check(devices, args.out)
    failed = [r for r in results if r.get("error") or (r["variant"] == "torch_fp32" and r["parity"] != "passed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
