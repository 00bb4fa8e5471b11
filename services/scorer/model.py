"""The scorer's online models (pure): churn classifier, behavioural clusters, quality metrics.

* :class:`ChurnClassifier` is a River classifier (``StandardScaler | LogisticRegression``)
  that also explains a prediction: each feature's contribution to the log-odds is its weight
  times its standardised value. It passes River's estimator checks (``river.checks``).
* :class:`ChurnModel` bundles the classifier with an online k-means (``river.cluster``), the
  prequential metrics (rolling ROC AUC, rolling log loss, calibration error) and an ADWIN
  drift detector over the log loss. It pickles to bytes for the ``scorer_model`` checkpoint.

>>> m = ChurnModel()
>>> m.learn({"idle": 2.0}, True); m.learn({"idle": 0.0}, False)
>>> 0.0 <= m.predict({"idle": 2.0}) <= 1.0, m.n_learned
(True, 2)
>>> ChurnModel.from_bytes(m.to_bytes()).predict({"idle": 2.0}) == m.predict({"idle": 2.0})
True
"""

from __future__ import annotations

import math
import pickle
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from river import base
from river import cluster as _cluster
from river import compose as _compose
from river import drift as _drift
from river import linear_model as _linear_model
from river import metrics as _metrics
from river import optim as _optim
from river import preprocessing as _preprocessing
from river import utils as _utils

from segflow.stats import calibration_error, roc_auc
from services.scorer.explain import explain_rows as explain_rows
from services.scorer.explain import sigmoid_rows as sigmoid_rows

# River's modules are untyped: use them as Any so strict type checking stays quiet and honest.
cluster: Any = _cluster
compose: Any = _compose
drift: Any = _drift
linear_model: Any = _linear_model
metrics: Any = _metrics
optim: Any = _optim
preprocessing: Any = _preprocessing
utils: Any = _utils

VERSION = "0.3.0"


class ChurnClassifier(base.Classifier):
    """Binary churn classifier: standard scaling then logistic regression, with explanations.

    The weights learn with AdaGrad: per-feature steps that shrink as evidence accumulates. With
    plain SGD the model a day of matured labels leaves behind depended on the order in which
    the customers were visited (ROC AUC against the simulator's truth moved from 0.70 to 0.60
    with the order alone); AdaGrad's does not.

    Parameters
    ----------
    lr
        AdaGrad learning rate of the weights.
    intercept_lr
        Learning rate of the intercept.
    l2
        L2 regularisation.
    signs
        Optional sign constraints: feature name -> +1 (its weight is never negative: more of
        it never lowers the probability) or -1 (never positive). Applied after every update
        (projected gradient), so the explanations and the monotonicity the product promises
        hold for whatever the model learned.

    Examples
    --------
    >>> clf = ChurnClassifier()
    >>> for _ in range(50):
    ...     clf.learn_one({"idle_days": 9.0, "logins": 0.0}, True)
    ...     clf.learn_one({"idle_days": 0.0, "logins": 5.0}, False)
    >>> clf.predict_one({"idle_days": 8.0, "logins": 0.0})
    True
    >>> [name for name, _ in clf.explain_one({"idle_days": 8.0, "logins": 0.0})]
    ['logins', 'idle_days']
    """

    def __init__(
        self,
        lr: float = 0.005,
        intercept_lr: float = 0.02,
        l2: float = 0.0001,
        signs: Mapping[str, int] | None = None,
    ) -> None:
        self.lr = lr
        self.intercept_lr = intercept_lr
        self.l2 = l2
        self.signs = dict(signs) if signs else None
        self.scaler = preprocessing.StandardScaler()
        self.logreg = linear_model.LogisticRegression(
            optimizer=optim.AdaGrad(lr), intercept_lr=intercept_lr, l2=l2
        )
        self.pipeline = compose.Pipeline(self.scaler, self.logreg)
        self._arrays: tuple[Any, ...] | None = None  # (names, mean, 1/std, weights, intercept)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None  # derived: rebuilt on first use
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_arrays", None)
        state.setdefault("signs", None)
        self.__dict__.update(state)

    @property
    def _multiclass(self) -> bool:
        return False

    def learn_one(self, x: dict[Any, Any], y: Any, **kwargs: Any) -> None:
        self.pipeline.learn_one(x, bool(y))
        if self.signs:
            w = self.logreg._weights
            for name, sign in self.signs.items():
                v = w.get(name)
                if v is not None and v * sign < 0:
                    w[name] = 0.0
        self._arrays = None

    def predict_proba_one(self, x: dict[Any, Any], **kwargs: Any) -> dict[Any, float]:
        p: float = self.pipeline.predict_proba_one(x)[True]
        p = min(1.0, max(0.0, p)) if math.isfinite(p) else 0.5
        return {False: 1.0 - p, True: p}

    def explain_one(self, x: Mapping[str, float]) -> list[tuple[str, float]]:
        """Each feature's signed contribution to the churn log-odds, largest magnitude first."""
        return self.predict_explain_one(x)[1]

    def predict_explain_one(self, x: Mapping[str, float]) -> tuple[float, list[tuple[str, float]]]:
        """The churn probability (as :meth:`predict_proba_one`) and the contributions, from one
        pass: ``p = sigmoid(intercept + sum(w_i * z_i))`` with ``z`` the standardised ``x``."""
        z: dict[str, float] = self.scaler.transform_one(dict(x))
        logreg = self.logreg
        p: float = logreg.loss.mean_func(logreg._raw_dot_one(z))
        p = min(1.0, max(0.0, p)) if math.isfinite(p) else 0.5
        w = logreg._weights
        contrib = [(name, w[name] * zi) if name in w else (name, 0.0) for name, zi in z.items()]
        contrib.sort(key=lambda kv: -abs(kv[1]))
        return p, contrib

    def predict_explain_array(
        self, names: Sequence[str], x: npt.NDArray[np.float64], k: int
    ) -> tuple[float, list[tuple[str, float]]]:
        """:meth:`predict_explain_one` for a vector ``x`` of the features ``names`` (always
        the same sequence object), with the ``k`` largest contributions: the same arithmetic
        on arrays cached from the scaler and the weights until the model learns again.

        >>> clf = ChurnClassifier()
        >>> for _ in range(30):
        ...     clf.learn_one({"idle": 9.0, "logins": 0.0}, True)
        ...     clf.learn_one({"idle": 0.0, "logins": 5.0}, False)
        >>> names = ("idle", "logins")
        >>> p, top = clf.predict_explain_array(names, np.array([8.0, 1.0]), 1)
        >>> round(p, 9) == round(clf.predict_proba_one({"idle": 8.0, "logins": 1.0})[True], 9)
        True
        """
        p, tops = self.predict_explain_matrix(names, x[None, :], k)
        return float(p[0]), tops[0]

    def predict_explain_matrix(
        self, names: Sequence[str], x: npt.NDArray[np.float64], k: int
    ) -> tuple[npt.NDArray[np.float64], list[list[tuple[str, float]]]]:
        """:meth:`predict_explain_array` for the rows of ``x`` (one customer each)."""
        contrib, intercept = self.contributions(names, x)
        return explain_rows(contrib, intercept, names, k)

    def contributions(
        self, names: Sequence[str], x: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], float]:
        """Each input's contribution to the log-odds (``w_i * z_i``) for the rows of ``x``,
        and the intercept: the log-odds is their sum."""
        arrays = self._arrays
        if arrays is None or arrays[0] is not names:
            arrays = self._arrays = self._snapshot(names)
        _, mean, inv_std, weights, intercept = arrays
        contrib: npt.NDArray[np.float64] = (x - mean) * inv_std * weights
        return contrib, float(intercept)

    def _snapshot(self, names: Sequence[str]) -> tuple[Any, ...]:
        scaler, w = self.scaler, self.logreg._weights
        mean = np.array([scaler.means.get(n, 0.0) for n in names])
        var = np.array([scaler.vars.get(n, 0.0) for n in names])
        inv_std = np.divide(1.0, np.sqrt(var), out=np.zeros(len(names)), where=var > 0)
        weights = np.array([w.get(n, 0.0) for n in names])
        return names, mean, inv_std, weights, float(self.logreg.intercept)

    @classmethod
    def _unit_test_params(cls) -> Any:
        yield {}
        yield {"lr": 0.01, "l2": 0.0}


class Prior:
    """A fixed logistic score that answers while the classifier has learned little: log-odds
    ``intercept + sum(weight_i * (x_i - centre_i))`` over a few named inputs (the rest weigh
    nothing). The :class:`ChurnModel` blends it with the classifier's log-odds, the prior's
    share falling as labels are learned, so the answer is never a flat 0.5 at start.

    >>> prior = Prior(-2.0, {"idle": (1.0, 0.0)})
    >>> c, b = prior.contributions(("idle", "logins"), np.array([[1.5, 9.0]]))
    >>> c.tolist(), b
    ([[1.5, 0.0]], -2.0)
    """

    def __init__(self, intercept: float, terms: Mapping[str, tuple[float, float]]) -> None:
        self.intercept = intercept
        self.terms = dict(terms)
        self._arrays: tuple[Any, ...] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"intercept": self.intercept, "terms": self.terms, "_arrays": None}

    def contributions(
        self, names: Sequence[str], x: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], float]:
        """Each input's contribution to the prior's log-odds for the rows of ``x``."""
        w, c = self.arrays(names)
        contrib: npt.NDArray[np.float64] = (x - c) * w
        return contrib, self.intercept

    def arrays(self, names: Sequence[str]) -> tuple[npt.NDArray[np.float64], ...]:
        """The weights and centres of ``names`` (cached for the same sequence object)."""
        arrays = self._arrays
        if arrays is None or arrays[0] is not names:
            w = np.array([self.terms.get(n, (0.0, 0.0))[0] for n in names])
            c = np.array([self.terms.get(n, (0.0, 0.0))[1] for n in names])
            arrays = self._arrays = (names, w, c)
        return arrays[1], arrays[2]


class Calibration:
    """Expected calibration error over ``bins`` probability bins, with exponential forgetting.

    >>> c = Calibration()
    >>> for _ in range(100):
    ...     c.update(0.9, True); c.update(0.1, False)
    >>> round(c.error(), 3)
    0.1
    """

    def __init__(self, bins: int = 10, decay: float = 0.999) -> None:
        self.bins = bins
        self.decay = decay
        self.n = [0.0] * bins
        self.p = [0.0] * bins
        self.y = [0.0] * bins

    def update(self, p: float, y: bool) -> None:
        d = self.decay
        for i in range(self.bins):
            self.n[i] *= d
            self.p[i] *= d
            self.y[i] *= d
        i = min(self.bins - 1, int(p * self.bins))
        self.n[i] += 1.0
        self.p[i] += p
        self.y[i] += 1.0 if y else 0.0

    def error(self) -> float:
        total = sum(self.n)
        if total == 0:
            return 0.0
        return sum(abs(p - y) for p, y in zip(self.p, self.y, strict=True)) / total


#: Dimensions of the clustering vector and how they read in a centroid description.
CLUSTER_DIMS = (
    ("engagement", "engagement"),
    ("purchasing", "purchasing"),
    ("idle", "idle time"),
    ("features", "feature use"),
    ("support", "support load"),
    ("email", "email opens"),
)


class ChurnModel:
    """Churn classifier, clusters, prequential metrics and drift detection, checkpointable.

    With a :class:`Prior`, the churn log-odds is a blend: ``(1 - s) * classifier + s *
    prior`` where the prior's share ``s = prior_strength / (prior_strength + n_learned)``
    falls from 1 (nothing learned: the prior alone) to a half after ``prior_strength``
    labels and on towards 0; contributions blend the same way, so they still add up to the
    log-odds.

    >>> m = ChurnModel(prior=Prior(-3.0, {"idle": (1.0, 0.0)}), prior_strength=100)
    >>> round(m.predict({"idle": 3.0}), 3), m.prior_share()  # nothing learned: the prior
    (0.5, 1.0)
    >>> for _ in range(100):
    ...     m.learn({"idle": 0.0}, False)
    >>> m.prior_share()
    0.5
    """

    def __init__(
        self,
        n_clusters: int = 6,
        window: int = 2000,
        seed: int = 42,
        created_at: int = 0,
        prior: Prior | None = None,
        prior_strength: float = 1000.0,
        signs: Mapping[str, int] | None = None,
    ) -> None:
        self.classifier = ChurnClassifier(signs=signs)
        self.kmeans = cluster.KMeans(
            n_clusters=n_clusters, halflife=0.02, mu=0.3, sigma=0.3, seed=seed
        )
        self.auc = metrics.RollingROCAUC(window_size=window)
        self.logloss = utils.Rolling(metrics.LogLoss, window_size=window)
        self.calibration = Calibration()
        self.adwin = drift.ADWIN()
        self.n_learned = 0
        self.n_positive = 0
        self.n_clustered = 0
        self.drifts = 0
        self.last_drift_at: int | None = None
        self.created_at = created_at
        self.matured_through_day: int | None = None
        self.prior = prior
        self.prior_strength = prior_strength
        #: The shared model's first version day (services.scorer.shared; None: not shared).
        self.first_day: int | None = None
        self._centers: Any = None
        self._center_ids: list[int] = []
        self._centers_at = -1
        self._blend: tuple[Any, ...] | None = None
        self._init_labels()

    def _init_labels(self) -> None:
        #: Snapshots waiting for their label, by snapshot day (services.scorer.core.Pending).
        self.pending: dict[Any, Any] = {}
        self.snapshot_day: int | None = None
        self.snapshot_rate = 1.0  # share of the customer-days snapshotted (max_pending_labels)
        #: The BG/NBD fit (services.scorer.btyd.BgNbd; None: not fitted yet) and its day.
        self.bgnbd: Any = None
        self.bgnbd_day: int | None = None
        self.suggested_horizon_days: float | None = None
        #: (score as served, matured label, days since the last qualifying activity) of the
        #: latest held-back snapshots: never learned, they measure the scores users got.
        self.holdout: deque[tuple[float, bool, float]] = deque(maxlen=self.holdout_window)
        self.holdout_labels = 0
        #: Share of the latest snapshot day's customers holding its most common score, and
        #: the day's mean score.
        self.tie_share: float | None = None
        self.mean_score: float | None = None

    holdout_window = 5000

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("prior", None)  # checkpoints from before the prior
        state.setdefault("prior_strength", 1000.0)
        state.setdefault("first_day", None)
        state.setdefault("_blend", None)
        if "pending" not in state:  # checkpoints from before the horizon labels
            self._init_labels()
            state = {**self.__dict__, **state}
        self.__dict__.update(state)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_blend"] = None  # derived: rebuilt on first use
        # Snapshots waiting for their label are not checkpointed: ~400 bytes each, H days of
        # a population's snapshots would outgrow a Kafka record (1 MB by default) past a
        # few thousand customers. After a restart the model learns again H days later.
        state["pending"] = {}
        return state

    # -- churn --------------------------------------------------------------------------
    def prior_share(self) -> float:
        """The prior's share of the churn log-odds (0 without a prior)."""
        if self.prior is None:
            return 0.0
        return self.prior_strength / (self.prior_strength + self.n_learned)

    def predict(self, x: Mapping[str, float]) -> float:
        """Churn probability in [0, 1]."""
        return self.predict_explain(x, 0)[0]

    def explain(self, x: Mapping[str, float], k: int = 5) -> list[tuple[str, float]]:
        return self.predict_explain(x, k)[1]

    def predict_explain(
        self, x: Mapping[str, float], k: int = 5
    ) -> tuple[float, list[tuple[str, float]]]:
        """Churn probability and the ``k`` largest contributions to its log-odds."""
        xd = dict(x)
        share = self.prior_share()
        if share == 0.0:
            p, contrib = self.classifier.predict_explain_one(xd)
            return p, contrib[:k]
        names = tuple(xd)
        ps, tops = self.predict_explain_matrix(names, np.array([list(xd.values())], float), k)
        return float(ps[0]), tops[0]

    def predict_explain_array(
        self, names: Sequence[str], x: npt.NDArray[np.float64], k: int = 5
    ) -> tuple[float, list[tuple[str, float]]]:
        """:meth:`predict_explain` for a vector of the features ``names`` (fast path)."""
        p, tops = self.predict_explain_matrix(names, x[None, :], k)
        return float(p[0]), tops[0]

    def predict_explain_matrix(
        self, names: Sequence[str], x: npt.NDArray[np.float64], k: int = 5
    ) -> tuple[npt.NDArray[np.float64], list[list[tuple[str, float]]]]:
        """:meth:`predict_explain_array` for the rows of ``x``."""
        _, _, scale, offset, intercept = self._blended(names)
        return explain_rows(x * scale - offset, intercept, names, k)

    def _blended(self, names: Sequence[str]) -> tuple[Any, ...]:
        """The log-odds as ``x * scale - offset`` summed, plus ``intercept``: the classifier's
        ``(x - mean) / std * w`` and the prior's ``(x - centre) * w'`` blended by the prior's
        share, as arrays cached until the model learns again."""
        clf = self.classifier
        arrays = clf._arrays
        if arrays is None or arrays[0] is not names:
            arrays = clf._arrays = clf._snapshot(names)
        cached = self._blend
        if cached is not None and cached[0] is arrays and cached[1] == self.n_learned:
            return cached
        _, mean, inv_std, weights, intercept = arrays
        scale = inv_std * weights
        offset = mean * scale
        share = self.prior_share()
        if share > 0.0 and self.prior is not None:
            pw, pc = self.prior.arrays(names)
            scale = (1.0 - share) * scale + share * pw
            offset = (1.0 - share) * offset + share * pc * pw
            intercept = (1.0 - share) * intercept + share * self.prior.intercept
        blend = self._blend = (arrays, self.n_learned, scale, offset, float(intercept))
        return blend

    def learn(
        self, x: Mapping[str, float], y: bool, at: int | None = None, p: float | None = None
    ) -> None:
        """Test then train: score ``x`` with the current model (the blended answer, as
        emitted; or take ``p``, its score by the model before a batch of labels), update the
        metrics and the drift detector with the matured label, then learn from it."""
        xd = dict(x)
        if self.n_learned:
            if p is None:
                p = self.predict(xd)
            self.auc.update(y, p)
            self.logloss.update(y, p)
            self.calibration.update(p, y)
            q = min(1 - 1e-7, max(1e-7, p))
            self.adwin.update(-math.log(q if y else 1 - q))
            if self.adwin.drift_detected:
                self.drifts += 1
                self.last_drift_at = at
        self.classifier.learn_one(xd, y)
        self.n_learned += 1
        self.n_positive += bool(y)

    def observe_holdout(self, p: float, y: bool, since: float) -> None:
        """A held-back customer's matured label against the score it was served."""
        self.holdout.append((p, y, since))
        self.holdout_labels += 1

    def observe_scores(self, p: npt.NDArray[np.float64]) -> None:
        """The scores of a day's snapshot (every customer in the day's phase)."""
        if len(p) == 0:
            return
        values = np.round(p, 4).tolist()
        self.tie_share = Counter(values).most_common(1)[0][1] / len(values)
        self.mean_score = float(np.mean(p))

    @property
    def version(self) -> str:
        share = self.prior_share()
        warm = f"+prior{round(100 * share)}" if share >= 0.005 else ""
        return f"churn-logreg-{VERSION}+n{self.n_learned}{warm}"

    # -- clusters -----------------------------------------------------------------------
    def cluster(self, cx: Mapping[str, float]) -> int:
        """The nearest centroid (as ``KMeans.predict_one``, on a cached centroid matrix)."""
        v = np.array([[cx[n] for n, _ in CLUSTER_DIMS]])
        return int(self.cluster_rows(v)[0])

    def cluster_rows(self, v: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """The nearest centroid of each row of ``v`` (columns in :data:`CLUSTER_DIMS` order)."""
        if self._centers is None or self._centers_at != self.n_clustered:
            ids = sorted(self.kmeans.centers)
            self._center_ids = ids
            self._centers = np.array(
                [[self.kmeans.centers[k][n] for n, _ in CLUSTER_DIMS] for k in ids]
            )
            self._centers_at = self.n_clustered
        d2 = ((v[:, None, :] - self._centers[None, :, :]) ** 2).sum(axis=2)
        nearest: npt.NDArray[np.int64] = np.asarray(self._center_ids, dtype=np.int64)[
            d2.argmin(axis=1)
        ]
        return nearest

    def learn_cluster(self, cx: Mapping[str, float]) -> None:
        self.kmeans.learn_one(dict(cx))
        self.n_clustered += 1

    def centroids(self) -> dict[int, dict[str, float]]:
        return {
            k: {name: float(center.get(name, 0.0)) for name, _ in CLUSTER_DIMS}
            for k, center in self.kmeans.centers.items()
        }

    def describe_clusters(self) -> dict[int, str]:
        """A short description of every centroid: its two most distinctive dimensions
        (high or low against the mean of all centroids)."""
        cents = self.centroids()
        if not cents:
            return {}
        mean = {n: sum(c[n] for c in cents.values()) / len(cents) for n, _ in CLUSTER_DIMS}
        spread = {
            n: max(1e-9, max(c[n] for c in cents.values()) - min(c[n] for c in cents.values()))
            for n, _ in CLUSTER_DIMS
        }
        out = {}
        for k, c in cents.items():
            dev = sorted(((c[n] - mean[n]) / spread[n], label) for n, label in CLUSTER_DIMS)
            picks = sorted([dev[0], dev[-1]], key=lambda d: -abs(d[0]))
            out[k] = ", ".join(f"{'high' if d > 0 else 'low'} {label}" for d, label in picks)
        return out

    # -- checkpoint ----------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def from_bytes(blob: bytes) -> ChurnModel:
        model = pickle.loads(blob)  # noqa: S301 - our own checkpoint topic
        if not isinstance(model, ChurnModel):
            raise TypeError(f"checkpoint holds {type(model).__name__}, not ChurnModel")
        return model

    def quality(self) -> dict[str, float | None]:
        """Metrics for export; None where undefined (an AUC with one class only).

        * ``roc_auc``, ``log_loss``, ``calibration_error``: prequential, on the labels
          learned (each scored as it was served, before the model learned it);
        * ``holdout_*`` on the latest :attr:`holdout_window` matured labels of the held-back
          customers (never learned): ``holdout_roc_auc`` of the served score,
          ``holdout_recency_roc_auc`` of days since the last qualifying activity alone, and
          their difference ``holdout_auc_minus_recency`` (below 0: worse than recency),
          calibration error, positive rate, labels so far;
        * ``score_tie_share``: share of the latest snapshot day's customers holding its most
          common score (4 decimals); ``mean_score``; ``suggested_horizon_days``.
        """
        both = self.n_learned > 1 and 0 < self.n_positive < self.n_learned
        auc = self.auc.get() if both else None
        ll = self.logloss.get() if self.n_learned > 1 else None
        out: dict[str, float | None] = {
            "roc_auc": float(auc) if auc is not None and math.isfinite(auc) else None,
            "log_loss": float(ll) if ll is not None and math.isfinite(ll) else None,
            "calibration_error": self.calibration.error(),
            "n_learned": float(self.n_learned),
            "positive_rate": self.n_positive / self.n_learned if self.n_learned else None,
            "drifts": float(self.drifts),
        }
        held = list(self.holdout)
        p = np.array([h[0] for h in held])
        y = np.array([h[1] for h in held], dtype=bool)
        since = np.array([h[2] for h in held])
        auc_h, auc_r = roc_auc(p, y), roc_auc(since, y)
        out.update(
            {
                "holdout_roc_auc": auc_h,
                "holdout_recency_roc_auc": auc_r,
                "holdout_auc_minus_recency": (
                    None if auc_h is None or auc_r is None else auc_h - auc_r
                ),
                "holdout_calibration_error": calibration_error(p, y) if held else None,
                "holdout_positive_rate": float(y.mean()) if held else None,
                "holdout_labels": float(self.holdout_labels),
                "score_tie_share": self.tie_share,
                "mean_score": self.mean_score,
                "suggested_horizon_days": self.suggested_horizon_days,
            }
        )
        return out
