"""`canaryflow k8s ...`: the kubernetes platform from the command line (settings ``platform=kubernetes`` and
``kubernetes.*``; the same functions the release flow's interfaces use, canaryflow/release/cluster.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from canaryflow.core.settings import get_settings, reset_settings

app = typer.Typer(help="Serve models on a Kubernetes cluster (CANARYFLOW_PLATFORM=kubernetes).",
                  no_args_is_help=True)
console = Console()
JOB_TEMPLATE = Path(__file__).resolve().parents[1] / "deployments" / "templates" / \
    "prefect-kubernetes-job-template.json"


def _services():  # noqa: ANN202 - Services; imported late (mlflow, kubernetes)
    from canaryflow.services import get_services

    os.environ.setdefault("CANARYFLOW_PLATFORM", "kubernetes")
    reset_settings()
    return get_services()


@app.command()
def init() -> None:
    """Prepare the namespace for the flow runs (as a namespace admin, once; safe again): the ServiceAccount,
    Role and RoleBinding `canaryflow-release` (serving_manifests/pipeline/) and the Secrets canaryflow-seal-key and
    canaryflow-pin-key with random keys where missing (an existing key is kept; no key is printed)."""
    from deployments.kubernetes import pipeline
    from deployments.kubernetes.apply import load_api_client

    os.environ.setdefault("CANARYFLOW_PLATFORM", "kubernetes")
    reset_settings()
    k = get_settings().kubernetes
    for line in pipeline.init(load_api_client(k), k.namespace, k.field_manager):
        console.print(f"- {line}", highlight=False, markup=False)


@app.command()
def render(model: str, version: str,
           out: Annotated[Path | None, typer.Option("--out", "-o", help="write the YAML here")] = None) -> None:
    """Print the objects that serve a released version (what `apply` applies), as YAML."""
    from canaryflow.release import cluster

    text = yaml.safe_dump_all(cluster.render(_services(), model, version), sort_keys=False)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        console.print(f"wrote {out}")


@app.command()
def apply(model: str, version: str) -> None:
    """Serve a released version on the cluster (server-side apply, dry run first, waits until Available) and
    route all of the model's traffic to it."""
    from canaryflow.release import cluster

    for line in cluster.apply(_services(), model, version):
        console.print(f"- {line}", highlight=False, markup=False)


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Per model: versions, traffic weights, ready replicas."""
    from canaryflow.release import cluster

    rows = cluster.status(_services())
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table("model", "version", "weight", "ready", "default")
    for row in rows:
        for v in row["versions"]:
            weight = "shadow" if v["shadow"] else f"{v['weight']:g}%"
            table.add_row(row["model"], v["version"], weight, f"{v['ready']}/{v['desired']}",
                          "yes" if v["version"] == row["default"] else "")
    console.print(table if rows else "no model is routed on the cluster")


@app.command()
def pool(name: Annotated[str, typer.Option(help="work pool name")] = "canaryflow-kubernetes") -> None:
    """Create (or update) a Prefect work pool of type kubernetes with canaryflow's base job template; start a
    worker for it in the cluster with `prefect worker start --pool NAME` (prefect-kubernetes installed)."""
    settings = get_settings()
    env = {**os.environ, "PREFECT_API_URL": settings.prefect_api_url}
    prefect = str(Path(sys.executable).parent / "prefect")
    done = subprocess.run([prefect, "work-pool", "create", name, "--type", "kubernetes", "--base-job-template",
                           str(JOB_TEMPLATE), "--overwrite"], env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        console.print(f"[red]work pool {name}: {(done.stdout + done.stderr)[-800:]}[/red]")
        raise typer.Exit(1)
    console.print(f"work pool {name} (kubernetes) is ready; deploy to it with "
                  f"`prefect deploy --all --pool {name}`")
