"""The churn model wrapper against River's own estimator checks, bounds and checkpoints."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import river.checks
from hypothesis import given, settings
from hypothesis import strategies as hs
from river import datasets

from services.scorer.model import ChurnClassifier, ChurnModel


def _datasets(model: Any, scale: int = 1) -> Iterator[Any]:
    """River's classification datasets for a binary classifier, without its sklearn import
    (scikit-learn is not a segflow dependency; the datasets below ship with River)."""
    yield datasets.Phishing().take(200 * scale)
    yield ((x, np.bool_(y)) for x, y in datasets.Phishing().take(200 * scale))


CHECKS = None


def _checks() -> list[Any]:
    global CHECKS
    if CHECKS is None:
        mp = pytest.MonkeyPatch()
        mp.setattr(river.checks, "_yield_datasets", _datasets)
        try:
            CHECKS = list(river.checks.yield_checks(ChurnClassifier()))
        finally:
            mp.undo()
    return CHECKS


@pytest.mark.parametrize("check", _checks(), ids=lambda c: c.__name__)
def test_churn_classifier_passes_rivers_estimator_checks(check: Any) -> None:
    if check.__name__ in ChurnClassifier()._unit_test_skips():
        pytest.skip("skipped by the estimator itself")  # none are, today
    check(ChurnClassifier())


def test_river_checks_cover_learning_pickling_and_purity() -> None:
    names = {c.__name__ for c in _checks()}
    assert {
        "check_learn_one",
        "check_pickling",
        "check_predict_one_pure",
        "check_predict_one_before_any_learn",
        "check_no_state_aliasing_with_input",
        "check_predict_proba_one_binary",
    } <= names


def test_it_learns_phishing_like_river_does() -> None:
    # 1,250 examples: a faster step than the churn default (0.005, tuned for tens of
    # thousands of noisy labels) to learn them in one pass
    clf = ChurnClassifier(lr=0.05)
    correct = 0
    for x, y in datasets.Phishing():
        correct += clf.predict_one(x) == y
        clf.learn_one(x, y)
    assert correct / 1250 > 0.85


@settings(max_examples=60, deadline=None)
@given(
    hs.lists(
        hs.dictionaries(
            hs.sampled_from("abcdef"), hs.floats(-1e6, 1e6, allow_nan=False), min_size=1
        ),
        min_size=1,
        max_size=30,
    ),
    hs.dictionaries(hs.sampled_from("abcdefg"), hs.floats(-1e9, 1e9, allow_nan=False)),
)
def test_scores_stay_in_the_unit_interval(xs: list[dict[str, float]], x: dict[str, float]) -> None:
    m = ChurnModel()
    for i, xi in enumerate(xs):
        m.learn(xi, i % 3 == 0)
    p = m.predict(x)
    assert 0.0 <= p <= 1.0
    assert p == m.predict_explain(x)[0]


def test_a_checkpoint_round_trip_keeps_predictions_metrics_and_clusters() -> None:
    m = ChurnModel()
    rng = np.random.default_rng(1)
    for i in range(300):
        x = {"idle": float(rng.normal(i % 2 * 2)), "logins": float(rng.normal(5 - i % 2 * 3))}
        m.learn(x, bool(i % 2))
        m.learn_cluster(
            {
                "engagement": float(rng.random()),
                "purchasing": 0.2,
                "idle": 0.1,
                "features": 0.3,
                "support": 0.0,
                "email": 0.5,
            }
        )
    back = ChurnModel.from_bytes(m.to_bytes())
    probe = [{"idle": v, "logins": 5 - v} for v in np.linspace(-2, 4, 25)]
    assert [back.predict(x) for x in probe] == [m.predict(x) for x in probe]
    assert back.quality() == m.quality() and back.quality()["roc_auc"] > 0.9
    cx = {
        "engagement": 0.9,
        "purchasing": 0.2,
        "idle": 0.1,
        "features": 0.3,
        "support": 0.0,
        "email": 0.5,
    }
    assert back.cluster(cx) == m.cluster(cx)
    assert back.describe_clusters() == m.describe_clusters()
    assert all(d.startswith(("high", "low")) for d in m.describe_clusters().values())


def test_drift_is_detected_when_the_concept_flips() -> None:
    m = ChurnModel()
    for i in itertools.chain(range(1500), range(1500)):
        flipped = m.n_learned >= 1500
        x = {"idle": float(i % 2)}
        m.learn(x, bool(i % 2) != flipped, at=i)
    assert m.drifts >= 1 and m.last_drift_at is not None
