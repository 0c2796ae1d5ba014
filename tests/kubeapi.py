"""A real Kubernetes API server for the tests, the envtest way: Debian's etcd plus the kube-apiserver binary of
``../shared/kube`` (or ``$KUBEBUILDER_ASSETS/kube-apiserver``), both on loopback, with the Gateway API CRDs
installed. There is no kubelet: Pods never run, and a test that needs a Deployment Available patches its status
itself (and says so).

Used by the ``kube_api`` fixture (tests/conftest.py); runnable on its own for a look:
``python -m tests.kubeapi`` starts one and prints the kubeconfig until Ctrl-C.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import free_ports

REPO = Path(__file__).resolve().parents[1]


def _shared_kube() -> Path:
    """The shared kube folder (kube-apiserver.xz, crds/): ``$CANARYFLOW_SHARED_KUBE``, ``../shared/kube`` beside
    this checkout, or the workplace's ``/work/shared/kube`` (a clean clone elsewhere, as CI makes)."""
    candidates = [Path(p) for p in [os.environ.get("CANARYFLOW_SHARED_KUBE")] if p]
    candidates += [REPO.parent / "shared" / "kube", Path("/work/shared/kube")]
    return next((c for c in candidates if (c / "crds").is_dir()), candidates[0])


SHARED_KUBE = _shared_kube()
CRDS = SHARED_KUBE / "crds"
GATEWAY_CRDS = ("gateway.networking.k8s.io_httproutes.yaml", "gateway.networking.k8s.io_gateways.yaml")


def apiserver_binary(workdir: Path) -> Path:
    """``$KUBEBUILDER_ASSETS/kube-apiserver`` if set, else the shared one unpacked into ``workdir``."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and (Path(assets) / "kube-apiserver").exists():
        return Path(assets) / "kube-apiserver"
    packed = SHARED_KUBE / "kube-apiserver.xz"
    if not packed.exists():
        raise FileNotFoundError(f"no kube-apiserver: set KUBEBUILDER_ASSETS or provide {packed}")
    binary = workdir / "kube-apiserver"
    with binary.open("wb") as out:
        subprocess.run(["xz", "-dc", str(packed)], stdout=out, check=True)
    binary.chmod(0o755)
    return binary


@dataclass
class KubeApiServer:
    """etcd + kube-apiserver under ``workdir``; :meth:`start`, then :attr:`kubeconfig`, then :meth:`stop`."""

    workdir: Path
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    procs: list[subprocess.Popen] = field(default_factory=list)
    port: int = 0

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> KubeApiServer:
        if shutil.which("etcd") is None:
            raise FileNotFoundError("etcd is not installed (Debian package etcd-server; `make setup` installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        binary = apiserver_binary(self.workdir)
        etcd_port, peer_port, self.port = free_ports(3)
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        etcd = f"http://127.0.0.1:{etcd_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        self._spawn(["etcd", "--data-dir", str(self.workdir / "etcd"), "--listen-client-urls", etcd,
                     "--advertise-client-urls", etcd, "--listen-peer-urls", peer,
                     "--initial-advertise-peer-urls", peer, "--initial-cluster", f"default={peer}"], logs / "etcd.log")
        (self.workdir / "tokens.csv").write_text(f"{self.token},admin,admin,system:masters\n")
        key, pub = self.workdir / "sa.key", self.workdir / "sa.pub"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)], check=True,
                       capture_output=True)
        self._spawn([str(binary), f"--etcd-servers={etcd}", "--bind-address=127.0.0.1",
                     "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
                     f"--cert-dir={self.workdir / 'certs'}", f"--token-auth-file={self.workdir / 'tokens.csv'}",
                     "--authorization-mode=RBAC",
                     "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                     f"--service-account-key-file={pub}", f"--service-account-signing-key-file={key}",
                     "--service-cluster-ip-range=10.96.0.0/24",
                     "--feature-gates=CustomResourceValidationExpressions=true",
                     "--disable-admission-plugins=ServiceAccount"], logs / "kube-apiserver.log")
        self._wait_ready(timeout_s)
        self._write_kubeconfig()
        self.install_crds(*(CRDS / name for name in GATEWAY_CRDS))
        return self

    def _spawn(self, argv: list[str], log: Path) -> None:
        with log.open("ab") as out:
            self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir,
                                               start_new_session=True))

    def _wait_ready(self, timeout_s: float) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}; logs under {self.workdir / 'logs'}")
            req = urllib.request.Request(f"{self.url}/readyz", headers={"Authorization": f"Bearer {self.token}"})
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
                    if resp.read() == b"ok":
                        return
            except OSError as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"kube-apiserver not ready after {timeout_s:.0f} s ({last})")

    def _write_kubeconfig(self) -> None:
        # The serving certificate is self-signed: the tests skip its verification (loopback only).
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: envtest\n  cluster:\n    server: {self.url}\n    insecure-skip-tls-verify: true\n"
            f"users:\n- name: admin\n  user:\n    token: {self.token}\n"
            "contexts:\n- name: envtest\n  context:\n    cluster: envtest\n    user: admin\n"
            "current-context: envtest\n")
        self.kubeconfig.chmod(0o600)

    def install_crds(self, *paths: Path, timeout_s: float = 30.0) -> None:
        """Create the CRDs and wait until each is Established."""
        from kubernetes import client, config, utils

        api = config.new_client_from_config(str(self.kubeconfig))
        ext = client.ApiextensionsV1Api(api)
        for path in paths:
            utils.create_from_yaml(api, str(path))
        deadline = time.monotonic() + timeout_s
        names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in paths]
        while names and time.monotonic() < deadline:
            crd = ext.read_custom_resource_definition(names[0])
            if any(c.type == "Established" and c.status == "True" for c in (crd.status.conditions or [])):
                names.pop(0)
            else:
                time.sleep(0.2)
        if names:
            raise TimeoutError(f"CRDs not established: {names}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()


class FakeKubelet(threading.Thread):
    """Marks each Deployment of the namespace Available at its current generation (2 ready replicas)."""

    def __init__(self, api: Any, namespace: str) -> None:
        super().__init__(daemon=True)
        self.api, self.namespace, self.stop = api, namespace, threading.Event()

    def run(self) -> None:
        from kubernetes import client

        apps = client.AppsV1Api(self.api)
        while not self.stop.wait(0.05):
            for dep in apps.list_namespaced_deployment(self.namespace).items:
                if (dep.status.observed_generation or 0) >= dep.metadata.generation:
                    continue
                now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                apps.patch_namespaced_deployment_status(dep.metadata.name, self.namespace, {"status": {
                    "observedGeneration": dep.metadata.generation, "replicas": 2, "updatedReplicas": 2,
                    "readyReplicas": 2, "availableReplicas": 2,
                    "conditions": [{"type": "Available", "status": "True", "reason": "FakeKubelet",
                                    "message": "patched by the test", "lastUpdateTime": now,
                                    "lastTransitionTime": now}]}})


@contextmanager
def cluster_services(settings: Any, admin: Any, model: str, versions: tuple[str, ...] = ("1", "2")) -> Iterator[Any]:
    """Services of ``settings`` (platform=kubernetes) with the released archives of ``model``'s ``versions`` in the
    state dir, a KubernetesBackend whose archive source is a stub URL (no MLflow here), and a FakeKubelet (with the
    ``admin`` ApiClient) marking the namespace's Deployments Available while the block runs."""
    from canaryflow.core.paths import StatePaths
    from canaryflow.services import Services
    from deployments.kubernetes.backend import KubernetesBackend

    store = StatePaths(settings.state_dir).model_store
    store.mkdir(parents=True)
    for version in versions:
        (store / f"{model}_v{version}.mar").write_bytes(f"archive {version}".encode())
    backend = KubernetesBackend(settings, poll_s=0.05, archive_source=lambda m, v, a: (
        f"https://mlflow.example/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/torchserve/{a.name}", "ab" * 32))
    kubelet = FakeKubelet(admin, settings.kubernetes.namespace)
    kubelet.start()
    try:
        yield Services(settings, backend=backend)
    finally:
        kubelet.stop.set()
        kubelet.join(timeout=5)


if __name__ == "__main__":
    import tempfile

    server = KubeApiServer(Path(tempfile.mkdtemp(prefix="kubeapi-"))).start()
    print(f"KUBECONFIG={server.kubeconfig}")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
