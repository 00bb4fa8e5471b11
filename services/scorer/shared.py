"""The deployment's one churn model, learned as a function of the data (pure).

Every scorer instance sends, per identified partition ``p`` and event-time day ``D``, what
that partition's customers give the model for the day (a *contribution*, built by
:meth:`services.scorer.labels.Labels.sweep` when partition ``p``'s watermark passes the day
boundary ``D``, at that record): the cluster inputs of the day's training snapshots, the
examples whose label matured at the day boundary ``D - label_lag`` and, on a refit day, the
customers' BG/NBD summaries. A contribution sent before the boundary (a customer whose next
event came before the watermark passed it) is partial; the one at the boundary completes it.

:class:`SharedLearner` (the learner instance) buffers them and applies day ``D`` only once
every partition completed it, in a canonical order (partition, then customer id), so the
model after day ``D`` -- *version D* -- is a function of the partitions' records, not of
which instance sent what when. A score as of instant ``t`` uses version
``t // DAY - lag_days`` (:func:`version_day`), never "the latest".

>>> from services.scorer.config import ScorerConfig
>>> lr = SharedLearner(partitions=2, config=ScorerConfig())
>>> lr.add({"day": 10, "partition": 0, "complete": True})
[]
>>> [day for day, _ in lr.add({"day": 10, "partition": 1, "complete": True})], lr.through
([10], 10)
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from services.scorer import btyd
from services.scorer.config import ScorerConfig
from services.scorer.features import DAY
from services.scorer.model import ChurnModel
from services.scorer.view import _CLUSTER_NAMES, _MI_NAMES, new_model

#: The arrays of a contribution and their shapes (rows of: cluster inputs, model inputs,
#: BG/NBD summaries); ``ids`` / ``ex_ids`` name the customers of ``rows`` / ``x``.
ARRAYS: dict[str, tuple[int, ...]] = {
    "ids": (),
    "rows": (len(_CLUSTER_NAMES),),
    "ex_ids": (),
    "x": (len(_MI_NAMES),),
    "y": (),
    "p": (),
    "holdout": (),
    "since": (),
    "bg": (3,),
}


def version_day(as_of: int, lag_days: int) -> int:
    """The model version a score as of ``as_of`` uses: the day ``lag_days`` before its own.

    >>> version_day(10 * DAY + 5, 1), version_day(10 * DAY - 1, 1)
    (9, 8)
    """
    return as_of // DAY - lag_days


def label_lag(config: ScorerConfig) -> int:
    """Days between a contribution's day and the label day boundary it matures: the labels of
    boundary ``m`` are final once the partition's clock is ``allowed_lateness`` past it."""
    return max(0, math.ceil(config.allowed_lateness_ms / DAY))


def empty_contribution(day: int, partition: int, complete: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"day": day, "partition": partition, "complete": complete}
    for name, shape in ARRAYS.items():
        dtype: Any = str if name in ("ids", "ex_ids") else np.float64
        out[name] = np.zeros((0, *shape), dtype=dtype)
    out["refit"] = False
    return out


class SharedLearner:
    """Buffers the partitions' contributions and learns each day once every partition
    completed it (or ``grace_days`` after the leading partition passed it: see :meth:`add`).

    ``model`` is version :attr:`through`. The learner's whole state pickles (:meth:`to_bytes`)
    so that a new learner resumes exactly: the model and the contributions not applied yet.
    """

    def __init__(
        self,
        partitions: int,
        config: ScorerConfig,
        grace_days: int = 7,
        model: ChurnModel | None = None,
    ) -> None:
        self.partitions = partitions
        self.config = config
        self.grace_days = grace_days
        self.model = model if model is not None else new_model()
        self.model.cluster_rows(np.zeros((1, len(_CLUSTER_NAMES))))  # centres drawn as a scorer
        #: The last day applied (None: none yet): :attr:`model` is version ``through``.
        self.through: int | None = None
        #: Per partition: the last day it completed.
        self.done: dict[int, int] = {}
        #: Day -> partition -> contributions (partial ones first, the complete one last).
        self.buffer: dict[int, dict[int, list[Mapping[str, Any]]]] = {}
        #: Contributions that came for a day already applied (a partition more than
        #: ``grace_days`` behind the others): dropped, counted.
        self.dropped = 0
        #: Days applied without every partition (the grace rule, :meth:`force`).
        self.forced = 0
        #: Contributions for a day their partition had completed already (ignored).
        self.repeated = 0

    def force(self, day: int) -> list[tuple[int, bytes]]:
        """Apply every day up to ``day`` without waiting for the partitions that have not
        completed it (the shell's idle rule: the learner waited too long); their later
        contributions for those days are dropped."""
        for p in range(self.partitions):
            self.done[p] = max(day, self.done.get(p, day))
        return self._advance()

    def waiting(self) -> bool:
        """Whether contributions wait for a partition that has not completed their day."""
        ready = self.ready_through()
        return any(ready is None or d > ready for d in self.buffer)

    def add(self, contribution: Mapping[str, Any]) -> list[tuple[int, bytes]]:
        """Take one contribution; returns the days applied because of it, in order, each with
        its version (the model's bytes: :meth:`ChurnModel.from_bytes`). A day is applied once
        every partition completed it, or once some partition completed a day ``grace_days``
        later (the others are idle or stuck: their late contributions for it are dropped)."""
        day, part = int(contribution["day"]), int(contribution["partition"])
        if day <= self.done.get(part, day - 1):  # sent again (records read again): the same
            self.repeated += 1
            return []
        if self.through is not None and day <= self.through:
            self.dropped += 1
            return []
        self.buffer.setdefault(day, {}).setdefault(part, []).append(contribution)
        if contribution["complete"]:
            self.done[part] = max(day, self.done.get(part, day))
        return self._advance()

    def ready_through(self) -> int | None:
        """The last day every partition completed, or the grace rule allows."""
        if not self.done:
            return None
        every = min(self.done.get(p, -1) for p in range(self.partitions))
        lead = max(self.done.values()) - self.grace_days
        best = max(every, lead)
        return None if best < 0 else best

    def _advance(self) -> list[tuple[int, bytes]]:
        ready = self.ready_through()
        if ready is None:
            return []
        days = sorted(d for d in self.buffer if d <= ready)
        if self.through is None and days:  # the first version: the first day with data
            start = days[0]
            self.model.first_day = start  # (in every version: earlier days are the initial)
        elif self.through is None:
            return []
        else:
            start = self.through + 1
        out = []
        for day in range(start, ready + 1):
            parts = self.buffer.pop(day, {})
            if any(self.done.get(p, -1) < day for p in range(self.partitions)):
                self.forced += 1
            self.apply(day, parts)
            self.through = day
            out.append((day, self.model.to_bytes()))
        return out

    def apply(self, day: int, parts: Mapping[int, list[Mapping[str, Any]]]) -> None:
        """Learn day ``day``: the partitions in order, each one's rows by customer id: cluster
        inputs, then the matured examples, then a BG/NBD refit on the summaries."""
        model, cfg = self.model, self.config
        merged = {name: _stack(parts, name) for name in ARRAYS}
        for i in _order(parts, "ids"):
            cx = merged["rows"][i].tolist()
            model.learn_cluster(dict(zip(_CLUSTER_NAMES, cx, strict=True)))
        end = (day - label_lag(cfg)) * DAY
        for i in _order(parts, "ex_ids"):
            p, y = float(merged["p"][i]), bool(merged["y"][i])
            if merged["holdout"][i]:
                model.observe_holdout(p, y, float(merged["since"][i]))
                continue
            x = dict(zip(_MI_NAMES, merged["x"][i].astype(np.float64).tolist(), strict=True))
            model.learn(x, y, at=end, p=p)
        from services.scorer.labels import suggested_horizon  # (labels imports this module)

        refit = any(bool(c.get("refit")) for cs in parts.values() for c in cs)
        a = merged["bg"]
        if refit and len(a) >= btyd.MIN_FIT_CUSTOMERS:
            a = a[np.lexsort(a.T[::-1])] if len(a) else a
            model.bgnbd = btyd.fit(a[:, 0], a[:, 1], a[:, 2], start=model.bgnbd)
            model.bgnbd_day = day - label_lag(cfg)
            model.suggested_horizon_days = suggested_horizon(a)

    def to_bytes(self) -> bytes:
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def from_bytes(blob: bytes) -> SharedLearner:
        learner = pickle.loads(blob)  # noqa: S301 - our own record
        if not isinstance(learner, SharedLearner):
            raise TypeError(f"record holds {type(learner).__name__}, not SharedLearner")
        return learner


def _stack(parts: Mapping[int, list[Mapping[str, Any]]], name: str) -> npt.NDArray[Any]:
    """Array ``name`` of every contribution, partitions in order (each one's in arrival
    order: :func:`_order` sorts them)."""
    arrays = [np.asarray(c[name]) for p in sorted(parts) for c in parts[p] if name in c]
    if not arrays:
        return np.zeros((0, *ARRAYS[name]))
    return np.concatenate([a.reshape(-1, *ARRAYS[name]) for a in arrays])


def _order(parts: Mapping[int, list[Mapping[str, Any]]], ids: str) -> list[int]:
    """Indices into :func:`_stack`'s rows: by partition, then customer id (a stable order
    whatever the contributions' arrival)."""
    keys: list[tuple[int, str, int]] = []
    for p in sorted(parts):
        for c in parts[p]:
            for cid in np.asarray(c.get(ids, ())).tolist():
                keys.append((p, str(cid), len(keys)))
    return [i for _, _, i in sorted(keys)]
