"""The steps of a release as plain functions; flows/release.py strings them together as Prefect tasks.

Each step takes the :class:`Services` and the :class:`ReleaseState` so it can be unit-tested with fakes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from canaryflow.core import seal
from canaryflow.core.errors import CanaryRolledBack, ConfigError, GateFailed, PackagingError, Refused
from canaryflow.core.locks import StatusConflict
from canaryflow.core.names import name_problem
from canaryflow.core.policy import apply_policy
from canaryflow.core.registry import VersionInfo
from canaryflow.core.settings import Settings
from canaryflow.core.state import ReleaseStatus, Route, Tag
from canaryflow.model.packaging import Bundle, archive_files, example_rows, input_contract
from canaryflow.model.sandbox import Sandbox
from canaryflow.release.converge import KEEP, ChaosBuild, converge
from canaryflow.services import Services
from deployments.archive import Archive, build_mar
from deployments.smoke import smoke_test
from validation.results import GateResult
from validation.shape import check_shape

_log = logging.getLogger(__name__)


@dataclass
class ReleaseState:
    """What one release knows so far; passed from task to task."""

    model: str
    version: str
    run_id: str
    workdir: Path
    champion: str | None
    info: VersionInfo
    run_url: str = ""
    policy: Settings = field(default_factory=Settings)
    results: list[GateResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # extra markdown sections for the release summary
    variant: str = ""  # the serving variant the optimization gate chose
    sandbox: Sandbox | None = field(default=None, repr=False, compare=False)

    def model_code(self) -> Sandbox:
        """Where the gates run the candidate's (and the champion's) own code: one sandboxed child process for this
        release, started at first use (see :mod:`canaryflow.model.sandbox`)."""
        if self.sandbox is None or self.sandbox.closed:  # none yet, or the model's code killed it
            cfg = self.policy.release  # operator-owned: a model's policy has no release section
            self.sandbox = Sandbox(cfg.sandbox_user, cfg.sandbox_timeout_s)
            _log.info("release of %s v%s: %s", self.model[:80], self.version, self.sandbox.isolation)
            self.notes.append(f"Sandbox: {self.sandbox.isolation}.")
        return self.sandbox

    def close_sandbox(self) -> None:
        """Stop the sandbox (its files go with it); the next :meth:`model_code` starts a fresh one."""
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None

    def record(self, result: GateResult) -> GateResult:
        """Keep the result; raise GateFailed when it did not pass."""
        self.results.append(result)
        if not result.passed:
            raise GateFailed(result.gate, result.reason, result.outcome.value)
        return result


def begin(svc: Services, model: str, version: str) -> ReleaseState:
    """Look the version up, open (or reopen) its release run and mark it as being released. A name outside the
    name rule or a per-model policy that is not allowed is refused: tagged ``rejected`` with the reason, nothing
    else touched."""
    problem = name_problem(model, version)
    if problem:
        refuse(svc, model, version, problem)
    info = svc.registry.get_version(model, version)
    try:
        policy = apply_policy(svc.settings, svc.registry.model_tags(model).get(Tag.POLICY))
    except ConfigError as exc:
        refuse(svc, model, version, str(exc))
    cfg = svc.settings.release
    run_id = svc.registry.release_run(cfg.experiment, model, str(version))
    champion = seal.trusted_champion(svc.registry, svc.paths, model)  # the sealed one, whatever the alias says
    if seal.alias_forged(svc.registry, model, cfg.champion_alias, champion):
        _log.warning("release of %s v%s compares with the pipeline's champion, not the alias", model[:80], version)
    st = ReleaseState(model, str(version), run_id, svc.paths.work_dir / f"{model}-v{version}", champion, info,
                      svc.registry.run_url(run_id), policy)
    if not already_released(st):
        svc.registry.set_tags(model, version, {Tag.STATUS: ReleaseStatus.RELEASING, Tag.REASON: "release started",
                                               Tag.RELEASE_RUN: run_id})
    return st


def refuse(svc: Services, model: str, version: str, reason: str) -> NoReturn:
    """Tag the version ``rejected`` with ``reason`` (what a registry user wrote is not allowed) and raise
    :class:`Refused`; nothing is served, staged or routed."""
    _log.warning("release of %r v%r refused: %s", model[:80], str(version)[:40], reason)
    try:
        svc.registry.set_tags(model, str(version), {Tag.STATUS: ReleaseStatus.REJECTED, Tag.REASON: reason[:4000]})
    except Exception as exc:  # noqa: BLE001 - the refusal stands even if the tag cannot be written
        _log.warning("could not tag %r v%r rejected: %s", model[:80], str(version)[:40], exc)
    raise Refused(reason)


def already_released(st: ReleaseState) -> bool:
    """A re-run of a finished release has nothing to do."""
    return st.info.tags.get(Tag.STATUS) == ReleaseStatus.RELEASED and st.champion == st.version


def version_number(version: str | None) -> int:
    """MLflow numbers versions 1, 2, ...; anything else sorts first (oldest)."""
    return int(version) if version and version.isdigit() else -1


def downgrade_reason(model: str, version: str, champion: str | None) -> str | None:
    """Why releasing ``version`` would be a downgrade (older than the champion), or None when it is not."""
    if champion is None or version_number(version) >= version_number(champion) or version == champion:
        return None
    return (f"older than champion v{champion}; release it with "
            f"canaryflow release {model} {version} --allow-older")


def skip(st: ReleaseState, allow_older: bool = False) -> Ending | None:
    """Why this run has nothing to release (its status and reason), or None: a re-run of a finished release, or a
    version older than the champion that no person asked for."""
    if already_released(st):
        return Ending(ReleaseStatus.RELEASED, "already released")
    older = None if allow_older else downgrade_reason(st.model, st.version, st.champion)
    return Ending(ReleaseStatus.SKIPPED, older) if older else None


def needs_canary(st: ReleaseState) -> bool:
    """A champion to compare with, and a policy with steps or a shadow phase."""
    policy = st.policy.canary
    return bool(st.champion and st.champion != st.version and (policy.steps or policy.shadow))


def fetch(svc: Services, st: ReleaseState) -> Path:
    """Download the version's MLflow model into the release's work dir (fresh each time)."""
    target = st.workdir / "mlflow-model"
    if target.exists():
        shutil.rmtree(target)
    return svc.registry.download(st.model, st.version, target)


def shape(st: ReleaseState, model_dir: Path) -> GateResult:
    """The shape gate: a batch shaped by the signature gives one finite row of scores per input row."""
    rows = example_rows(model_dir, input_contract(model_dir), min_rows=3)
    return st.record(check_shape(st.model_code().predictor(model_dir), rows.shape[1], rows))


def archive(svc: Services, st: ReleaseState, bundle: Bundle) -> Archive:
    """Build the .mar and record it (file and sha256) on the release run."""
    bundle = with_chaos(svc, st, bundle)
    mar = build_mar(bundle.model_file, archive_files(bundle, st.workdir / "archive-extra"), model=st.model,
                    version=st.version, model_store=svc.paths.model_store)
    svc.registry.log_to_run(st.run_id, params={"mar_sha256": mar.sha256, "mar_file": mar.path.name,
                                               "serving_format": bundle.meta.format},
                            metrics={"mar_size_bytes": mar.size_bytes}, files=[mar.path, bundle.meta_file],
                            artifact_path="torchserve")
    svc.registry.set_tags(st.model, st.version, {"canaryflow.mar_sha256": mar.sha256})
    return mar


def with_chaos(svc: Services, st: ReleaseState, bundle: Bundle) -> Bundle:
    """The version's ``canaryflow.chaos`` tag (fault injection on live traffic) into the serving meta, when the
    stack allows it (``CANARYFLOW_CANARY__ALLOW_CHAOS``, off by default; never per-model policy)."""
    raw = st.info.tags.get(Tag.CHAOS)
    if not raw:
        return bundle
    if not svc.settings.canary.allow_chaos:
        st.notes.append(f"tag {Tag.CHAOS} ignored: fault injection is off (CANARYFLOW_CANARY__ALLOW_CHAOS)")
        return bundle
    try:
        meta = dataclasses.replace(bundle.meta, chaos=json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise PackagingError(f"tag {Tag.CHAOS} is not a valid chaos spec: {exc}") from exc
    meta.save(bundle.meta_file)
    st.notes.append(f"fault injection on live traffic: {raw}")
    return dataclasses.replace(bundle, meta=meta)


def stage(svc: Services, st: ReleaseState, mar: Archive, model_dir: Path) -> GateResult:
    """Register the version on TorchServe, warm it up and smoke-test it through the router (pinned)."""
    svc.backend.register(st.model, st.version, mar.path)
    rows = example_rows(model_dir, input_contract(model_dir), min_rows=svc.settings.release.smoke_rows)
    return st.record(smoke_test(svc.settings.router_url, st.model, st.version, rows,
                                warmup=svc.settings.serving.warmup_requests, pin=svc.router.pin_credentials()))


def promote(svc: Services, st: ReleaseState) -> str:
    """Route the model to the candidate, make it TorchServe's default, and move the aliases; returns the reason.

    Until the canary ramp exists this is a direct cut-over once the candidate passed every gate.
    """
    cfg = svc.settings.release
    previous = st.champion if st.champion and st.champion != st.version else KEEP
    converge(svc, st.model, Route(st.version), champion=st.version, previous=previous)
    return f"serving as {cfg.champion_alias}" + (f", replacing v{st.champion}" if st.champion else "")


@dataclass(frozen=True)
class Ending:
    """How a release run ended: the status to record, its reason, and whether this run still owns the version's
    serving state (False: another run took the ramp over; this one must not touch the router, TorchServe or the
    tags, or it would undo the other run's step)."""

    status: str
    reason: str
    owns_state: bool = True


UNFINISHED = Ending(ReleaseStatus.FAILED, "release did not finish")


def expected(exc: BaseException) -> bool:
    """An exception that is an outcome of the release, not an error in it: a gate or the canary judged (or could
    not judge) the model, a name or policy was refused, another run owns the ramp. The flow ends in a named state
    with the reason; anything else is raised, with its traceback, after the same cleanup."""
    return isinstance(exc, GateFailed | Refused | StatusConflict | ChaosBuild)


def ending(exc: BaseException) -> Ending:
    """Classify the exception a release run stopped with."""
    if isinstance(exc, StatusConflict):
        return Ending(ReleaseStatus.SUPERSEDED, f"another run owns the ramp now: {exc}", owns_state=False)
    if isinstance(exc, CanaryRolledBack):
        return Ending(ReleaseStatus.ROLLED_BACK, str(exc))
    if isinstance(exc, ChaosBuild):  # judged: fault injection is never promoted, however well it did
        return Ending(ReleaseStatus.REJECTED, str(exc))
    if isinstance(exc, GateFailed):
        # an inconclusive or unmeasurable gate judged nothing: "failed" (run it again), not "rejected"
        judged = exc.outcome not in ("inconclusive", "error")
        return Ending(ReleaseStatus.REJECTED if judged else ReleaseStatus.FAILED, str(exc))
    return Ending(ReleaseStatus.FAILED, f"{type(exc).__name__}: {exc}")


def stop(svc: Services, st: ReleaseState, reason: str) -> str:
    """Take a release that did not promote off TorchServe (production untouched); returns the reason to record."""
    route = svc.router.route(st.model)
    if route is not None and route.canary == st.version and st.champion:
        route = Route(st.champion)  # a ramp cut short by an error: all traffic back first
        converge(svc, st.model, route)
    routed = route.stable if route else None
    if st.version not in (st.champion, routed):
        try:
            svc.backend.unregister(st.model, st.version)
        except Exception as exc:  # cleanup must not hide the reason the release stopped
            reason = f"{reason} (and unregistering failed: {exc})"
    return reason


def report_files(measured: dict) -> list[Path]:
    """The report files a gate wrote that exist: ``measured["files"]`` is a list of paths or a {kind: path} dict."""
    files = measured.get("files") or []
    paths = files.values() if isinstance(files, dict) else files
    return [Path(f) for f in paths if isinstance(f, str) and Path(f).is_file()]


def finish(svc: Services, st: ReleaseState, status: str, reason: str) -> None:
    """Write every gate result to the release run (metrics, thresholds, report files) and the version's tags.

    The status tag is written last, so whoever sees a final status also sees every gate and the reason.
    """
    path = st.workdir / "gates.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.to_dict() for r in st.results], indent=2, default=str))
    svc.registry.log_to_run(st.run_id, files=[path], params={"model": st.model, "version": st.version,
                                                             "champion_before": st.champion or "none"})
    for r in st.results:
        numbers = {f"{r.gate}.{k}": float(v) for k, v in r.measured.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        svc.registry.log_to_run(
            st.run_id, metrics={f"gate.{r.gate}.passed": float(r.passed), **numbers},
            params={f"threshold.{r.gate}.{k}": v for k, v in r.thresholds.items()},
            files=report_files(r.measured),
            artifact_path=f"gates/{r.gate}")
    svc.registry.set_tags(st.model, st.version,
                          {Tag.gate(r.gate): f"{r.outcome.value}: {r.reason}"[:5000] for r in st.results})
    svc.registry.finish_run(st.run_id, "FINISHED" if status == ReleaseStatus.RELEASED else "FAILED")
    svc.registry.set_tags(st.model, st.version, {Tag.STATUS: status, Tag.REASON: reason[:4000]})
