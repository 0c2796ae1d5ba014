"""bench/serving_bench.py without servers: the router-overhead table, the direct target's key handling, the text
data of the transformer model."""

from __future__ import annotations

import importlib.util
import json
import stat
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from bench.models import TEXT_VOCAB
from canaryflow.core.paths import StatePaths
from canaryflow.core.settings import Settings

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serving_bench.py"


@pytest.fixture(scope="module")
def sb() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serving_bench_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def point(conns: int, p50: float, rps: float) -> dict:
    return {"connections": conns, "p50_ms": p50, "p95_ms": 2 * p50, "p99_ms": 3 * p50, "rps": rps, "errors": 0}


def test_router_overhead_is_router_over_direct_with_the_added_latency(sb) -> None:
    ours, direct = [point(1, 2.0, 400), point(8, 6.5, 900)], [point(1, 1.5, 500), point(8, 5.0, 1000)]
    rows = sb.router_overhead(ours, direct)
    assert rows[0] == {"connections": 1, "p50": 1.33, "p95": 1.33, "p99": 1.33, "rps": 0.8,
                       "added_p50_ms": 0.5, "added_p95_ms": 1.0, "added_p99_ms": 1.5}
    assert rows[1]["added_p50_ms"] == 1.5 and rows[1]["rps"] == 0.9
    text = sb.format_router({"ours": {"points": ours}, "direct": {"points": direct}, "router_overhead": rows})
    lines = text.splitlines()
    assert "ratio p50" in lines[1] and "added p50 ms" in lines[1]
    assert lines[3].split("|")[3].split() == ["1.33", "1.33", "1.33", "0.80"]
    assert lines[4].split("|")[4].strip() == "1.500"


def test_direct_target_carries_the_inference_key_and_results_only_the_url(sb, tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state")
    paths = StatePaths(settings.state_dir)
    paths.torchserve_keys.parent.mkdir(parents=True, exist_ok=True)
    paths.torchserve_keys.write_text(json.dumps({"inference": {"key": "inf-KEY"}, "management": {"key": "m"}}))
    stack = SimpleNamespace(settings=settings, paths=paths)
    model = {"key": "mlp", "name": "bench-mlp", "version": "3", "mlflow_url": "http://127.0.0.1:5999",
             "rows": np.zeros((2, 3))}
    urls = sb.target_urls(stack, model, direct=True)
    assert list(urls) == ["ours", "direct", "mlflow"]
    assert urls["direct"] == (f"http://{settings.host}:{settings.ports.torchserve_inference}"
                              "/predictions/bench-mlp/3", {"Authorization": "Bearer inf-KEY"})
    assert urls["ours"] == (f"{settings.router_url}/predictions/bench-mlp", {})
    assert list(sb.target_urls(stack, model, direct=False)) == ["ours", "mlflow"]


def test_wrk_scripts_hold_the_key_only_for_direct_and_privately(sb, tmp_path: Path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(sb, "run_wrk", lambda url, lua, c, d, pin: calls.append((url, lua, c)) or point(c, 1.0, 9))
    urls = {"ours": ("http://r/p", {}), "direct": ("http://t/p", {"Authorization": "Bearer k1"})}
    args = SimpleNamespace(rows_per_request=1, warmup=0.1, duration=0.1, connections=[1, 8])
    points = sb.measure({"key": "mlp", "name": "m", "rows": np.ones((2, 3))}, urls, tmp_path, None, args)
    assert [len(points[k]) for k in ("ours", "direct")] == [2, 2]
    assert [(u, c) for u, _, c in calls] == [("http://r/p", 8), ("http://t/p", 8), ("http://r/p", 1),
                                              ("http://t/p", 1), ("http://r/p", 8), ("http://t/p", 8)]
    direct, ours = (tmp_path / "post-mlp-direct.lua").read_text(), (tmp_path / "post-mlp-ours.lua").read_text()
    assert 'wrk.headers["Authorization"] = "Bearer k1"' in direct and "Authorization" not in ours
    assert '{"inputs": [[1.0, 1.0, 1.0]]}' in ours
    assert stat.S_IMODE((tmp_path / "post-mlp-direct.lua").stat().st_mode) == 0o600


def test_text_rows_are_exact_token_ids_with_their_class_keywords(sb) -> None:
    x, y = sb.text_dataset(200, np.random.default_rng(0))
    assert x.shape == (200, sb.TEXT_SEQ) and x.dtype == np.float32 and set(y) == set(range(sb.TEXT_CLASSES))
    assert (x == np.round(x)).all() and x.min() >= 1 and x.max() < TEXT_VOCAB
    keywords = np.where(x < 50, (x - 1) // 5, -1)
    for row, label in zip(keywords, y, strict=True):
        found = set(row[row >= 0].tolist())
        assert found == {label} and 8 <= (row >= 0).sum() <= 16
