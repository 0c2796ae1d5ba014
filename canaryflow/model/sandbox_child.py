"""The sandbox's child (see :mod:`canaryflow.model.sandbox`): loads models and answers the parent over two pipes.

Run as ``python -I -m canaryflow.model.sandbox_child IN_FD OUT_FD``. It holds no secret and needs none: every
input comes from the parent (model files copied into its directory, rows in messages).
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from canaryflow.model.sandbox import recv, send


def _optimize(head: dict[str, Any], holdout: np.ndarray) -> dict[str, Any]:
    from mlflow.models import Model

    from canaryflow.core.settings import OptimizationSettings
    from canaryflow.model.optimization import optimize_pytorch
    from canaryflow.model.packaging import InputContract, load_pytorch

    model_dir, out_dir = Path(head["dir"]), Path(head["out_dir"])
    kwargs = dict(head["kwargs"])
    kwargs["settings"] = OptimizationSettings(**kwargs["settings"])
    # The array is the holdout, then (calibration_rows of them) the reference rows that calibrate static int8:
    # parity is measured on rows the calibration never saw.
    n_calibration = int(kwargs.pop("calibration_rows", 0) or 0)
    if n_calibration:
        holdout, kwargs["calibration"] = holdout[:-n_calibration], holdout[-n_calibration:]
    contract = InputContract(**head["contract"])
    flavors = Model.load(str(model_dir)).flavors
    if "pytorch" in flavors:
        result = optimize_pytorch(load_pytorch(model_dir), contract, holdout, out_dir, **kwargs)
    else:
        from canaryflow.model.tf_convert import load_tensorflow, optimize_tensorflow

        result = optimize_tensorflow(load_tensorflow(model_dir), contract, holdout, out_dir, **kwargs)
    return {"variant": result.variant, "batch_variant": result.batch_variant, "table": result.table,
            "gate": result.gate.to_dict(),
            "bundles": [name for name, b in result.bundles.items() if b.directory.parent == out_dir]}


def serve(fd_in: int, fd_out: int) -> None:
    from canaryflow.model.predict import load_predictor

    predictors: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    while True:
        msg = recv(fd_in)
        if msg is None:
            return
        head, array = msg
        out: np.ndarray | None = None
        try:
            op = head.get("op")
            reply: dict[str, Any] = {"ok": True}
            if op == "ping":
                pass
            elif op == "load":
                predictors[str(head["id"])] = load_predictor(Path(head["dir"]))
            elif op == "predict":
                out = np.asarray(predictors[str(head["id"])](np.asarray(array)), dtype=np.float64)
            elif op == "optimize":
                reply |= _optimize(head, np.asarray(array))
            else:
                raise ValueError(f"unknown sandbox operation {op!r}")
        except Exception as exc:  # noqa: BLE001 - the model's error is the answer
            traceback.print_exc()
            reply, out = {"ok": False, "error_type": type(exc).__name__, "error": str(exc)[:2000]}, None
        send(fd_out, reply, out)


def main(argv: list[str]) -> None:
    sys.path[:0] = [p for p in json.loads(argv[3]) if p not in sys.path]
    serve(int(argv[1]), int(argv[2]))


if __name__ == "__main__":
    main(sys.argv)
