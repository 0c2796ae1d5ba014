"""The quality gate: exact metrics from models with a known number of wrong answers, and a real sklearn model."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from canaryflow.core.settings import GateSettings
from validation.quality import check_quality
from validation.results import Outcome

ROWS = 200
FEATURES = ["row", "noise"]
HOLDOUT = pd.DataFrame({"row": np.arange(ROWS, dtype=float),
                        "noise": np.random.default_rng(0).normal(size=ROWS),
                        "label": np.arange(ROWS) % 2})


def wrong_on(k: int) -> Callable[[np.ndarray], np.ndarray]:
    """A model that gives 0.9 to the true class of every row but the first k, where it is wrong."""
    truth = HOLDOUT["label"].to_numpy()

    def predict(x: np.ndarray) -> np.ndarray:
        rows = x[:, 0].astype(int)
        pred = np.where(rows < k, 1 - truth[rows], truth[rows])
        return np.where(np.arange(2) == pred[:, None], 0.9, 0.1).astype(np.float32)
    return predict


def gate(candidate, champion=None, *, out_dir: Path, metric: str = "accuracy", floor: float = 0.7,
         abs_drop: float = 0.02, rel_drop: float = 0.05, holdout: pd.DataFrame = HOLDOUT):
    return check_quality(candidate, champion, holdout, FEATURES, "label", metric, floor, abs_drop, rel_drop, out_dir)


def test_first_release_above_floor_passes(tmp_path: Path) -> None:
    settings = GateSettings()
    result = check_quality(wrong_on(10), None, HOLDOUT, FEATURES, settings.label_column, settings.quality_metric,
                           settings.quality_min, settings.quality_max_abs_drop, settings.quality_max_rel_drop,
                           tmp_path)
    assert result.outcome is Outcome.PASSED
    assert result.reason == "accuracy 0.950 >= floor 0.700 (first release: no champion)"
    assert result.measured["candidate"] == 0.95 and result.measured["champion"] is None
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["outcome"] == "passed" and result.measured["files"] == [str(tmp_path / "quality.json")]


def test_first_release_below_floor_fails(tmp_path: Path) -> None:
    result = gate(wrong_on(80), out_dir=tmp_path)
    assert result.outcome is Outcome.FAILED
    assert result.reason == "accuracy 0.600 < floor 0.700"
    assert json.loads((tmp_path / "quality.json").read_text())["reason"] == result.reason


def test_worse_than_champion_fails(tmp_path: Path) -> None:
    result = gate(wrong_on(40), wrong_on(10), out_dir=tmp_path)
    assert result.outcome is Outcome.FAILED
    assert result.reason == "accuracy 0.800 vs champion 0.950: drop 0.150 > 0.020, relative drop 15.8% > 5.0%"
    assert result.measured["abs_change"] == pytest.approx(-0.15)
    assert result.measured["rel_change"] == pytest.approx(-0.15 / 0.95)


def test_small_drop_within_tolerance_passes(tmp_path: Path) -> None:
    result = gate(wrong_on(12), wrong_on(10), out_dir=tmp_path)
    assert result.passed
    assert result.reason == ("accuracy 0.940 >= floor 0.700; vs champion 0.950: change -0.010 (-1.1%), "
                             "allowed drop 0.020 / 5.0%")


def test_relative_drop_alone_fails(tmp_path: Path) -> None:
    result = gate(wrong_on(12), wrong_on(10), abs_drop=0.05, rel_drop=0.005, out_dir=tmp_path)
    assert result.reason == "accuracy 0.940 vs champion 0.950: relative drop 1.1% > 0.5%"


def test_near_threshold_numbers_get_more_digits(tmp_path: Path) -> None:
    # drop 0.005 against an allowed 0.0049: three decimals would print "0.005 > 0.005"
    result = gate(wrong_on(11), wrong_on(10), abs_drop=0.0049, out_dir=tmp_path)
    assert result.reason == "accuracy 0.945 vs champion 0.950: drop 0.0050 > 0.0049"


def test_below_floor_and_worse_than_champion(tmp_path: Path) -> None:
    result = gate(wrong_on(80), wrong_on(10), out_dir=tmp_path)
    assert result.reason == ("accuracy 0.600 < floor 0.700; vs champion 0.950: drop 0.350 > 0.020, "
                             "relative drop 36.8% > 5.0%")


def test_log_loss_is_lower_is_better(tmp_path: Path) -> None:
    def log_loss(k: int) -> float:
        return ((ROWS - k) * -math.log(0.9) + k * -math.log(0.1)) / ROWS

    worse, better = log_loss(40), log_loss(10)
    result = gate(wrong_on(40), wrong_on(10), metric="log_loss", floor=0.7, out_dir=tmp_path)
    rel = (worse - better) / better
    assert result.reason == (f"log_loss {worse:.3f} vs champion {better:.3f}: rise {worse - better:.3f} > 0.020, "
                             f"relative rise {rel:.1%} > 5.0%")
    assert gate(wrong_on(10), None, metric="log_loss", floor=0.1, out_dir=tmp_path).reason == \
        f"log_loss {better:.3f} > ceiling 0.100"


def test_real_model_worse_than_champion(tmp_path: Path) -> None:
    data = load_breast_cancer(as_frame=True)
    frame = data.frame.rename(columns={"target": "label"})
    train, holdout = train_test_split(frame, test_size=0.3, random_state=0, stratify=frame["label"])
    features = list(data.feature_names)
    strong = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    strong.fit(train[features].to_numpy(np.float32), train["label"])
    weak = make_pipeline(StandardScaler(), LogisticRegression()).fit(train[features[:1]].to_numpy(np.float32),
                                                                     train["label"])
    # the champion answers logits (decision_function) on purpose: the gate turns them into probabilities
    champion = lambda x: np.stack([-strong.decision_function(x), strong.decision_function(x)], axis=1) / 2  # noqa: E731
    result = check_quality(lambda x: weak.predict_proba(x[:, :1]), champion, holdout, features, "label",
                           "roc_auc", 0.7, 0.02, 0.05, tmp_path)
    assert result.outcome is Outcome.FAILED
    assert re.fullmatch(r"roc_auc 0\.9\d\d vs champion 0\.99\d: drop 0\.0\d\d > 0\.020, relative drop \d\.\d% > 5\.0%",
                        result.reason), result.reason
    assert set(result.measured["candidate_metrics"]) == {"accuracy", "f1", "log_loss", "roc_auc"}


def test_candidate_crash_fails_and_champion_crash_is_an_error(tmp_path: Path) -> None:
    def boom(x: np.ndarray) -> np.ndarray:
        raise RuntimeError("boom")

    assert gate(boom, wrong_on(0), out_dir=tmp_path).reason == "candidate failed on the holdout: RuntimeError: boom"
    result = gate(wrong_on(0), boom, out_dir=tmp_path)
    assert result.outcome is Outcome.ERROR
    assert result.reason == "champion failed on the holdout: RuntimeError: boom"


def test_unmeasurable_inputs_are_errors(tmp_path: Path) -> None:
    holed = HOLDOUT.copy()
    holed.loc[3, "noise"] = np.nan
    assert gate(wrong_on(0), holdout=holed, out_dir=tmp_path).reason == "holdout has 1 rows with missing values"
    three = HOLDOUT.assign(label=np.arange(ROWS) % 3)
    result = gate(lambda x: np.eye(3)[x[:, 0].astype(int) % 3], metric="roc_auc", holdout=three, out_dir=tmp_path)
    assert (result.outcome, result.reason) == (Outcome.ERROR, "roc_auc needs a binary task; the holdout has 3 classes")
    assert gate(wrong_on(0), metric="mse", out_dir=tmp_path).outcome is Outcome.ERROR
