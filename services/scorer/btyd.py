"""BG/NBD ("buy till you die", Fader, Hardie & Lee 2005) for the scorer (pure).

A customer's repeat transactions follow a Poisson process of rate ``lambda ~ Gamma(r,
alpha)``; after each transaction it drops out for good with probability ``p ~ Beta(a, b)``.
Fitted by maximum likelihood on the customers' summaries (``x`` repeat transaction days,
``t_x`` days from the first to the last, ``T`` days from the first to now); from the fit, for
one customer:

* :func:`p_alive`: probability it has not dropped out;
* :func:`expected`: expected transactions in the next ``t`` days;
* :func:`p_none`: probability of no transaction in the next ``t`` days (dropped out, or
  alive and the Poisson process gives nothing: a BG/NBD customer drops out only right after
  a transaction, so alive now means alive for the next ``t`` days without one).

The fit is checked against ``lifetimes.BetaGeoFitter`` on CDNOW (tests/scorer/test_btyd.py).

>>> params = BgNbd(r=0.25, alpha=4.0, a=0.8, b=2.5)
>>> round(float(p_alive(params, 0, 0, 30)), 3)  # one transaction: alive for sure
1.0
>>> bool(p_none(params, 3, 20, 200, 30) > p_none(params, 3, 180, 200, 30))  # long silence
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import optimize, special

Arr = npt.NDArray[np.float64]


@dataclass(frozen=True)
class BgNbd:
    """BG/NBD parameters (time in days)."""

    r: float
    alpha: float
    a: float
    b: float


#: Before the first fit: CDNOW's published fit (Fader, Hardie & Lee 2005: r 0.243,
#: alpha 4.414 weeks, a 0.793, b 2.426), alpha in days. A cold-start prior only: the scorer
#: refits on its own customers once it has :data:`MIN_FIT_CUSTOMERS`.
DEFAULT_PARAMS = BgNbd(r=0.243, alpha=4.414 * 7, a=0.793, b=2.426)
MIN_FIT_CUSTOMERS = 200


def _arr(v: Any) -> Arr:
    return np.asarray(v, dtype=np.float64)


def log_likelihood(params: BgNbd, x: Any, t_x: Any, T: Any) -> Arr:
    """Each customer's log-likelihood of its summary."""
    x, t_x, T = _arr(x), _arr(t_x), _arr(T)
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    a1 = special.gammaln(r + x) - special.gammaln(r) + r * math.log(alpha)
    a2 = (
        special.gammaln(a + b)
        + special.gammaln(b + x)
        - special.gammaln(b)
        - special.gammaln(a + b + x)
    )
    a3 = -(r + x) * np.log(alpha + T)
    rep = x > 0
    a4 = np.where(
        rep,
        math.log(a) - np.log(np.maximum(b + x - 1, 1e-12)) - (r + x) * np.log(alpha + t_x),
        -np.inf,
    )
    out: Arr = a1 + a2 + np.logaddexp(a3, a4)
    return out


def fit(x: Any, t_x: Any, T: Any, start: BgNbd | None = None) -> BgNbd:
    """Maximum-likelihood parameters (L-BFGS on log parameters) of the summaries; customers
    with the same summary are counted once with their weight, so a fit over tens of thousands
    of customers takes a fraction of a second."""
    x, t_x, T = _arr(x), _arr(t_x), _arr(T)
    if len(x) == 0:
        raise ValueError("BG/NBD fit needs at least one customer summary")
    keys, weights = np.unique(np.stack([x, t_x, T], axis=1), axis=0, return_counts=True)
    ux, utx, uT = keys[:, 0], keys[:, 1], keys[:, 2]
    w = weights.astype(np.float64)
    s = start or DEFAULT_PARAMS
    x0 = np.log([s.r, s.alpha, s.a, s.b])
    scale = max(T.mean(), 1.0)  # alpha in units of the mean age: a well-conditioned problem

    def nll(z: Arr) -> float:
        r, alpha, a, b = np.exp(np.clip(z, -20.0, 20.0))
        ll = log_likelihood(BgNbd(r, alpha * scale, a, b), ux, utx, uT)
        return float(-(w * ll).sum() / w.sum())

    x0[1] -= math.log(scale)
    res = optimize.minimize(nll, x0, method="L-BFGS-B", options={"maxiter": 500})
    r, alpha, a, b = np.exp(np.clip(res.x, -20.0, 20.0)).tolist()
    return BgNbd(float(r), float(alpha * scale), float(a), float(b))


def p_alive(params: BgNbd, x: Any, t_x: Any, T: Any) -> Arr:
    """Probability that each customer has not dropped out (1 with no repeat transaction)."""
    x, t_x, T = _arr(x), _arr(t_x), _arr(T)
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    log_ratio = (r + x) * (np.log(alpha + T) - np.log(alpha + t_x))
    odds = np.where(
        x > 0,
        np.exp(np.minimum(math.log(a) - np.log(np.maximum(b + x - 1, 1e-12)) + log_ratio, 700)),
        0.0,
    )
    out: Arr = 1.0 / (1.0 + odds)
    return out


def p_none(params: BgNbd, x: Any, t_x: Any, T: Any, t: float) -> Arr:
    """Probability of no transaction in the next ``t`` days."""
    x, T = _arr(x), _arr(T)
    alive = p_alive(params, x, t_x, T)
    r, alpha = params.r, params.alpha
    quiet = np.exp((r + x) * (np.log(alpha + T) - np.log(alpha + T + t)))
    out: Arr = 1.0 - alive + alive * quiet
    return out


def expected(params: BgNbd, x: Any, t_x: Any, T: Any, t: float) -> Arr:
    """Expected transactions in the next ``t`` days (the conditional expectation)."""
    x, t_x, T = _arr(x), _arr(t_x), _arr(T)
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    z = t / (alpha + T + t)
    hyp = special.hyp2f1(r + x, b + x, a + b + x - 1, z)
    head = (a + b + x - 1) / (a - 1) if a != 1 else (b + x) * 1e6
    body = 1.0 - np.exp((r + x) * (np.log(alpha + T) - np.log(alpha + T + t))) * hyp
    log_ratio = (r + x) * (np.log(alpha + T) - np.log(alpha + t_x))
    odds = np.where(
        x > 0,
        np.exp(np.minimum(math.log(a) - np.log(np.maximum(b + x - 1, 1e-12)) + log_ratio, 700)),
        0.0,
    )
    out: Arr = np.maximum(head * body / (1.0 + odds), 0.0)
    return np.where(np.isfinite(out), out, 0.0)
