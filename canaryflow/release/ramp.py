"""The canary ramp of a release as plain steps: start or resume, analyse-and-apply, promote, roll back, retire.

The controller (deployments/canary.py) decides; these functions apply its decisions to the router, TorchServe and
the registry, and persist the status as JSON in the candidate version's ``canaryflow.canary`` tag *after* the
router change, so a crash in between leaves a router ahead of the tag, which reconcile repairs to the tag.
Every analysis is recorded: MLflow metrics with the analysis number as step, and a JSON line in the release's
work dir (for the table artifact and the PNG timeline).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from canaryflow.core import locks
from canaryflow.core.errors import MetricsSourceError
from canaryflow.core.locks import StatusConflict
from canaryflow.core.state import ReleaseStatus, Route, Tag
from canaryflow.release import replay
from canaryflow.release.converge import DELETE, converge
from canaryflow.release.steps import ReleaseState
from canaryflow.services import Services
from deployments import canary as ctl
from deployments.metrics import FLUSH_DELAY_S, MetricsSource, Window
from validation.results import judged


def load_status(svc: Services, model: str, version: str) -> ctl.CanaryStatus | None:
    """The persisted ramp status of a version, or None when it never started a ramp."""
    raw = svc.registry.get_version(model, version).tags.get(Tag.CANARY)
    return ctl.CanaryStatus.from_json(raw) if raw else None


def save_status(svc: Services, model: str, status: ctl.CanaryStatus) -> ctl.CanaryStatus:
    """Compare-and-set: persist ``status`` if the persisted one still has the generation ``status`` was read
    from; returns what was written (generation + 1). Raises :class:`StatusConflict` (with the persisted status)
    when someone else wrote in between."""
    with locks.hold(svc, model, f"save the ramp status of v{status.candidate}"):
        persisted = load_status(svc, model, status.candidate)
        current = persisted.generation if persisted is not None else 0
        if current != status.generation:
            raise StatusConflict(
                f"ramp status of {model} v{status.candidate} changed under this writer: persisted generation "
                f"{current} ({persisted.phase.value if persisted else 'none'}), written from generation "
                f"{status.generation}; re-read it before acting", persisted)
        saved = replace(status, generation=current + 1)
        tags = {Tag.CANARY: saved.to_json()}
        if saved.heartbeat_at:
            tags[Tag.HEARTBEAT] = f"{saved.heartbeat_at:.3f}"
        svc.registry.set_tags(model, saved.candidate, tags)
        return saved


def heartbeat(svc: Services, model: str, version: str, now: float | None = None) -> float:
    """The release flow is alive: write ``canaryflow.heartbeat`` (epoch s) on the version being released."""
    now = time.time() if now is None else now
    svc.registry.set_tags(model, version, {Tag.HEARTBEAT: f"{now:.3f}"})
    return now


def last_heartbeat(tags: dict[str, str]) -> float:
    """The latest sign of life a release flow left on a version's tags (0.0: none)."""
    beats = [0.0]
    try:
        beats.append(float(tags.get(Tag.HEARTBEAT) or 0.0))
    except ValueError:
        pass  # a user-writable tag: garbage means no signal
    raw = tags.get(Tag.CANARY)
    if raw:
        try:
            beats.append(float(ctl.CanaryStatus.from_json(raw).heartbeat_at))
        except (ValueError, TypeError, KeyError):
            pass
    return max(beats)


class Heartbeat:
    """Writes the heartbeat of one release every ``every_s`` from a daemon thread, for the life of the flow
    process: a killed process stops beating, which is what reconcile looks for."""

    def __init__(self, svc: Services, model: str, version: str, every_s: float) -> None:
        self.svc, self.model, self.version, self.every_s = svc, model, version, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{version}", daemon=True)

    def start(self) -> Heartbeat:
        heartbeat(self.svc, self.model, self.version)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                heartbeat(self.svc, self.model, self.version)
            except Exception:  # noqa: BLE001 - a missed beat is retried next time; the flow must not die of it
                continue

    def stop(self) -> None:
        self._stop.set()


def desired_route(status: ctl.CanaryStatus) -> Route:
    """What the router serves in a ramp's state."""
    if status.phase in (ctl.Phase.PROMOTED, ctl.Phase.BAKING):
        return Route(status.candidate)
    if status.phase is ctl.Phase.ROLLED_BACK:
        return Route(status.champion)
    if status.shadow:
        return Route(status.champion, status.candidate, 100.0, shadow=True)
    return Route(status.champion, status.candidate, status.weight)


def apply_route(svc: Services, model: str, status: ctl.CanaryStatus) -> None:
    """Make serving match what ``status`` says."""
    converge(svc, model, desired_route(status))


def pending(svc: Services, st: ReleaseState) -> ctl.CanaryStatus | None:
    """A ramp of this candidate left half-way that can resume: same champion, candidate still on TorchServe."""
    status = load_status(svc, st.model, st.version)
    if status is None or status.done or not _same_ramp(status, st):
        return None
    try:
        registered = st.version in svc.backend.versions(st.model)
    except Exception:
        registered = False
    return status if registered else None


def _same_ramp(status: ctl.CanaryStatus, st: ReleaseState) -> bool:
    """The persisted ramp is this release's: same champion, or a bake whose promotion already moved the alias."""
    return status.champion == st.champion or (status.phase is ctl.Phase.BAKING and st.champion == st.version)


def promote_for_bake(svc: Services, model: str, status: ctl.CanaryStatus) -> ctl.CanaryStatus:
    """At 100%: the candidate becomes the champion (route, TorchServe default, aliases) while the bake watches it;
    the previous champion stays registered, and is the ``previous`` alias. Returns the status with the alias it
    replaced, so an undo restores it."""
    status = replace(status, previous=svc.registry.alias_version(model, svc.settings.release.previous_alias))
    converge(svc, model, Route(status.candidate), champion=status.candidate, previous=status.champion)
    return status


def undo_bake(svc: Services, model: str, status: ctl.CanaryStatus) -> None:
    """A bake that failed: the previous champion serves again, as champion, before anything else happens."""
    converge(svc, model, Route(status.champion), champion=status.champion, previous=status.previous or DELETE)


def start_or_resume(svc: Services, st: ReleaseState) -> ctl.CanaryStatus:
    """Resume the persisted ramp of this candidate, or start a new one against the current champion; returns the
    persisted status (apply, save and tag happen under the model's state lock)."""
    with locks.hold(svc, st.model, f"start the ramp of v{st.version}"):
        return _start_or_resume(svc, st)


def _start_or_resume(svc: Services, st: ReleaseState) -> ctl.CanaryStatus:
    persisted = status = load_status(svc, st.model, st.version)
    if status is None or status.done or not _same_ramp(status, st):
        status = replace(ctl.start(st.champion or "", st.version, st.policy.canary, time.time()),
                         generation=persisted.generation if persisted else 0)
        st.notes.append(f"canary started at {status.weight:g}%{' (shadow)' if status.shadow else ''}")
    else:
        st.notes.append(f"canary resumed at {status.weight:g}% after {status.iterations} analyses")
    apply_route(svc, st.model, status)
    status = save_status(svc, st.model, replace(status, heartbeat_at=time.time()))
    svc.registry.set_tags(st.model, st.version, {Tag.STATUS: ReleaseStatus.CANARY,
                                                 Tag.REASON: f"canary at {status.weight:g}%"})
    return status


def analyse(svc: Services, st: ReleaseState, status: ctl.CanaryStatus,
            source: MetricsSource | None = None, now: float | None = None) -> ctl.Decision:
    """Measure the step's window, decide, apply the decision, persist and record it, all under the model's state
    lock: a rollback that landed before it is seen here and nothing is re-applied."""
    with locks.hold(svc, st.model, f"analyse the ramp of v{st.version}"):
        return _analyse(svc, st, status, source, now)


def _analyse(svc: Services, st: ReleaseState, status: ctl.CanaryStatus,
             source: MetricsSource | None, now: float | None) -> ctl.Decision:
    persisted = load_status(svc, st.model, st.version)
    if persisted is not None and persisted.done and not status.done:
        # someone else ended the ramp (a manual rollback): respect it
        return ctl.Decision(ctl.Action.ROLLBACK if persisted.phase is ctl.Phase.ROLLED_BACK else ctl.Action.PROMOTE,
                            persisted, [], persisted.reasons or [f"ramp ended elsewhere: {persisted.phase.value}"])
    if persisted is None or persisted.generation != status.generation:
        raise StatusConflict(f"ramp status of {st.model} v{st.version} is at generation "
                             f"{persisted.generation if persisted else 'none'}, this run holds {status.generation}: "
                             "another writer owns the ramp; this run stops without touching the router", persisted)
    now = time.time() if now is None else now
    source = source or svc.metrics
    # the same live rows answered by both versions (off band): what a split alone cannot compare
    pairs = replay.collect(svc, st, status, now) if st.policy.canary.replay else None
    try:
        window = source.window(st.model, status.step_started_at, now - FLUSH_DELAY_S)
        m = ctl.Measurements(window, now, pairs=pairs)
    except MetricsSourceError as exc:
        window, m = None, ctl.Measurements(None, now, str(exc), pairs=pairs)
    decision = ctl.decide(status, m, st.policy.canary)
    if decision.action is ctl.Action.BAKE:
        decision = replace(decision, status=promote_for_bake(svc, st.model, decision.status))
    elif decision.action is ctl.Action.ROLLBACK and status.phase is ctl.Phase.BAKING:
        undo_bake(svc, st.model, decision.status)
    elif decision.action is not ctl.Action.HOLD:
        apply_route(svc, st.model, decision.status)
    decision = replace(decision, status=save_status(svc, st.model, replace(decision.status, heartbeat_at=now)))
    record(svc, st, decision, window, now)
    if decision.status.done:
        st.results.append(judged("canary", decision.action is ctl.Action.PROMOTE, "; ".join(decision.reasons),
                                 {"analyses": decision.status.iterations, "weight": decision.status.weight,
                                  "failed_analyses": decision.status.failed_checks},
                                 {"steps": st.policy.canary.steps}))
    return decision


def record(svc: Services, st: ReleaseState, d: ctl.Decision, window: Window | None, now: float) -> None:
    """One analysis -> MLflow metrics (step = analysis number) and a line of ``canary.jsonl``."""
    s = d.status
    line: dict[str, Any] = {"t": now, "iteration": s.iterations, "action": d.action.value, "weight": s.weight,
                            "phase": s.phase.value, "reasons": d.reasons, "checks": [c.to_dict() for c in d.checks]}
    metrics = {"canary.weight": s.weight, "canary.failed_checks": s.failed_checks}
    if window is not None:
        for role, version in (("candidate", s.candidate), ("champion", s.champion)):
            v = window.get(version)
            stats = {"requests": v.requests, "error_ratio": v.error_ratio, "p50_ms": v.p50_ms, "p95_ms": v.p95_ms,
                     "p99_ms": v.p99_ms, "labelled": v.labelled, "accuracy": v.accuracy}
            line[role] = stats
            metrics.update({f"canary.{role}.{k}": x for k, x in stats.items() if x is not None})
    for c in d.checks:
        if c.measured is not None:
            metrics[f"canary.check.{c.name}"] = c.measured
    svc.registry.log_step(st.run_id, metrics, step=s.iterations)
    path = timeline_file(st)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(line, default=str) + "\n")


def timeline_file(st: ReleaseState) -> Path:
    return st.workdir / "canary.jsonl"


def read_timeline(st: ReleaseState) -> list[dict[str, Any]]:
    path = timeline_file(st)
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def checks_table(st: ReleaseState) -> list[dict[str, Any]]:
    """Every check of every analysis, one row each: for the Prefect table artifact."""
    rows = []
    for line in read_timeline(st):
        for c in line["checks"]:
            rows.append({"analysis": line["iteration"], "weight": line["weight"], "check": c["name"],
                         "outcome": c["outcome"], "measured": _fmt(c["measured"]), "threshold": _fmt(c["threshold"]),
                         "reason": c["reason"]})
        rows.append({"analysis": line["iteration"], "weight": line["weight"], "check": "decision",
                     "outcome": line["action"], "measured": "", "threshold": "", "reason": "; ".join(line["reasons"])})
    return rows


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"


def retire(svc: Services, model: str, version: str, grace_s: float) -> str:
    """Unregister a former champion from TorchServe after the grace period, unless it serves again."""
    if grace_s > 0:
        time.sleep(grace_s)
    with locks.hold(svc, model, f"retire v{version}"):  # check and unregister with no rollback in between
        route = svc.router.routes().get(model, {})
        if version in (route.get("stable"), route.get("canary")):
            return f"v{version} is routed again; kept"
        try:
            svc.backend.unregister(model, version)
        except Exception as exc:
            return f"retiring v{version} failed: {exc}"
    return f"v{version} retired from TorchServe after {grace_s:g} s (its .mar stays in the model store)"


def write_timeline_png(st: ReleaseState, path: Path) -> Path | None:
    """Weight, p95 and error ratio per version over the ramp; None when no analysis ran."""
    lines = read_timeline(st)
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = lines[0]["t"]
    ts = [x["t"] - t0 for x in lines]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].step(ts, [x["weight"] for x in lines], where="post", color="tab:purple")
    axes[0].set_ylabel("candidate traffic %")
    for role, color in (("champion", "tab:blue"), ("candidate", "tab:orange")):
        axes[1].plot(ts, [(x.get(role) or {}).get("p95_ms") for x in lines], "o-", color=color, label=role)
        axes[2].plot(ts, [(x.get(role) or {}).get("error_ratio") for x in lines], "o-", color=color, label=role)
    axes[1].set_ylabel("p95 ms")
    axes[2].set_ylabel("error ratio")
    axes[2].set_xlabel("seconds since first analysis")
    axes[1].legend()
    last = lines[-1]
    fig.suptitle(f"canary of {st.model} v{st.version}: {last['action']} at {last['weight']:g}%")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
