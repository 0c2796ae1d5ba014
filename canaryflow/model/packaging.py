"""Turn an MLflow PyTorch model into a serving bundle for TorchServe (torch.export program + meta).

MLflow 3.17 saves PyTorch models either pickled or as torch.export ("pt2"); a pt2 model logged with a
1-row input example only accepts batch 1. Both are handled: we re-export with a dynamic batch dimension
and, when the model will not allow that, ship a fixed-batch program that the handler feeds row by row.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from canaryflow.core.errors import PackagingError
from canaryflow.core.serving_contract import BATCH_DIR, META_FILE, ServingMeta, output_kind

MODEL_FILE = "model.pt2"
MIN_EXAMPLE_ROWS = 4  # batch sizes 0 and 1 get specialised by torch.export


@dataclass(frozen=True)
class InputContract:
    """The input part of an MLflow signature, reduced to what a tabular model needs."""

    n_features: int
    feature_names: list[str] | None
    dtype: str


@dataclass(frozen=True)
class Bundle:
    """A directory holding the model file and ``canaryflow.json``."""

    directory: Path
    meta: ServingMeta
    batch: Bundle | None = None  # the variant batch scoring uses, when the optimization chose another one for it

    @classmethod
    def load(cls, directory: Path) -> Bundle:
        """The bundle in ``directory``; ValueError unless its ``canaryflow.json`` names a plain file beside it (a
        bundle a model's code or an archive wrote is untrusted)."""
        meta = ServingMeta.load(directory / META_FILE)
        if Path(meta.model_file).name != meta.model_file or not (directory / meta.model_file).is_file():
            raise ValueError(f"model_file {meta.model_file!r} is not a file of its bundle")
        return cls(directory, meta)

    @property
    def model_file(self) -> Path:
        return self.directory / self.meta.model_file

    @property
    def meta_file(self) -> Path:
        return self.directory / META_FILE


def archive_files(bundle: Bundle, staging: Path) -> list[Path]:
    """What a .mar of ``bundle`` carries beside its model file: the serving meta, and the batch variant's bundle
    as ``batch/`` (staged under ``staging``: the archiver copies a directory's contents to the archive's root)
    when the optimization chose another variant for batch scoring."""
    if bundle.batch is None:
        return [bundle.meta_file]
    shutil.rmtree(staging, ignore_errors=True)
    target = staging / BATCH_DIR
    target.mkdir(parents=True)
    for f in (bundle.batch.model_file, bundle.batch.meta_file):
        shutil.copy2(f, target / f.name)
    return [bundle.meta_file, staging]


def input_contract(model_dir: Path) -> InputContract:
    """Read the signature of a downloaded MLflow model; refuse models without one."""
    from mlflow.models import Model

    sig = Model.load(str(model_dir)).signature
    if sig is None or sig.inputs is None:
        raise PackagingError("the model has no signature: log it with signature= or input_example= so "
                             "canaryflow can check requests against it")
    spec = sig.inputs
    if spec.is_tensor_spec():
        shape = spec.inputs[0].shape
        if len(spec.inputs) != 1 or len(shape) != 2 or shape[1] < 1:
            raise PackagingError(f"tensor input {spec.to_json()} is not one [-1, n_features] tensor")
        return InputContract(int(shape[1]), None, str(spec.inputs[0].type))
    names = spec.input_names()
    types = {str(t) for t in spec.input_types()}
    if not types <= {"float", "double", "integer", "long"}:
        raise PackagingError(f"column types {sorted(types)} are not all numeric; canaryflow serves numeric rows")
    return InputContract(len(names), list(names), "float32")


def example_rows(model_dir: Path, contract: InputContract, min_rows: int = MIN_EXAMPLE_ROWS) -> np.ndarray:
    """The logged input example as float32 rows (tiled to ``min_rows``), or seeded random rows."""
    from mlflow.models import Model

    example = Model.load(str(model_dir)).load_input_example(str(model_dir))
    if example is None:
        rows = np.random.default_rng(0).normal(size=(min_rows, contract.n_features))
    elif hasattr(example, "to_numpy"):
        rows = example.to_numpy()
    else:
        rows = np.asarray(example)
    rows = np.asarray(rows, dtype=np.float32).reshape(-1, contract.n_features)
    return np.tile(rows, (-(-min_rows // len(rows)), 1))[: max(min_rows, len(rows))]


def export_pytorch(model_dir: Path, out_dir: Path, *, name: str, version: str, max_batch_rows: int,
                   output: str | None = None, class_labels: list[str] | None = None,
                   atol: float = 1e-4) -> Bundle:
    """Load the MLflow model, export it with ``torch.export`` and check the export answers the same."""
    contract = input_contract(model_dir)
    model = load_pytorch(model_dir)
    bundle, _ = export_module(model, example_rows(model_dir, contract), out_dir, contract=contract, name=name,
                              version=version, max_batch_rows=max_batch_rows, output=output,
                              class_labels=class_labels, atol=atol)
    return bundle


def load_pytorch(model_dir: Path) -> Any:
    """The MLflow PyTorch model on CPU, in eval mode (a pickled ``nn.Module`` or a pt2 exported module)."""
    import mlflow.pytorch

    model = mlflow.pytorch.load_model(str(model_dir), map_location="cpu")
    try:
        model.eval()
    except NotImplementedError:  # a pt2 model loads as an exported GraphModule: already in eval form
        pass
    return model


def export_module(model: Any, rows: np.ndarray, out_dir: Path, *, contract: InputContract, name: str,
                  version: str, max_batch_rows: int, output: str | None = None,
                  class_labels: list[str] | None = None, atol: float = 1e-4) -> tuple[Bundle, Any]:
    """Export a loaded module with a dynamic batch (fixed batch 1 when it refuses), save it as a bundle and
    check the saved program answers like the module on ``rows`` (at least 2, better 4: torch.export
    specialises batch sizes 0 and 1). Returns the bundle and the ``ExportedProgram``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    fixed_batch: int | None = None
    try:
        with torch.no_grad():
            reference = model(x)
        batch = torch.export.Dim("batch", min=1, max=max(max_batch_rows, 2))
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    except Exception:
        # A pt2 model logged with a 1-row example: its graph guards batch == 1.
        fixed_batch, x = 1, x[:1]
        try:
            with torch.no_grad():
                reference = model(x)
            program = torch.export.export(model, (x,))
        except Exception as exc:
            raise PackagingError(f"torch.export failed for a {list(x.shape)} input: {exc}"[:1000]) from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(out_dir / MODEL_FILE))
    with torch.no_grad():
        again = torch.export.load(str(out_dir / MODEL_FILE)).module()(x)
    diff = float((again - reference).abs().max())
    if diff > atol:
        raise PackagingError(f"exported program differs from the MLflow model: max |diff| {diff:.2e} > {atol:.0e}")
    ref = reference.detach().numpy()
    meta = ServingMeta(model_name=name, model_version=str(version), format="torch_export", model_file=MODEL_FILE,
                       n_features=contract.n_features, feature_names=contract.feature_names,
                       input_dtype="float32", output=output_kind(ref, output), class_labels=class_labels,
                       max_batch_rows=max_batch_rows, fixed_batch=fixed_batch)
    meta.save(out_dir / META_FILE)
    return Bundle(out_dir, meta), program


def labels_from_tag(value: str | None) -> list[str] | None:
    """Class labels from the ``canaryflow.class_labels`` tag: a JSON list or comma-separated."""
    if not value:
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value.split(",")
    return [str(v).strip() for v in parsed]


def cast_module(model: Any, dtype: Any) -> Any:
    """``model`` with its floating parameters and buffers in ``dtype`` (torch.bfloat16, torch.float16), taking and
    returning float32 (its first output): what the optimization's torch_bf16 variant exports.

    Each submodule that holds parameters or buffers of its own casts its floating inputs to ``dtype`` (a forward
    pre-hook); the model's own input is not cast, so a model that reads token ids from its float input still gets
    exact ids (bf16 is exact only up to 256). An exported graph (what an MLflow pt2 model loads as) runs no
    submodule: its input is cast, and the parity gate judges what that does to it."""
    import torch

    def cast_inputs(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    model = model.to(dtype)
    graph = isinstance(model, torch.fx.GraphModule)
    for name, module in model.named_modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if (graph and not name) or (name and any(t.is_floating_point() for t in own)):
            module.register_forward_pre_hook(cast_inputs)

    class Cast(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            out = self.inner(x)
            return (out[0] if isinstance(out, tuple | list) else out).float()

    return Cast(model)
