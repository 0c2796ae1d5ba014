"""The `canaryflow` command: local stack, demo and releases (the same functions the flows call)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from canaryflow.core.settings import get_settings, reset_settings
from canaryflow.core.state import ReleaseStatus
from canaryflow.k8s_cli import app as k8s_app

app = typer.Typer(help="canaryflow: MLflow registry -> gates -> TorchServe, on a local stack.", no_args_is_help=True)
console = Console()
app.add_typer(k8s_app, name="k8s")
StateDir = Annotated[Path | None, typer.Option("--state-dir", help="state directory (default .canaryflow/)")]


def _stack(state_dir: Path | None):  # noqa: ANN202
    import os

    from canaryflow.local.stack import LocalStack

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
    kw = data.get("keywatch")
    if kw:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(kw.get("at", 0)))
        color = "green" if kw.get("ok") else "red"
        console.print(f"last TorchServe restart recovery ({when}): [{color}]{'ok' if kw.get('ok') else 'PROBLEMS'}[/]",
                      highlight=False)
        for line in kw.get("problems") or []:
            console.print(f"  - {line}", highlight=False, markup=False)
    renewal = data.get("key_renewal")
    if renewal:
        expires = ", ".join(f"{kind} {when[:19]}" for kind, when in (renewal.get("expires") or {}).items())
        console.print(f"TorchServe keys expire: {expires or 'unknown'}", highlight=False, markup=False)
        if renewal.get("problem"):
            console.print(f"  key renewal problem: {renewal['problem']}", highlight=False, markup=False)


def _check_name(model: str, version: str | None = None) -> None:
    """The name rule (canaryflow/core/names.py) before anything is asked of the stack."""
    from canaryflow.core.names import name_problem

    problem = name_problem(model, version)
    if problem:
        raise typer.BadParameter(problem, param_hint="MODEL")


@app.command()
def release(model: str, version: str,
            allow_older: Annotated[bool, typer.Option("--allow-older", help="release a version older than the "
                                                      "champion (a deliberate downgrade)")] = False,
            state_dir: StateDir = None) -> None:
    """Start the release deployment for a registered version (what the webhook does)."""
    from canaryflow.intake.launcher import prefect_launcher

    _check_name(model, version)
    settings = _stack(state_dir).settings
    run_id = prefect_launcher(settings).start_release(
        model, version, idempotency_key=f"cli:{model}:{version}:{time.time_ns()}", allow_older=allow_older)
    console.print(f"release flow run {run_id}: {settings.url('prefect')}/runs/flow-run/{run_id}")


@app.command()
def rollback(model: str,
             reason: Annotated[str, typer.Option("--reason", help="why; recorded with your user name")],
             to: Annotated[str | None, typer.Option("--to", help="a released version (default: previous)")] = None,
             state_dir: StateDir = None) -> None:
    """Serve the previous champion (or --to VERSION) again: traffic, TorchServe default and aliases. Safe twice."""
    import getpass

    from canaryflow.core.errors import CanaryflowError
    from canaryflow.release import rollback as rb
    from canaryflow.services import get_services

    if not reason.strip():
        raise typer.BadParameter("a rollback needs a reason", param_hint="--reason")
    _check_name(model, to)
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
    from canaryflow.intake.launcher import prefect_launcher
    from canaryflow.release import reconcile as rc
    from canaryflow.services import get_services

    settings = _stack(state_dir).settings
    actions = rc.reconcile(get_services(), prefect_launcher(settings))
    for line in actions or ["nothing to reconcile"]:
        console.print(f"- {line}", highlight=False, markup=False)


@app.command()
def score(model: str, input: Annotated[str, typer.Argument(help="Parquet file or directory: path or fsspec URI")],
          alias: Annotated[str | None, typer.Option(help="registry alias (default: batch.alias, champion)")] = None,
          version: Annotated[str | None, typer.Option("--version", help="a version instead of an alias")] = None,
          output: Annotated[str | None, typer.Option(help="output directory (default <state>/batch-output)")] = None,
          chunk_rows: Annotated[int | None, typer.Option(help="rows per part (default 65536)")] = None,
          keep: Annotated[list[str] | None, typer.Option(help="input column copied to the output (repeat)")] = None,
          allow_unreleased: Annotated[bool, typer.Option(help="score a version that was never released")] = False,
          as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
          state_dir: StateDir = None) -> None:
    """Score a Parquet dataset with the champion (or --version) in-process, resumable (the batch flow's code)."""
    import os

    _check_name(model, version)

    from rich.markdown import Markdown
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from canaryflow.batch.report import markdown
    from canaryflow.batch.run import run_batch
    from canaryflow.core.errors import CanaryflowError

    if state_dir is not None:
        os.environ["CANARYFLOW_STATE_DIR"] = str(state_dir)
        reset_settings()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
               TextColumn("{task.fields[speed]}"), TimeRemainingColumn()]
    try:
        with Progress(*columns, console=Console(stderr=True) if as_json else console, transient=as_json) as bar:
            task = bar.add_task(f"{model}: resolving", total=None, speed="")
            summary = run_batch(
                get_settings(), model, input, alias=alias, version=version, output_dir=output, chunk_rows=chunk_rows,
                keep_columns=keep, allow_unreleased=allow_unreleased or None,
                on_job=lambda job: bar.update(task, total=job.total_rows, description=(
                    f"{model} v{job.model.version} ({job.model.variant})")),
                on_part=lambda p: bar.update(task, completed=p.rows_done, speed=f"{p.rows_per_s:,.0f} rows/s"))
    except CanaryflowError as exc:
        console.print(f"[red]batch inference failed[/]: {exc}", highlight=False)
        raise typer.Exit(1) from exc
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        console.print(Markdown(markdown(summary)))


@app.command()
def demo(keep: Annotated[bool, typer.Option("--keep", help="leave the stack running")] = False,
         state_dir: StateDir = None) -> None:
    """The whole release story on a local stack: v1 released, v2 promoted through the canary under live load,
    a bad v3 (wrong only on inputs its holdout barely has) rolled back by the pairwise replay check."""
    import os

    from canaryflow.core.registry import MlflowRegistry
    from canaryflow.local import demo as d
    from deployments.loadtest import start_live_load, stop_live_load

    for key, value in d.DEMO_CANARY.items():
        os.environ.setdefault(key, value)
    reset_settings()
    stack = _stack(state_dir)
    s = stack.settings
    load = None
    load_dir = stack.paths.work_dir / "demo-live-load"
    traffic_rows, segment = d.live_rows()

    def start_load():  # noqa: ANN202 - a locust subprocess
        live = s.loadtest.model_copy(update={"users": 8, "target_rps": 40.0, "duration_s": 3600})
        started = start_live_load(s.router_url, d.DEMO_MODEL, traffic_rows, live, load_dir, s.canary.user_header)
        share = (traffic_rows[:, segment.column] > segment.above).mean()
        console.print(f"live load started: locust, {live.users} users, {live.target_rps:g} req/s, sticky on "
                      f"{s.canary.user_header}; {share:.0%} of its rows have {segment.describe()}, which the "
                      "holdout barely has")
        return started

    try:
        with console.status("starting the local stack (MLflow, Prefect, TorchServe, router, bridge)") as sp:
            stack.up(progress=lambda msg: sp.update(msg))
        console.print(f"Prefect UI: {s.url('prefect')}/runs   (filter by tag `release` for the releases only)")
        c = s.canary
        console.print(f"canary policy: steps {c.steps} %, analysis every {c.interval_s:g} s, >= {c.min_requests} "
                      f"requests per version, max error ratio {c.max_error_ratio:g}, max prediction drift "
                      f"(PSI) {c.max_prediction_drift:g}, pairwise agreement >= {c.min_pair_agreement:g} overall "
                      f"and >= {c.min_segment_agreement:g} per segment, rollback after {c.max_failed_checks} "
                      "failed analyses")
        earlier = MlflowRegistry(s.mlflow_uri).alias_version(d.DEMO_MODEL, s.release.champion_alias)
        if earlier is not None:
            # this state dir ran the demo before: its first release ramps against that champion, which needs
            # live traffic from the start (a canary with no requests to judge only holds)
            console.print(f"{d.DEMO_MODEL} already has a champion (v{earlier}) from an earlier demo in "
                          f"{stack.paths.root}: the releases below are canaries against it")
            load = start_load()
        version, rows, registered = _demo_release(s, "v1: train and register a classifier", seed=0)
        # the release experiment exists now: its classic runs view (a bare server link opens MLflow 3's GenAI page)
        console.print(f"MLflow UI (release runs): {d.mlflow_ui_url(s)}", highlight=False, soft_wrap=True)
        answer, request_id, curl = d.predict(s, d.DEMO_MODEL, rows[:2])
        console.print(f"first prediction through the router {time.monotonic() - registered:.1f} s after "
                      f"registration (X-Request-ID {request_id}):")
        console.print_json(data=answer)
        console.print("repeat it with:")
        console.print(curl, soft_wrap=True, highlight=False, markup=False)

        if load is None:
            load = start_load()
        _demo_release(s, "v2: retrain (new seed); the canary ramps it in", seed=4, expect=ReleaseStatus.RELEASED)
        _demo_release(s, f"v3: a feature-pipeline bug inverts its answers for {segment.describe()}: every offline "
                      "gate passes, live traffic exposes it", seed=2, fault=segment, expect=ReleaseStatus.ROLLED_BACK)
        stats = stop_live_load(load, load_dir)
        load = None
        if not stats.get("requests"):
            console.print(f"[red]live load: no statistics from locust (see {load_dir / 'locust.log'})[/]")
            raise typer.Exit(1)
        console.print(f"live load: {stats.get('requests', 0)} requests, {stats.get('failures', 0)} failed, "
                      f"p95 {stats.get('p95_ms', 0)} ms")
        champion = MlflowRegistry(s.mlflow_uri).alias_version(d.DEMO_MODEL, s.release.champion_alias)
        answer, _, _ = d.predict(s, d.DEMO_MODEL, rows[:1])
        console.print(f"champion is v{champion}; the router answers with v{answer['model_version']}")
        if answer["model_version"] != champion:
            raise typer.Exit(1)
    finally:
        if load is not None:
            stop_live_load(load, load_dir)
        if keep:
            console.print(f"stack left running; stop it with: canaryflow down --state-dir {stack.paths.root}")
        else:
            stack.down()
            console.print("stack stopped")


def _demo_release(s, title: str, seed: int, fault=None,  # noqa: ANN001 - Settings, demo.Segment
                  expect: str = ReleaseStatus.RELEASED):  # noqa: ANN202 - (version, rows, registered-at)
    from canaryflow.local import demo as d

    console.rule(title)
    with console.status("training and registering"):
        version, rows, acc = d.register_model(s.mlflow_uri, seed=seed, fault=fault)
    registered = time.monotonic()
    console.print(f"registered [bold]{d.DEMO_MODEL}[/] v{version} (holdout accuracy {acc:.3f}); "
                  "no further command: the MLflow webhook starts the release")
    with console.status(f"release of v{version}: gates, then the canary"):
        outcome = d.watch_release(s.mlflow_uri, d.DEMO_MODEL, version,
                                  lambda line: console.print(f"  canary {line}", highlight=False, markup=False,
                                                             soft_wrap=True), settings=s)
    run = d.find_flow_run(s, d.DEMO_MODEL, version)
    if run:
        console.print(f"flow run [bold]{run['name']}[/]: {s.url('prefect')}/runs/flow-run/{run['id']}")
    for line in d.release_links(s, d.DEMO_MODEL, version):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"release {outcome.status} after {outcome.seconds:.1f} s: {outcome.reason}", highlight=False,
                  markup=False, soft_wrap=True)
    if outcome.status != expect:
        console.print(f"[red]expected {expect}[/]")
        raise typer.Exit(1)
    return version, rows, registered


if __name__ == "__main__":
    app()
