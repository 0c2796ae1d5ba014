"""The `canaryflow` command: local stack, demo and releases (the same functions the flows call)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from canaryflow.settings import get_settings, reset_settings

app = typer.Typer(help="canaryflow: MLflow registry -> gates -> TorchServe, on a local stack.", no_args_is_help=True)
console = Console()
StateDir = Annotated[Path | None, typer.Option("--state-dir", help="state directory (default .canaryflow/)")]


def _stack(state_dir: Path | None):  # noqa: ANN202
    import os

    from canaryflow.stack import LocalStack

    if state_dir is not None:
        os.environ["CANARYFLOW_STATE_DIR"] = str(state_dir)
        reset_settings()
    return LocalStack(get_settings())


@app.command()
def up(state_dir: StateDir = None) -> None:
    """Start the local stack (idempotent) and wait until every service is healthy."""
    stack = _stack(state_dir)
    started = time.monotonic()
    with console.status("starting the local stack") as spinner:
        stack.up(progress=lambda msg: spinner.update(msg))
    console.print(f"[green]stack up[/] in {time.monotonic() - started:.0f} s (state in {stack.paths.root})")
    _print_status(stack.status_dict())


@app.command()
def down(state_dir: StateDir = None) -> None:
    """Stop every process of the local stack."""
    killed = _stack(state_dir).down()
    console.print("stack stopped" + (f"; killed leftover pids {killed}" if killed else ""))


@app.command()
def status(state_dir: StateDir = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every service with its endpoint and health."""
    data = _stack(state_dir).status_dict()
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        _print_status(data)
    raise typer.Exit(0 if data["healthy"] else 1)


def _print_status(data: dict) -> None:
    table = Table("service", "endpoint", "state", "pid", "healthy")
    for s in data["services"]:
        table.add_row(s["name"], s["url"], s["state"], str(s["pid"] or "-"),
                      "[green]yes[/]" if s["healthy"] else "[red]no[/]")
    console.print(table)
    console.print(f"Prefect UI: {data['ui']['prefect']}   MLflow UI: {data['ui']['mlflow']}")


@app.command()
def release(model: str, version: str, state_dir: StateDir = None) -> None:
    """Start the release deployment for a registered version (what the webhook does)."""
    from canaryflow.orchestrator import PrefectLauncher

    settings = _stack(state_dir).settings
    run_id = PrefectLauncher(settings.prefect_api_url, settings.prefect.release_deployment).start_release(
        model, version, idempotency_key=f"cli:{model}:{version}:{time.time_ns()}")
    console.print(f"release flow run {run_id}: {settings.url('prefect')}/runs/flow-run/{run_id}")


@app.command()
def rollback(model: str,
             reason: Annotated[str, typer.Option("--reason", help="why; recorded with your user name")],
             to: Annotated[str | None, typer.Option("--to", help="a released version (default: previous)")] = None,
             state_dir: StateDir = None) -> None:
    """Serve the previous champion (or --to VERSION) again: traffic, TorchServe default and aliases. Safe twice."""
    import getpass

    from canaryflow import rollback as rb
    from canaryflow.errors import CanaryflowError
    from canaryflow.services import get_services

    if not reason.strip():
        raise typer.BadParameter("a rollback needs a reason", param_hint="--reason")
    _stack(state_dir)
    try:
        result = rb.rollback(get_services(), model, to, reason, f"{getpass.getuser()} (cli)")
    except CanaryflowError as exc:
        console.print(f"[red]rollback refused:[/] {exc}")
        raise typer.Exit(1) from exc
    console.print(("[green]rolled back[/]: " if result["changed"] == "true" else "nothing to do: ") + result["reason"])


@app.command()
def reconcile(state_dir: StateDir = None) -> None:
    """One reconcile pass now (the `reconcile` deployment runs it every minute)."""
    from canaryflow import reconcile as rc
    from canaryflow.orchestrator import PrefectLauncher
    from canaryflow.services import get_services

    settings = _stack(state_dir).settings
    actions = rc.reconcile(get_services(), PrefectLauncher(settings.prefect_api_url,
                                                           settings.prefect.release_deployment))
    for line in actions or ["nothing to reconcile"]:
        console.print(f"- {line}", highlight=False, markup=False)


@app.command()
def demo(keep: Annotated[bool, typer.Option("--keep", help="leave the stack running")] = False,
         state_dir: StateDir = None) -> None:
    """Train and register a model; the webhook releases it; predict through the router."""
    from canaryflow import demo as d

    stack = _stack(state_dir)
    s = stack.settings
    try:
        with console.status("starting the local stack (MLflow, Prefect, TorchServe, router, bridge)") as sp:
            stack.up(progress=lambda msg: sp.update(msg))
        console.print(f"Prefect UI: {s.url('prefect')}   MLflow UI: {s.mlflow_uri}")
        with console.status("training and registering a classifier"):
            version, rows, acc = d.register_model(s.mlflow_uri)
        registered = time.monotonic()
        console.print(f"registered [bold]{d.DEMO_MODEL}[/] v{version} (holdout accuracy {acc:.3f}); "
                      "no further command: the MLflow webhook starts the release")
        with console.status("waiting for the release flow run"):
            outcome = d.wait_for_release(s.mlflow_uri, d.DEMO_MODEL, version)
        run = d.find_flow_run(s, d.DEMO_MODEL, version)
        if run:
            console.print(f"flow run [bold]{run['name']}[/]: {s.url('prefect')}/runs/flow-run/{run['id']}")
        console.print(f"release {outcome.status} after {outcome.seconds:.1f} s: {outcome.reason}")
        if outcome.status != "released":
            raise typer.Exit(1)
        answer, request_id, curl = d.predict(s, d.DEMO_MODEL, rows[:2])
        console.print(f"first prediction through the router {time.monotonic() - registered:.1f} s after "
                      f"registration (X-Request-ID {request_id}):")
        console.print_json(data=answer)
        console.print("repeat it with:")
        console.print(curl, soft_wrap=True, highlight=False, markup=False)
    finally:
        if keep:
            console.print(f"stack left running; stop it with: canaryflow down --state-dir {stack.paths.root}")
        else:
            stack.down()
            console.print("stack stopped")


if __name__ == "__main__":
    app()
