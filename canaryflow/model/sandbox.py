"""The candidate's own code runs here: a child process that cannot read the stack's secrets.

A registered model is code (a pickled PyTorch module, a pyfunc's cloudpickled class, a Keras layer). Loading it
runs that code, so the release gates that must load it (shape, quality, optimization) do it in a child process:

- as an unprivileged user (``release.sandbox_user``, default ``nobody``) when the pipeline runs as root: the state
  dir is 0700 and its secrets 0600, so the TorchServe keys, the webhook secret, the MLflow Fernet key, the seal
  and pin keys are out of its reach;
- in a network namespace of its own (``unshare --net``) where the kernel allows it: no MLflow, Prefect or
  TorchServe API to call;
- with an environment of a few harmless variables (no ``CANARYFLOW_*``, ``PREFECT_*``, ``MLFLOW_*``), a private
  home and temp dir, and the model files copied into a directory that user owns.

Not root: the child still gets the scrubbed environment and no network, but it runs as the pipeline's user and
could read what that user can (:attr:`Sandbox.isolation` says which case applies; the release notes quote it).

The parent and the child speak over two pipes (not stdout, which the model's code may print to): a message is a
JSON header and an optional array, sent with ``np.save`` and read with ``allow_pickle=False``; nothing the child
sends is ever unpickled. The child's own output goes to ``sandbox.log`` in its directory.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import select
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from canaryflow.core.errors import CanaryflowError

_FRAME = struct.Struct("!IQ")
MAX_HEADER_BYTES = 16 << 20
MAX_ARRAY_BYTES = 4 << 30
CHILD_MODULE = "canaryflow.model.sandbox_child"


class SandboxError(CanaryflowError):
    """The sandbox itself failed: it could not start, or the child died or did not answer in time."""


class ModelCodeError(CanaryflowError):
    """The candidate's code raised in the sandbox; subclasses carry the child's exception type name, so a gate's
    reason reads as before (``model raised RuntimeError ...``)."""


@lru_cache(maxsize=64)
def _raised_type(name: str) -> type[ModelCodeError]:
    return type(name if name.isidentifier() else "ModelCodeError", (ModelCodeError,), {})


# -- framing -------------------------------------------------------------------------------------------------
def send(fd: int, header: dict[str, Any], array: np.ndarray | None = None) -> None:
    head = json.dumps(header, default=_jsonable).encode()
    body = b""
    if array is not None:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        body = buf.getvalue()
    data = memoryview(_FRAME.pack(len(head), len(body)) + head + body)
    while data:
        data = data[os.write(fd, data):]


def recv(fd: int, deadline: float | None = None) -> tuple[dict[str, Any], np.ndarray | None] | None:
    """One message, or None at end of file. ``deadline`` (time.monotonic) bounds the wait: SandboxError past it."""
    first = _read(fd, _FRAME.size, deadline, eof_ok=True)
    if first is None:
        return None
    n_head, n_body = _FRAME.unpack(first)
    if n_head > MAX_HEADER_BYTES or n_body > MAX_ARRAY_BYTES:
        raise SandboxError(f"sandbox message too large ({n_head} + {n_body} bytes)")
    head = json.loads(_read(fd, n_head, deadline) or b"{}")
    if not isinstance(head, dict):
        raise SandboxError("sandbox message header is not an object")
    array = np.load(io.BytesIO(_read(fd, n_body, deadline) or b""), allow_pickle=False) if n_body else None
    return head, array


def _read(fd: int, n: int, deadline: float | None, eof_ok: bool = False) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise SandboxError("the sandboxed model did not answer in time")
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            if eof_ok and got == 0:
                return None
            raise SandboxError("the sandbox closed its pipe mid-message")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# -- isolation -----------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _netns_available() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        return subprocess.run([unshare, "--net", "--", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _launch_prefix(user: str | None) -> tuple[list[str], str, tuple[int, int] | None]:
    """The command prefix, a description of the isolation, and the (uid, gid) the child runs as (None: ours)."""
    prefix: list[str] = []
    parts: list[str] = []
    if _netns_available():
        prefix += [shutil.which("unshare") or "unshare", "--net", "--"]
        parts.append("no network")
    else:
        parts.append("network reachable (no permission for a network namespace)")
    ids: tuple[int, int] | None = None
    if os.geteuid() == 0 and user:
        try:
            entry = pwd.getpwnam(user)
        except KeyError as exc:
            raise SandboxError(f"release.sandbox_user {user!r} does not exist on this machine") from exc
        if entry.pw_uid == 0:
            raise SandboxError("release.sandbox_user must not be root")
        ids = (entry.pw_uid, entry.pw_gid)
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise SandboxError("setpriv (util-linux) is needed to run the candidate's code as "
                               f"{user!r}; install util-linux")
        prefix += [setpriv, f"--reuid={ids[0]}", f"--regid={ids[1]}", "--clear-groups", "--"]
        parts.insert(0, f"as user {user} (secrets unreadable)")
    else:
        parts.insert(0, "as the pipeline's own user (not root: the stack's secrets are readable by it)")
    return prefix, "candidate code ran in a subprocess " + ", ".join(parts) + ", scrubbed environment", ids


def _import_path() -> list[str]:
    """Our own import path, for the child: a pickled model names its classes by module, and those modules must
    import there as they do here (code the pipeline already runs; no secret lives on it)."""
    return [str(Path(p or os.getcwd()).resolve()) for p in sys.path if Path(p or os.getcwd()).is_dir()]


class Sandbox:
    """One child process for one release's gates; load models, predict, optimize. Close it (or use ``with``)."""

    def __init__(self, user: str | None = "nobody", timeout_s: float = 600.0, base: Path | None = None) -> None:
        prefix, self.isolation, self._ids = _launch_prefix(user)
        self.timeout_s = timeout_s
        self.root = Path(tempfile.mkdtemp(prefix="canaryflow-sandbox-", dir=base))
        for sub in ("home", "tmp", "in", "out"):
            (self.root / sub).mkdir()
        self._own(self.root)
        self._staged: dict[Path, Path] = {}
        self._loaded: dict[Path, str] = {}
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()
        home = str(self.root / "home")
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": home, "TMPDIR": str(self.root / "tmp"),
               "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "XDG_CACHE_HOME": home,
               "MPLCONFIGDIR": home, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONDONTWRITEBYTECODE": "1"}
        log = open(self.root / "sandbox.log", "ab")  # noqa: SIM115 (the child holds it; closed below)
        try:
            self._proc = subprocess.Popen(
                [*prefix, sys.executable, "-I", "-m", CHILD_MODULE, str(to_child), str(from_child),
                 json.dumps(_import_path())],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=self.root, pass_fds=(to_child,
                                                                                                   from_child),
                start_new_session=True, umask=0o077)
        except OSError as exc:
            raise SandboxError(f"cannot start the sandbox: {exc}") from exc
        finally:
            log.close()
            os.close(to_child)
            os.close(from_child)
        self._own(self.root / "sandbox.log")
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._w, self._r, self.root)
        self._call({"op": "ping"}, timeout_s=max(120.0, timeout_s / 5))  # imports done, protocol up

    # -- files -----------------------------------------------------------------------------------------------
    def _own(self, path: Path) -> None:
        if self._ids is None:
            return
        for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
            os.chown(p, *self._ids, follow_symlinks=False)

    def stage(self, src: Path) -> Path:
        """Copy a model directory where the child can read it (once per source)."""
        src = Path(src).resolve()
        if src not in self._staged:
            dst = self.root / "in" / str(len(self._staged))
            shutil.copytree(src, dst, symlinks=True)  # a link stays a link: nobody reads through it for the child
            self._own(dst)
            self._staged[src] = dst
        return self._staged[src]

    # -- calls -----------------------------------------------------------------------------------------------
    def _call(self, header: dict[str, Any], array: np.ndarray | None = None,
              timeout_s: float | None = None) -> tuple[dict[str, Any], np.ndarray | None]:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        try:
            send(self._w, header, array)
            reply = recv(self._r, deadline)
        except (OSError, SandboxError) as exc:
            self.close()
            raise SandboxError(f"{header.get('op')}: {exc}; {self._log_tail()}") from exc
        if reply is None:
            code = self._proc.wait(timeout=10)
            self.close()
            raise SandboxError(f"the sandboxed model exited (code {code}) during {header.get('op')}; "
                               f"{self._log_tail()}")
        head, out = reply
        if not head.get("ok"):
            raise _raised_type(str(head.get("error_type", "ModelCodeError")))(str(head.get("error", ""))[:2000])
        return head, out

    def _log_tail(self) -> str:
        try:
            text = (self.root / "sandbox.log").read_text(errors="replace")[-600:].strip()
        except OSError:
            return "no sandbox log"
        return f"its last output: {text}" if text else "it printed nothing"

    def predictor(self, model_dir: Path) -> Callable[[np.ndarray], np.ndarray]:
        """Like :func:`canaryflow.model.predict.load_predictor`, with the model loaded in the child."""
        staged = self.stage(model_dir)
        if staged not in self._loaded:
            key = str(len(self._loaded))
            self._call({"op": "load", "id": key, "dir": str(staged)})
            self._loaded[staged] = key
        key = self._loaded[staged]

        def predict(rows: np.ndarray) -> np.ndarray:
            _, out = self._call({"op": "predict", "id": key}, np.ascontiguousarray(rows, dtype=np.float32))
            if out is None:
                raise ModelCodeError("the sandbox answered no predictions")
            return np.asarray(out, dtype=np.float64)

        return predict

    def optimize(self, model_dir: Path, contract: dict[str, Any], holdout: np.ndarray, out_dir: Path,
                 kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Path]]:
        """Build and judge the serving variants in the child; returns the child's report (``variant``, ``table``,
        ``gate``) and each built variant's directory, copied to ``out_dir/<variant>`` (the files are data: the
        archiver packs them, TorchServe loads them)."""
        staged = self.stage(model_dir)
        work = self.root / "out" / str(len(list((self.root / "out").iterdir())))
        work.mkdir()
        self._own(work)
        head, _ = self._call({"op": "optimize", "dir": str(staged), "out_dir": str(work), "contract": contract,
                              "kwargs": kwargs}, np.ascontiguousarray(holdout, dtype=np.float32))
        dirs: dict[str, Path] = {}
        for variant in head.get("bundles", []):
            src = work / str(variant)
            if not isinstance(variant, str) or src.parent != work or not src.is_dir() or src.is_symlink():
                raise SandboxError(f"the sandbox reported a variant {variant!r} it did not build")
            dst = Path(out_dir) / variant
            shutil.rmtree(dst, ignore_errors=True)
            copy_untrusted(src, dst)
            dirs[variant] = dst
        return head, dirs

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def copy_untrusted(src: Path, dst: Path) -> None:
    """Copy a directory the child wrote: plain directories and single-link regular files only. A symlink (or a
    hard link) the model's code planted would otherwise make this process, which can read the secrets, copy one
    into a serving bundle."""
    dst.mkdir(parents=True)
    for entry in os.scandir(src):
        st = entry.stat(follow_symlinks=False)
        target = dst / entry.name
        if stat.S_ISDIR(st.st_mode):
            copy_untrusted(Path(entry.path), target)
        elif stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as fin, open(target, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            raise SandboxError(f"the sandbox wrote {entry.name!r}, which is not a plain file or directory: refused")


def _stop(proc: subprocess.Popen[bytes], w: int, r: int, root: Path) -> None:
    for fd in (w, r):
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        proc.wait(timeout=5)  # end of file on its pipe: the child leaves
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    shutil.rmtree(root, ignore_errors=True)
