"""The load-test gate's judgement of one locust run (deployments/loadtest.py measures), and its retry.

Pure: numbers in, :class:`GateResult` out. The peer loaded in the same window is what separates a slow model
(only the candidate slow) from a busy machine (both slow: INCONCLUSIVE, measured again); a speed failure is
measured again too before it counts (:func:`needs_confirmation`): one short window can be slow for the candidate
alone on a shared machine, a slow model is slow every time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from canaryflow.core.settings import LoadTestSettings
from validation.results import GateResult, Outcome, judged

if TYPE_CHECKING:
    from deployments.loadtest import LoadTestResult

GATE = "load_test"


def _measured(result: LoadTestResult) -> dict[str, Any]:
    measured = {k: v for k, v in result.to_dict().items() if k not in ("files", "error", "peer")}
    measured["files"] = dict(result.files)
    if (peer := result.peer) is not None:
        measured.update({"peer_role": peer.role, "peer_version": peer.version, "peer_requests": peer.requests,
                         "peer_failure_ratio": peer.failure_ratio, "peer_p50_ms": peer.p50_ms,
                         "peer_p95_ms": peer.p95_ms, "peer_p99_ms": peer.p99_ms, "peer_rps": peer.rps,
                         "peer_error": peer.error or ""})
    return measured


def _peer_problem(peer: LoadTestResult, settings: LoadTestSettings) -> str | None:
    """Why the peer's numbers cannot be compared with (None: they can)."""
    if peer.error:
        return peer.error
    if peer.requests == 0:
        return "no request completed"
    if peer.failure_ratio > settings.max_failure_ratio:
        return f"failure ratio {peer.failure_ratio:.2%} > {settings.max_failure_ratio:.2%}"
    return None


def _peer_busy(peer: LoadTestResult, settings: LoadTestSettings) -> str | None:
    """How the peer shows a busy machine (None: it ran fast): slow answers, or the load was not even offered."""
    busy_ms = settings.peer_busy_share * settings.max_p95_ms
    if peer.p95_ms > busy_ms:
        return f"also took p95 {peer.p95_ms:.1f} ms (> {busy_ms:.1f} ms)"
    if peer.rps < settings.min_rps:
        return f"also got only {peer.rps:.1f} req/s (< {settings.min_rps:.1f} req/s)"
    return None


def gate_load_test(result: LoadTestResult, settings: LoadTestSettings) -> GateResult:
    """Judge the candidate's p95, failure ratio and throughput, and, with a champion peer, its p95 against the
    champion's (``p95 <= champion p95 * max_p95_ratio + p95_slack_ms``).

    ERROR when nothing was measured (unreachable target, crashed locust); INCONCLUSIVE when no request completed,
    or when the candidate missed a latency or throughput bar while the peer, loaded in the same window, was slow
    too (the machine was busy), unless the candidate's own excess over the peer's p95 exceeds ``max_p95_ms``.
    A failure ratio over the limit always fails: errors are the model's. A peer that could not be measured
    leaves the absolute bars alone, and the reason says so.
    """
    measured = _measured(result)
    thresholds: dict[str, Any] = {"max_p95_ms": settings.max_p95_ms,
                                  "max_failure_ratio": settings.max_failure_ratio, "min_rps": settings.min_rps}
    if result.peer is not None:
        thresholds.update(max_p95_ratio=settings.max_p95_ratio, p95_slack_ms=settings.p95_slack_ms,
                          peer_busy_share=settings.peer_busy_share)
    if result.error:
        return GateResult(GATE, Outcome.ERROR, f"load test could not be measured: {result.error}", measured,
                          thresholds)
    if result.requests == 0:
        return GateResult(GATE, Outcome.INCONCLUSIVE, "no request completed; nothing to judge", measured,
                          thresholds)
    peer = result.peer
    problem = _peer_problem(peer, settings) if peer is not None else None
    usable = peer if peer is not None and problem is None else None
    p95, ratio, rps, limit = result.p95_ms, result.failure_ratio, result.rps, settings.max_p95_ms
    top = next(iter(result.failure_messages), "")
    latency_ok, errors_ok, rps_ok = p95 <= limit, ratio <= settings.max_failure_ratio, rps >= settings.min_rps
    checks = [
        (latency_ok, f"p95 {p95:.1f} ms {'<=' if latency_ok else '>'} {limit:.1f} ms"),
        (errors_ok, f"failure ratio {ratio:.2%} {'<=' if errors_ok else '>'} {settings.max_failure_ratio:.2%}"
                    + (f" (most common: {top[:120]})" if top and ratio > 0 else "")),
        (rps_ok, f"throughput {rps:.1f} req/s {'>=' if rps_ok else '<'} {settings.min_rps:.1f} req/s"),
    ]
    if usable is not None and usable.role == "champion":
        bound = usable.p95_ms * settings.max_p95_ratio + settings.p95_slack_ms
        checks.append((p95 <= bound, f"p95 {p95:.1f} ms {'<=' if p95 <= bound else '>'} {bound:.1f} ms "
                                     f"({usable.label} p95 {usable.p95_ms:.1f} ms x {settings.max_p95_ratio:g} "
                                     f"+ {settings.p95_slack_ms:g} ms)"))
    ok = all(passed for passed, _ in checks)
    said = "; ".join(text for passed, text in checks if passed == ok)
    context = f" [{result.requests} requests, {result.users} users, {result.duration_s:.0f} s"
    if usable is not None:
        context += f"; peer {usable.label}: p95 {usable.p95_ms:.1f} ms, {usable.rps:.1f} req/s]"
    elif peer is not None:
        context += f"; peer {peer.label} not measured ({problem}): judged on the absolute bars only]"
    else:
        context += "]"
    busy = _peer_busy(usable, settings) if usable is not None else None
    if ok or not errors_ok or (latency_ok and rps_ok) or busy is None:
        return judged(GATE, ok, said + context, measured, thresholds)
    assert usable is not None  # busy is only known for a usable peer
    excess = p95 - usable.p95_ms
    busy_bound = usable.p95_ms * settings.busy_max_ratio + settings.p95_slack_ms
    if excess > limit and p95 > busy_bound:
        # a busy machine stretches every answer by a factor; a slow model also adds its own time on top
        return judged(GATE, False, f"{said}; the peer ({usable.label}) {busy}, but the candidate's own excess "
                                   f"{excess:.1f} ms > {limit:.1f} ms and p95 {p95:.1f} ms > {busy_bound:.1f} ms "
                                   f"(peer x {settings.busy_max_ratio:g} + {settings.p95_slack_ms:g} ms): slow even "
                                   f"on a busy machine{context}", measured, thresholds)
    return GateResult(GATE, Outcome.INCONCLUSIVE, f"{said} but the peer ({usable.label}) {busy}: the machine is "
                                                  f"busy, not the model{context}", measured, thresholds)


def settle_busy(last: GateResult, attempts: int, settings: LoadTestSettings) -> GateResult:
    """The verdict when every attempt found the machine busy (``on_busy``): ``relative`` judges the candidate
    against the peer loaded in the same window (``p95 <= peer p95 * max_p95_ratio + p95_slack_ms``; its own
    excess was already held to ``max_p95_ms``), ``fail`` keeps INCONCLUSIVE, so the release ends as failed and
    can be re-run. Anything but a busy-machine INCONCLUSIVE is returned as it is."""
    m = last.measured
    busy = (last.outcome is Outcome.INCONCLUSIVE and m.get("requests", 0) > 0 and m.get("peer_requests", 0) > 0
            and not m.get("peer_error"))
    if not busy or settings.on_busy != "relative":
        return last
    p95, peer = float(m["p95_ms"]), float(m["peer_p95_ms"])
    bound = peer * settings.busy_max_ratio + settings.p95_slack_ms
    ok = p95 <= bound
    reason = (f"machine busy in all {attempts} attempts, so judged against the peer of the same window: p95 "
              f"{p95:.1f} ms {'<=' if ok else '>'} {bound:.1f} ms (peer {m.get('peer_role')} p95 {peer:.1f} ms x "
              f"{settings.busy_max_ratio:g} + {settings.p95_slack_ms:g} ms); last attempt: {last.reason}")
    return GateResult(GATE, Outcome.PASSED if ok else Outcome.FAILED, reason, {**m, "busy_machine": True},
                      {**last.thresholds, "on_busy": settings.on_busy})


def needs_confirmation(result: GateResult) -> bool:
    """A latency or throughput failure with the failure ratio within its bar: one window of a few seconds on a
    shared machine can be slow for the candidate alone (a stalled worker, a burst of other work landing on its
    core), so it is measured again before it counts. Errors are never a moment of the machine: they count at
    once."""
    m, t = result.measured, result.thresholds
    return (result.outcome is Outcome.FAILED and m.get("requests", 0) > 0 and "max_failure_ratio" in t
            and float(m.get("failure_ratio", 1.0)) <= float(t["max_failure_ratio"]))


def _tally(tried: list[GateResult]) -> tuple[list[GateResult], list[GateResult], list[GateResult]]:
    """(passed, failed needing confirmation, failed outright) among the attempts."""
    passes = [r for r in tried if r.outcome is Outcome.PASSED]
    failed = [r for r in tried if r.outcome is Outcome.FAILED]
    return passes, [r for r in failed if needs_confirmation(r)], [r for r in failed if not needs_confirmation(r)]


def _settled(tried: list[GateResult]) -> bool:
    passes, soft, hard = _tally(tried)
    return bool(hard) or len(soft) >= 2 or len(passes) >= 2 or (len(passes) == 1 and not soft)


def retry_gate(measure: Callable[[int], GateResult], attempts: int, pause_s: float,
               sleep: Callable[[float], None] = time.sleep) -> list[GateResult]:
    """``measure(attempt)`` (1-based), ``pause_s`` apart, at most ``attempts`` times, until settled: a failure
    that needs no confirmation, or two conclusive results that agree (one pass is enough while no failure needing
    confirmation came before it). INCONCLUSIVE and ERROR runs are measured again (a busy machine may calm down;
    an unmeasurable run may have hit a restart). Returns every result; :func:`verdict` reads them."""
    results = [measure(1)]
    while not _settled(results) and len(results) < attempts:
        sleep(pause_s)
        results.append(measure(len(results) + 1))
    return results


def verdict(tried: list[GateResult]) -> GateResult:
    """The one result that stands for ``tried`` (:func:`retry_gate`'s attempts): a failure needing no
    confirmation wins; otherwise the majority of the conclusive results (a tie fails: the slowness was not ruled
    out), its latest one, with the count added to its reason; no conclusive result: the last attempt."""
    passes, soft, hard = _tally(tried)
    if hard:
        return hard[-1]
    if not passes and not soft:
        return tried[-1]
    chosen = passes[-1] if len(passes) > len(soft) else soft[-1]
    if len(passes) + len(soft) < 2:
        return chosen
    return replace(chosen, reason=f"{chosen.reason} ({len(soft)} of {len(passes) + len(soft)} conclusive "
                                  f"measurements failed on speed)")
