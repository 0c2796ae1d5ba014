"""The walking skeleton on the real local stack: MLflow, Prefect, TorchServe, nginx, the bridge."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from canaryflow.intake.launcher import PrefectLauncher
from canaryflow.intake.webhook import load_or_create_secret, sign
from canaryflow.local.demo import pinned_requirements, register_model, wait_for_release
from canaryflow.services import Services

pytestmark = pytest.mark.integration
MODEL = "stack-it-model"
SERVE_DEADLINE_S = 240


def _launcher(stack) -> PrefectLauncher:
    return PrefectLauncher(stack.settings.prefect_api_url, stack.settings.prefect.release_deployment)


def _deliver(stack, body: dict, secret: str, delivery_id: str | None = None) -> httpx.Response:
    raw = json.dumps(body).encode()
    delivery_id = delivery_id or str(uuid.uuid4())
    ts = str(int(time.time()))
    headers = {"X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": ts,
               "X-MLflow-Signature": sign(secret, delivery_id, ts, raw), "Content-Type": "application/json"}
    return httpx.post(stack.settings.url("bridge", "/webhooks/mlflow"), content=raw, headers=headers, timeout=30)


def _created(name: str, version: str) -> dict:
    return {"entity": "model_version", "action": "created", "timestamp": int(time.time() * 1000),
            "data": {"name": name, "version": version, "source": "models:/x", "run_id": None, "tags": {},
                     "description": None}}


def test_up_brings_every_service_to_healthy(stack) -> None:
    status = stack.status_dict()
    unhealthy = [s["name"] for s in status["services"] if not s["healthy"]]
    assert unhealthy == [], f"unhealthy: {unhealthy}"
    names = {s["name"] for s in status["services"]}
    assert names == {"mlflow", "prefect-server", "torchserve", "router", "prefect-worker", "bridge"}
    # the CLI reports the same, as JSON, and `up` again is idempotent (same pids)
    cli = [str(Path(sys.executable).parent / "canaryflow")]
    out = subprocess.run(cli + ["status", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["healthy"] is True
    pids = {s["name"]: s["pid"] for s in status["services"]}
    stack.up(progress=lambda msg: None)
    assert {s["name"]: s["pid"] for s in stack.status_dict()["services"]} == pids


def test_registered_version_is_served_through_the_router(stack, record_property) -> None:
    started = time.monotonic()
    version, rows, _ = register_model(stack.settings.mlflow_uri, name=MODEL, seed=1)
    url = f"{stack.settings.router_url}/predictions/{MODEL}"
    body = {"inputs": rows[:3].tolist()}
    last = None
    while time.monotonic() - started < SERVE_DEADLINE_S:
        last = httpx.post(url, json=body, timeout=30)
        if last.status_code == 200:
            break
        time.sleep(1)
    served_at, elapsed = time.time(), time.monotonic() - started
    assert last is not None and last.status_code == 200, f"not served after {elapsed:.0f} s: {last.text}"
    answer = last.json()
    assert answer["model_version"] == version
    assert len(answer["predictions"]) == 3
    probs = np.array([p["probabilities"] for p in answer["predictions"]])
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert last.headers["X-Request-ID"]
    from mlflow import MlflowClient

    # the router serves the moment promote routes it; the registry's tags follow a moment later
    assert wait_for_release(stack.settings.mlflow_uri, MODEL, version, timeout_s=60).status == "released"
    mv = MlflowClient(stack.settings.mlflow_uri).get_model_version(MODEL, version)
    runs: list[dict] = []
    for _ in range(60):  # the flow still writes its summary after the tags
        runs = _launcher(stack).list_flow_runs(MODEL, version)
        if runs and runs[0]["state_type"] != "RUNNING":
            break
        time.sleep(0.5)
    assert len(runs) == 1 and runs[0]["state_type"] == "COMPLETED"
    from datetime import datetime

    flow_start = datetime.fromisoformat(runs[0]["start_time"]).timestamp()
    to_start = flow_start - mv.creation_timestamp / 1000
    to_served = served_at - mv.creation_timestamp / 1000
    record_property("registration_to_flow_start_s", round(to_start, 1))
    record_property("registration_to_first_prediction_s", round(to_served, 1))
    print(f"registration -> release flow running: {to_start:.1f} s; -> first prediction through the router: "
          f"{to_served:.1f} s (training and logging the model took {elapsed - to_served:.1f} s before that)")
    assert "champion" in mv.aliases
    assert stack.torchserve.describe(MODEL, version)["modelVersion"] == version


def test_same_delivery_twice_starts_one_run(stack) -> None:
    secret = load_or_create_secret(stack.paths, stack.settings)
    name, delivery = "dup-delivery-model", str(uuid.uuid4())
    first = _deliver(stack, _created(name, "1"), secret, delivery)
    second = _deliver(stack, _created(name, "1"), secret, delivery)
    assert first.status_code == second.status_code == 202, (first.text, second.text)
    assert first.json()["flow_run_id"] == second.json()["flow_run_id"]
    assert _launcher(stack).count_runs(name, "1") == 1


def test_forged_delivery_is_refused_and_starts_nothing(stack) -> None:
    name = "forged-delivery-model"
    resp = _deliver(stack, _created(name, "1"), secret="not-the-secret")
    assert resp.status_code == 401, resp.text
    assert _launcher(stack).count_runs(name, "1") == 0


def test_bad_request_is_400_and_next_good_request_succeeds(stack) -> None:
    url = f"{stack.settings.router_url}/predictions/{MODEL}"
    n = 30  # the breast-cancer data has 30 features
    for bad in ({"inputs": [[1.0] * (n - 1)]}, {"inputs": []}, {"inputs": [["x"] * n]}):
        resp = httpx.post(url, json=bad, timeout=30)
        assert resp.status_code == 400, (bad, resp.status_code, resp.text)
        assert resp.text
    resp = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert resp.status_code == 400, resp.text
    good = httpx.post(url, json={"inputs": [[1.0] * n]}, timeout=30)
    assert good.status_code == 200, good.text
    access = [json.loads(line) for line in stack.paths.router_access_log.read_text().splitlines() if line]
    assert {"request_id", "model", "status", "request_time", "upstream_time"} <= set(access[-1])


def test_router_does_not_expose_the_management_api(stack) -> None:
    for path in ("/models", f"/models/{MODEL}", "/api-description", "/metrics"):
        assert httpx.get(stack.settings.router_url + path, timeout=10).status_code == 404


def test_state_files_are_the_owners_only(stack) -> None:
    """The state root is 0700 and what the stack writes is 0600 from the start (supervisord's umask 077): the
    registry database (it holds the webhook secret, encrypted), the config with its Fernet key, TorchServe's
    keys, the models, the access log."""
    p = stack.paths
    assert stat.S_IMODE(p.root.stat().st_mode) == 0o700
    files = [p.supervisor_conf, p.mlflow_db, p.torchserve_keys, p.router_access_log, *p.model_store.glob("*.mar")]
    modes = {str(f.relative_to(p.root)): oct(stat.S_IMODE(f.stat().st_mode)) for f in files if f.exists()}
    assert {p.supervisor_conf, p.mlflow_db, p.torchserve_keys} <= {f for f in files if f.exists()}
    assert all(m == "0o600" for m in modes.values()), modes


def test_torchserve_refuses_to_fetch_a_remote_archive(stack) -> None:
    """allowed_urls admits the model store only: even with the management key, no remote .mar is fetched."""
    backend = Services(stack.settings).backend
    resp = backend._call("management", "POST", "/models", params={"url": "http://127.0.0.1:9/evil.mar"})
    assert resp.status_code in (400, 403, 404), resp.text
    assert "evil" not in " ".join(m for m in backend.versions("evil"))


def test_mlflow_refuses_a_webhook_to_any_url_but_the_bridge(stack) -> None:
    """Loopback webhooks are allowed for the bridge only: one aimed at the Prefect API (or the bridge's URL with
    a query) cannot be created, nor can the bridge's webhook be re-aimed; the bridge's own stays as it was."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(stack.settings.mlflow_uri, registry_uri=stack.settings.mlflow_uri)
    bridge = stack.settings.url("bridge", "/webhooks/mlflow")
    for url in (stack.settings.url("prefect", "/api/deployments/filter"), bridge + "?x=1",
                stack.settings.url("torchserve_management", "/models")):
        with pytest.raises(MlflowException, match="not allowed on this server"):
            client.create_webhook(name="aimed-elsewhere", url=url, events=["model_version.created"], secret="s")
    [ours] = [w for w in client.list_webhooks() if w.url == bridge]
    with pytest.raises(MlflowException, match="not allowed on this server"):
        client.update_webhook(ours.webhook_id, url=stack.settings.url("prefect", "/api/health"))
    assert [w.url for w in client.list_webhooks()] == [bridge]


@pytest.mark.stops_stack
def test_down_leaves_no_process(stack) -> None:
    sup_pid = stack.supervisor.pid()
    assert sup_pid is not None
    tree = [sup_pid] + [c.pid for c in psutil.Process(sup_pid).children(recursive=True)]
    assert len(tree) > 6  # supervisord, six services and TorchServe's java + python worker
    stack.down()
    alive = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"still running after down: {alive}"
    assert stack.status_dict()["healthy"] is False
    ports = [stack.settings.ports.router, stack.settings.ports.mlflow, stack.settings.ports.prefect,
             stack.settings.ports.torchserve_inference, stack.settings.ports.bridge]
    listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert listening.isdisjoint(ports)


def test_bad_model_is_rejected_and_the_champion_keeps_serving(stack) -> None:
    """A version whose output is one number per batch fails the shape gate; production is untouched."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    class Collapses(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum().reshape(1, 1).expand(1, 2)

    url = f"{stack.settings.router_url}/predictions/{MODEL}"
    before = httpx.post(url, json={"inputs": [[1.0] * 30]}, timeout=30)
    assert before.status_code == 200, "needs the champion released by the earlier test"
    champion = before.json()["model_version"]
    rows = np.random.default_rng(0).normal(size=(4, 30)).astype(np.float32)
    mlflow.set_tracking_uri(stack.settings.mlflow_uri)
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(Collapses(), name="model", input_example=rows,
                                        serialization_format="pickle", registered_model_name=MODEL,
                                        pip_requirements=pinned_requirements("mlflow", "torch"))
    version = str(info.registered_model_version)
    outcome = wait_for_release(stack.settings.mlflow_uri, MODEL, version, timeout_s=180)
    assert outcome.status == "rejected", outcome
    assert re.match(r"shape: output shape \[1, 2\] for (\d+) input rows; expected \1 rows", outcome.reason), outcome
    client = MlflowClient(stack.settings.mlflow_uri)
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion
    assert version not in stack.torchserve.versions(MODEL)
    after = httpx.post(url, json={"inputs": [[1.0] * 30]}, timeout=30)
    assert after.status_code == 200 and after.json()["model_version"] == champion


def test_crashed_torchserve_is_restarted_and_serving_recovers(stack) -> None:
    """supervisord restarts TorchServe; keywatch re-registers the routed version and re-keys the router."""
    url = f"{stack.settings.router_url}/predictions/{MODEL}"
    assert httpx.post(url, json={"inputs": [[1.0] * 30]}, timeout=30).status_code == 200
    ts = next(p for p in stack.supervisor.processes() if p["name"] == "torchserve")
    java = [c for c in psutil.Process(ts["pid"]).children(recursive=True) if "java" in c.name()]
    assert java, "TorchServe's Java frontend not found"
    java[0].kill()
    started = time.monotonic()
    status = None
    while time.monotonic() - started < 90:
        time.sleep(1)
        try:
            status = httpx.post(url, json={"inputs": [[1.0] * 30]}, timeout=30).status_code
        except httpx.HTTPError:
            continue
        if status == 200:
            break
    assert status == 200, f"serving did not recover within 90 s (last status {status})"
    print(f"TorchServe crash -> serving again: {time.monotonic() - started:.1f} s")
    assert next(p for p in stack.supervisor.processes() if p["name"] == "torchserve")["pid"] != ts["pid"]
