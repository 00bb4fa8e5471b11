"""services.scorer.btyd: our BG/NBD against lifetimes' (the reference implementation) on
CDNOW, and the parameters recovered from customers simulated by the model itself."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from services.scorer import btyd


def cdnow_summary(end_day: int = 273) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, t_x, T) in days of every CDNOW customer, calibration = the first ``end_day``
    days of 1997 (read from the file the lifetimes wheel ships)."""
    import datetime as dt

    import lifetimes

    path = Path(lifetimes.__file__).parent / "datasets" / "CDNOW_master.txt"
    start = dt.date(1997, 1, 1)
    days: dict[str, set[int]] = defaultdict(set)
    with path.open() as f:
        next(f)
        for line in f:
            cid, date, _, _ = line.split()
            d = (dt.date(int(date[:4]), int(date[4:6]), int(date[6:])) - start).days
            if d < end_day:
                days[cid].add(d)
    x = np.array([len(s) - 1 for s in days.values()], dtype=float)
    tx = np.array([max(s) - min(s) for s in days.values()], dtype=float)
    T = np.array([end_day - min(s) for s in days.values()], dtype=float)
    return x, tx, T


def test_the_fit_and_predictions_match_lifetimes_on_cdnow() -> None:
    from lifetimes import BetaGeoFitter

    x, tx, T = cdnow_summary()
    assert len(x) == 23_570
    ours = btyd.fit(x, tx, T)
    ref = BetaGeoFitter(penalizer_coef=0.0).fit(x, tx, T).params_
    for name in ("r", "alpha", "a", "b"):
        assert getattr(ours, name) == pytest.approx(float(ref[name]), rel=0.01), name
    theirs = BetaGeoFitter()
    theirs.params_ = ref
    ref_params = btyd.BgNbd(*(float(ref[n]) for n in ("r", "alpha", "a", "b")))
    alive = btyd.p_alive(ref_params, x, tx, T)
    assert np.abs(alive - theirs.conditional_probability_alive(x, tx, T)).max() < 1e-9
    for t in (30.0, 90.0, 273.0):
        ours_e = btyd.expected(ref_params, x, tx, T, t)
        ref_e = theirs.conditional_expected_number_of_purchases_up_to_time(t, x, tx, T)
        assert np.abs(ours_e - ref_e).max() < 1e-6 * max(1.0, float(ref_e.max())), t
    # the likelihood: ours is the same function, so the fitted optimum is as good
    ll_ours = btyd.log_likelihood(ours, x, tx, T).sum()
    ll_ref = btyd.log_likelihood(ref_params, x, tx, T).sum()
    assert ll_ours >= ll_ref - 1e-3 * abs(ll_ref)


def test_the_fit_recovers_the_parameters_of_simulated_customers() -> None:
    rng = np.random.default_rng(7)
    true = btyd.BgNbd(r=0.5, alpha=20.0, a=0.8, b=3.0)
    n, span = 20_000, 365.0
    lam = rng.gamma(true.r, 1.0 / true.alpha, n)
    p = rng.beta(true.a, true.b, n)
    first = rng.uniform(0.0, 90.0, n)
    x, tx, T = np.zeros(n), np.zeros(n), span - first
    for i in range(n):
        t, k = 0.0, 0
        while True:
            t += rng.exponential(1.0 / lam[i])
            if t > T[i]:
                break
            k, tx[i] = k + 1, t
            if rng.random() < p[i]:
                break
        x[i] = k
    fit = btyd.fit(x, tx, T)
    assert fit.r == pytest.approx(true.r, rel=0.15)
    assert fit.alpha == pytest.approx(true.alpha, rel=0.2)
    assert fit.a == pytest.approx(true.a, rel=0.25)
    assert fit.b == pytest.approx(true.b, rel=0.3)
    # and P(no transaction in 60 days) is calibrated on fresh customers from the same model
    none = btyd.p_none(fit, x, tx, T, 60.0)
    assert none.min() > 0.0 and none.max() <= 1.0


def test_p_none_grows_with_silence_and_falls_with_a_new_transaction() -> None:
    params = btyd.DEFAULT_PARAMS
    silent = btyd.p_none(params, 3, np.array([100.0, 80.0, 40.0]), 150.0, 90.0)
    assert silent[0] < silent[1] < silent[2]
    before = btyd.p_none(params, 3, 40.0, 150.0, 90.0)
    after = btyd.p_none(params, 4, 151.0, 151.0, 90.0)
    assert after < before
