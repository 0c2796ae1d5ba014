"""The candidate's own code runs in a sandbox that cannot read the stack's secrets (canaryflow.model.sandbox).

The models here are MLflow "models from code": the model's Python file travels with the model and runs when it is
loaded and when it predicts, exactly the code a registry user controls.
"""

from __future__ import annotations

import os
import socket
import textwrap
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from canaryflow.model.optimization import from_sandbox
from canaryflow.model.sandbox import ModelCodeError, Sandbox, SandboxError, copy_untrusted

ROOT = os.geteuid() == 0


def _model_from_code(tmp_path: Path, body: str) -> Path:
    """A pyfunc whose ``predict`` runs ``body`` (given ``rows``) and returns what it assigns to ``out``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    code = tmp_path / "model_code.py"
    code.write_text(textwrap.dedent("""
        import os, socket
        import numpy as np
        import mlflow
        from mlflow.pyfunc import PythonModel

        class Model(PythonModel):
            def predict(self, context, model_input, params=None):
                rows = np.asarray(model_input, dtype=np.float32)
        """))
    code.write_text(code.read_text() + textwrap.indent(textwrap.dedent(body).strip("\n") + "\n", " " * 8)
                    + "        return out\n\nmlflow.models.set_model(Model())\n")
    model_dir = tmp_path / "model"
    sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3))]))
    mlflow.pyfunc.save_model(str(model_dir), python_model=str(code), signature=sig)
    return model_dir


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    """A state dir like the stack's: 0700, a 0600 secret inside."""
    state = tmp_path / "state"
    (state / "secrets").mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    secret = state / "secrets" / "state_seal_key"
    secret.write_text("not-for-models")
    secret.chmod(0o600)
    return secret


def test_the_models_code_cannot_read_secrets_see_our_environment_or_reach_the_network(
        tmp_path: Path, secrets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a model's code sees in the sandbox: the secret file, the pipeline's environment, a loopback port, its
    uid. It tells us by raising, the way a gate hears it."""
    monkeypatch.setenv("CANARYFLOW_WEBHOOK_SECRET_PROBE", "x")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    model_dir = _model_from_code(tmp_path, f"""
        try:
            open({str(secrets)!r}).read()
            secret = "READ"
        except OSError as exc:
            secret = type(exc).__name__
        env = sorted(k for k in os.environ if k.startswith(("CANARYFLOW", "PREFECT", "MLFLOW")))
        s = socket.socket()
        s.settimeout(5)
        net = s.connect_ex(("127.0.0.1", {port}))
        raise RuntimeError(f"secret={{secret}} env={{env}} connect={{net}} uid={{os.getuid()}}")
        """)
    with Sandbox("nobody") as sb:
        predict = sb.predictor(model_dir)
        with pytest.raises(ModelCodeError) as err:
            predict(np.zeros((2, 3), dtype=np.float32))
        isolation = sb.isolation
    listener.close()
    assert type(err.value).__name__ == "RuntimeError"  # the gate's reason names the model's own exception
    message = str(err.value)
    assert "env=[]" in message, message
    assert "connect=0" not in message, message  # no network namespace of ours: loopback unreachable
    if ROOT:
        assert "secret=PermissionError" in message and "uid=65534" in message, message
        assert "as user nobody" in isolation and "no network" in isolation
    else:  # documented: without root the child runs as our user
        assert "as the pipeline's own user" in isolation


def test_predictions_and_errors_come_back_and_a_dead_child_is_a_clear_error(tmp_path: Path) -> None:
    fine = _model_from_code(tmp_path / "a", "out = np.stack([rows.sum(axis=1), -rows.sum(axis=1)], axis=1)")
    dies = _model_from_code(tmp_path / "b", "os._exit(3)")
    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    with Sandbox("nobody") as sb:
        got = sb.predictor(fine)(rows)
        assert got.shape == (2, 2) and np.allclose(got.sum(axis=1), 1.0)  # served as probabilities
        with pytest.raises(SandboxError, match="exited"):
            sb.predictor(dies)(rows)
        assert sb.closed


def test_a_link_the_model_planted_is_never_copied_out(tmp_path: Path, secrets: Path) -> None:
    """The parent copies variant files out of the sandbox as a user that can read the secrets: a symlink (or a hard
    link) to a secret must be refused, not followed."""
    out = tmp_path / "out"
    (out / "onnx_fp32").mkdir(parents=True)
    (out / "onnx_fp32" / "model.onnx").write_bytes(b"onnx")
    (out / "onnx_fp32" / "canaryflow.json").symlink_to(secrets)
    with pytest.raises(SandboxError, match="not a plain file"):
        copy_untrusted(out / "onnx_fp32", tmp_path / "copy")
    (out / "onnx_fp32" / "canaryflow.json").unlink()
    os.link(out / "onnx_fp32" / "model.onnx", out / "onnx_fp32" / "second")
    with pytest.raises(SandboxError, match="not a plain file"):
        copy_untrusted(out / "onnx_fp32", tmp_path / "copy2")


def test_a_bundle_whose_meta_points_outside_itself_is_refused(tmp_path: Path, secrets: Path) -> None:
    from canaryflow.core.serving_contract import META_FILE, ServingMeta

    bundle = tmp_path / "torch_fp32"
    bundle.mkdir()
    ServingMeta("m", "1", "torch_export", str(secrets), 3).save(bundle / META_FILE)
    head = {"variant": "torch_fp32", "table": [], "gate": {"gate": "optimization", "outcome": "passed",
                                                           "reason": "chose torch_fp32"}}
    with pytest.raises(ValueError, match="is not a file of its bundle"):
        from_sandbox(head, {"torch_fp32": bundle})
