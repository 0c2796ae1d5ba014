"""The canary's pairwise replay: recent live rows answered again by the champion and the candidate, out of band.

The handler appends the rows of live (unpinned, non-replay) requests to ``<state>/traffic/<model>.jsonl``. At each
analysis :func:`collect` reads the rows appended since the last one (a cursor kept in the release's work dir),
drops rows it already compared (identical inputs give identical answers: counting them twice would fake
confidence), sends up to ``replay_rows`` of them in batches straight to TorchServe for both versions (header
``X-Canaryflow-Replay``: not in the router's log, not sampled again, so clients never wait for it), and appends
the pairs to ``pairs-vs-v<champion>.jsonl``. The analysis judges every pair of the ramp so far
(deployments/pairwise.py). Everything is on disk, so a resumed ramp keeps its pairs.

Cost, measured in the canary bench: two requests of ``replay_batch_rows`` rows per version and analysis.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from canaryflow.core.errors import ServingError
from canaryflow.core.paths import write_json
from canaryflow.model.packaging import input_contract
from canaryflow.release.steps import ReleaseState
from canaryflow.services import Services
from deployments.canary import CanaryStatus
from deployments.pairwise import Pair, PairSample

_FIRST_LOOKBACK_BYTES = 256 << 10  # a ramp's first analysis starts with the rows served just before it
_MAX_READ_BYTES = 4 << 20


def collect(svc: Services, st: ReleaseState, status: CanaryStatus, now: float) -> PairSample:
    """Replay the new live rows to both versions; every pair of this ramp so far (or why replay failed)."""
    cfg = st.policy.canary
    pairs_file = st.workdir / f"pairs-vs-v{status.champion}.jsonl"
    known = read_pairs(pairs_file, status.started_at)
    seen = {_key(p.row) for p in known}
    error: str | None = None
    candidate_errors = 0
    try:
        rows = new_rows(svc.paths.traffic_dir / f"{st.model}.jsonl", st.workdir / "replay-cursor.json")
    except OSError as exc:
        rows, error = [], f"traffic sample unreadable: {exc}"
    fresh: dict[str, list[float]] = {}
    for row in reversed(rows):  # newest first: they are what the champion answers now
        key = _key(row)
        if key not in seen and key not in fresh:
            fresh[key] = row
        if len(fresh) >= cfg.replay_rows:
            break
    batch = list(fresh.values())
    added: list[Pair] = []
    for start in range(0, len(batch), cfg.replay_batch_rows):
        chunk = batch[start : start + cfg.replay_batch_rows]
        try:
            champ = svc.backend.replay(st.model, status.champion, chunk)
        except ServingError as exc:
            error = f"champion v{status.champion}: {exc}"
            continue
        try:
            cand = svc.backend.replay(st.model, status.candidate, chunk)
        except ServingError as exc:  # the candidate's failures are judged by the errors check on live traffic
            candidate_errors += len(chunk)
            error = f"candidate v{status.candidate}: {exc}"
            continue
        added += [Pair(row, int(a["class_index"]), int(b["class_index"]), a["probabilities"], b["probabilities"])
                  for row, a, b in zip(chunk, champ, cand, strict=True)]
    append_pairs(pairs_file, added, now)
    return PairSample(known + added, feature_names(st), error, candidate_errors)


def new_rows(traffic: Path, cursor_file: Path) -> list[list[float]]:
    """Rows appended to the traffic sample since the cursor; the cursor moves to the end read."""
    try:
        cursor = json.loads(cursor_file.read_text())
    except (OSError, ValueError):
        cursor = {}
    if not traffic.exists():
        return []
    stat = traffic.stat()
    offset = int(cursor.get("offset", -1))
    if cursor.get("inode") != stat.st_ino or offset > stat.st_size:
        offset = -1  # rotated or replaced: start over in the new file
    if offset < 0:
        offset = max(0, stat.st_size - _FIRST_LOOKBACK_BYTES)
    offset = max(offset, stat.st_size - _MAX_READ_BYTES)
    with traffic.open("rb") as fh:
        fh.seek(offset)
        data = fh.read(stat.st_size - offset)
    complete = data.rfind(b"\n") + 1  # a line still being written is read next time
    rows = []
    for line in data[:complete].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # the lookback's first line starts mid-line
        if isinstance(row, list) and row and all(isinstance(x, int | float) for x in row):
            rows.append([float(x) for x in row])
    cursor_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(cursor_file, {"inode": stat.st_ino, "offset": offset + complete}, indent=None)
    return rows


def read_pairs(path: Path, since: float) -> list[Pair]:
    """The pairs recorded at or after ``since`` (a new ramp against the same champion starts afresh)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            d = json.loads(line)
            if d["t"] >= since:
                out.append(Pair(d["row"], d["a"], d["b"], d["pa"], d["pb"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a crash
    return out


def append_pairs(path: Path, pairs: list[Pair], now: float) -> None:
    if not pairs:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"t": now, "row": p.row, "a": p.champion, "b": p.candidate, "pa": p.champion_p,
                                "pb": p.candidate_p}) + "\n" for p in pairs)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(lines)


def feature_names(st: ReleaseState) -> list[str]:
    """The candidate's input names when its signature has them (else the segments say f0, f1, ...)."""
    model_dir = st.workdir / "mlflow-model"
    try:
        names = input_contract(model_dir).feature_names if model_dir.exists() else None
    except Exception:  # noqa: BLE001 - names only label segments; never fail an analysis for them
        names = None
    return list(names or [])


def _key(row: list[Any]) -> str:
    return hashlib.blake2b(json.dumps(row).encode(), digest_size=12).hexdigest()
