"""Canary benchmark: how fast a bad candidate is caught, and how many requests it served before it was.

    .venv/bin/python bench/canary_bench.py            # the default ramp policy (5/25/50/100 %, every 30 s, 50 req)
    .venv/bin/python bench/canary_bench.py --quick    # a 10 s interval and 30 requests: same checks, faster

One process run: a private local stack on free ports; the breast-cancer MLP is released as champion; then, under
steady live traffic (deployments/traffic.py, unpinned, sticky users, every answer recorded), three bad candidates
are released one after the other, each with one fault injected on live traffic only (the ``canaryflow.chaos``
version tag, allowed on this stack):

- ``errors``: 5 % of requests answer HTTP 500;
- ``latency``: +40 ms per request;
- ``flip``: predictions inverted for a subgroup (rows with mean radius above the median, about half the rows);
- ``flip2``: predictions inverted for a rare subgroup, about 2 % of traffic (the top 2 % of the feature whose
  rare rows are most mixed between the classes, so the class balance is kept).

Live rows are the holdout jittered by 1 % into a pool of distinct rows (real traffic rarely repeats a row
exactly; the pairwise replay compares each distinct row once). Each fault runs under the policies asked for, set
per model: ``split`` (the default ramp, pairwise replay included), ``split-only`` (the ramp as it was before the
pairwise replay: distributions only) and ``shadow`` (a shadow phase first: the champion answers, the candidate
gets mirrored copies). For each: time from the ramp's start to the
final decision, which check decided, the share of ALL requests in that window answered by the candidate, and the
share answered BADLY (an error, a slow answer, a flipped prediction). A fault that gets promoted is rolled back
by hand (``canaryflow.rollback``) before the next one. Next to it, what Flagger's documented example analysis
would allow (``interval: 1m``, ``threshold: 5``, starting at ``stepWeight`` 10 %): at least interval x threshold
before a rollback, at 10 % of traffic or more; Flagger has no check on what a model predicts, so the flip is never
caught.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

from bench.serving_bench import bench_settings, log  # noqa: E402
from canaryflow.core.registry import MlflowRegistry  # noqa: E402
from canaryflow.core.settings import CanarySettings  # noqa: E402
from canaryflow.local.demo import Segment, register_model, train_classifier, wait_for_release  # noqa: E402
from canaryflow.local.stack import LocalStack  # noqa: E402
from canaryflow.release.rollback import rollback  # noqa: E402
from canaryflow.services import Services  # noqa: E402
from deployments.traffic import LiveTraffic  # noqa: E402

RESULTS = PROJECT / "bench" / "results"
MODEL = "bench-canary"
FLAGGER = {"interval_s": 60, "threshold": 5, "step_weight": 10}  # Flagger docs' example Canary analysis


CHECKS = ("errors", "p95", "latency_u", "prediction_drift", "shadow_agreement", "agreement", "segment_agreement",
          "probability_delta", "live_accuracy")
POLICIES = {"split": {}, "split-only": {"replay": False}, "shadow": {"shadow": True}}


def faults(median_radius: float, rare: Segment) -> dict[str, dict[str, Any]]:
    return {
        "errors": {"chaos": {"error_ratio": 0.05}, "bad": lambda a: a.status >= 500, "group": None},
        "latency": {"chaos": {"latency_ms": 40}, "bad": lambda a: a.status == 200, "group": None},
        "flip": {"chaos": {"flip": {"column": 0, "above": median_radius}}, "bad": lambda a: a.subgroup,
                 "group": (0, median_radius)},
        "flip2": {"chaos": {"flip": {"column": rare.column, "above": rare.above}}, "bad": lambda a: a.subgroup,
                  "group": (rare.column, rare.above)},
    }


def row_pool(x_te: np.ndarray, y_te: np.ndarray, x_tr: np.ndarray, n: int = 5000,
             seed: int = 0) -> tuple[np.ndarray, Segment]:
    """``n`` distinct live rows (holdout rows jittered by 1 %) and the rare segment: the top 2 % of the feature
    whose top 2 % holds the most mixed labels (labels of the jittered rows are their source rows')."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x_te), n)
    pool = (x_te[idx] * rng.normal(1.0, 0.01, (n, x_te.shape[1]))).astype(np.float32)
    labels = y_te[idx]
    best: tuple[float, Segment] | None = None
    for j in range(pool.shape[1]):
        above = float(np.quantile(pool[:, j], 0.98))
        hit = pool[:, j] > above
        mixed = 1.0 - abs(float(labels[hit].mean()) - 0.5) * 2
        if best is None or mixed > best[0]:
            best = (mixed, Segment(j, above, f"f{j}"))
    assert best is not None
    return pool, best[1]


def register_candidate(uri: str, chaos: dict[str, Any], seed: int = 4) -> str:
    """A good model (same data, another seed) whose version carries the fault from its creation."""
    return register_model(uri, name=MODEL, seed=seed, tags={"canaryflow.chaos": chaos})[0]


def measure(stack: LocalStack, policy: str, name: str, fault: dict[str, Any], rows: np.ndarray,
            rps: float) -> dict[str, Any]:
    """One bad candidate under live traffic; the window is from its ramp's start to the final decision."""
    s = stack.settings
    registry = MlflowRegistry(s.mlflow_uri)
    registry.set_model_tag(MODEL, "canaryflow.policy", json.dumps({"canary": POLICIES[policy]}))
    column, above = fault["group"] or (0, float("inf"))
    with LiveTraffic(s.router_url, MODEL, rows, rps=rps, user_header=s.canary.user_header,
                     subgroup=lambda r: r[column] > above) as live:
        version = register_candidate(s.mlflow_uri, fault["chaos"])
        outcome = wait_for_release(s.mlflow_uri, MODEL, version, timeout_s=1800)
        decided = time.time()  # polled every second: within 1 s of the decision
    canary = json.loads(registry.get_version(MODEL, version).tags.get("canaryflow.canary", "{}"))
    started = canary.get("started_at", decided)
    window = [a for a in live.answers if started <= a.t <= decided]
    # a 5xx carries no X-Model-Version (TorchServe's error answer); only the candidate fails here, so they are its
    cand = [a for a in window if a.version == version or a.status >= 500 or a.status == 0]
    bad = [a for a in cand if fault["bad"](a)]
    flagger_s = FLAGGER["interval_s"] * FLAGGER["threshold"]
    bad_rate = {"errors": 0.05, "latency": 1.0}.get(name)
    row = {
        "policy": policy, "fault": name, "chaos": fault["chaos"], "version": version, "outcome": outcome.status,
        "reason": outcome.reason, "analyses": canary.get("iterations"), "weight_at_end": canary.get("weight"),
        "time_to_decision_s": round(decided - started, 1), "requests": len(window), "candidate_served": len(cand),
        "candidate_share": round(len(cand) / max(len(window), 1), 4), "bad_served": len(bad),
        "bad_share": round(len(bad) / max(len(window), 1), 4),
        "client_p95_ms": round(float(np.percentile([a.ms for a in window], 95)), 1) if window else None,
        "flagger_min_time_s": flagger_s if bad_rate else None,
        "flagger_bad_share": round(FLAGGER["step_weight"] / 100 * bad_rate, 4) if bad_rate else None,
    }
    if outcome.status == "released":  # a fault got through: put the champion back for the next one
        rollback(Services(s), MODEL, None, f"bench: {name} under {policy} was promoted", "canary-bench")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 s analyses, 30 requests per version")
    ap.add_argument("--rps", type=float, default=60.0, help="live traffic, requests per second")
    ap.add_argument("--faults", default="errors,latency,flip,flip2")
    ap.add_argument("--policies", default="split,split-only,shadow",
                    help="split: the default ramp (with pairwise replay); split-only: without the replay; shadow: "
                         "a shadow phase first")
    ap.add_argument("--keep-state", action="store_true")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="canaryflow-canary-bench-"))
    settings = bench_settings(work / ".canaryflow")
    # the faults are chaos builds; what the bench measures is whether the analysis would have promoted them
    canary = CanarySettings(allow_chaos=True, chaos_may_promote=True, retire_grace_s=5,
                            **({"interval_s": 10, "min_requests": 30} if args.quick else {}))
    # split-only turns the replay off per model: a loosening the bench's operator allows
    release = settings.release.model_copy(update={"allow_policy_loosening": True})
    settings = settings.model_copy(update={"canary": canary, "release": release})
    stack = LocalStack(settings)
    ok = False
    try:
        log(f"starting a local stack in {work}")
        stack.up(progress=lambda msg: log(f"stack: {msg}"))
        version, _, _ = register_model(settings.mlflow_uri, name=MODEL, seed=0)
        outcome = wait_for_release(settings.mlflow_uri, MODEL, version)
        if outcome.status != "released":
            raise SystemExit(f"champion not released: {outcome}")
        _, (x_tr, _), (x_te, y_te), _ = train_classifier(0, epochs=1)
        median = float(np.median(x_tr[:, 0]))
        rows, rare = row_pool(x_te, y_te, x_tr)
        log(f"champion v{version} released; policy: steps {canary.steps} %, every {canary.interval_s:g} s, "
            f">= {canary.min_requests} requests per version; live traffic {args.rps:g} req/s")
        table = []
        all_faults = faults(median, rare)
        for policy in args.policies.split(","):
            for name in args.faults.split(","):
                log(f"{policy}: fault {name}: {all_faults[name]['chaos']}")
                row = measure(stack, policy, name, all_faults[name], rows, args.rps)
                log(f"  -> {row['outcome']} after {row['time_to_decision_s']} s: {row['reason'][:160]}")
                table.append(row)
        print_table(table, canary)
        write(table, canary, args)
        ok = True
    finally:
        stack.down()
        if ok and not args.keep_state:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"state kept in {work}")
    return 0


def print_table(table: list[dict[str, Any]], canary: CanarySettings) -> None:
    print(f"\ncanary policy: steps {canary.steps} %, interval {canary.interval_s:g} s, min requests "
          f"{canary.min_requests}, rollback after {canary.max_failed_checks} failed analyses")
    print("| policy | fault | outcome | caught by | ramp start -> decision s | requests | candidate share "
          "| bad-served share | client p95 ms | Flagger example: min s / bad share |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in table:
        checks = [c for c in CHECKS if re.search(rf"(^|[ ;]){c}: ", r["reason"])]
        flagger = (f"{r['flagger_min_time_s']} / {r['flagger_bad_share']}" if r.get("flagger_min_time_s")
                   else "never caught: promoted")
        print(f"| {r['policy']} | {r['fault']} | {r['outcome']} | {', '.join(checks) or '-'} | "
              f"{r['time_to_decision_s']} | {r['requests']} | {r['candidate_share']:.3f} | {r['bad_share']:.4f} | "
              f"{r['client_p95_ms']} | {flagger} |")


def write(table: list[dict[str, Any]], canary: CanarySettings, args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    data = {"when": stamp, "policy": canary.model_dump(mode="json"), "rps": args.rps, "quick": args.quick,
            "flagger_reference": FLAGGER, "faults": table}
    for path in (RESULTS / f"canary-{stamp}.json", RESULTS / "canary-latest.json"):
        path.write_text(json.dumps(data, indent=2, default=str))
    log(f"results: {RESULTS / 'canary-latest.json'}")


if __name__ == "__main__":
    sys.exit(main())
