"""Training snapshots and their labels (pure): each sampled customer-day is labelled
exactly H days later and learned (moved out of :mod:`services.scorer.core`; see its
module doc, *Churn*)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from services.scorer import btyd
from services.scorer.clock import EventClock
from services.scorer.features import (
    DAY,
    EVENT_SIGNAL,
    QUALIFYING,
    RING,
    Buckets,
    State,
    compute_many,
)
from services.scorer.model import ChurnModel
from services.scorer.view import (
    _CLUSTER_NAMES,
    _MI_NAMES,
    _SINCE_Q,
    cluster_rows,
    engagement_rows,
    model_matrix,
)


class Pending:
    """One day's training snapshots waiting for their label (H days later): per snapshot the
    customer, its qualifying days before the day, its model input and churn score as scored,
    whether it is held back (measured, never learned) and its days since the last qualifying
    activity (recency)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.q_days: list[int] = []
        self.x: list[npt.NDArray[np.float32]] = []
        self.p: list[float] = []
        self.holdout: list[bool] = []
        self.since: list[float] = []
        self._seen: set[str] = set()

    def add(
        self, cid: str, q_days: int, x: npt.NDArray[np.float64], p: float, held: bool, since: float
    ) -> None:
        if cid in self._seen:  # taken again (records read again after an abort)
            return
        self._seen.add(cid)
        self.ids.append(cid)
        self.q_days.append(q_days)
        self.x.append(x.astype(np.float32))
        self.p.append(p)
        self.holdout.append(held)
        self.since.append(since)


class Labels(EventClock):
    """The labelling part of :class:`services.scorer.core.Scorer` (a mixin: the attributes
    are the scorer's dataclass fields, the methods below the scorer's own)."""

    model: ChurnModel
    sink: Callable[[str, dict[str, Any]], None] | None
    _descriptions: dict[int, str]
    _timers: dict[Any, list[tuple[int, str]]]
    #: With a sink: the customers of one input partition (the shell's), so that a partition's
    #: training snapshots and labels are taken at the record that moves its watermark past a
    #: day boundary (:meth:`sweep`); None: at the next :meth:`snapshots` (a flush).
    partition_states: Callable[[Any], Iterable[tuple[str, State]]] | None
    #: With a sink, per input partition: the last day boundary swept, and its snapshot rate.
    _swept: dict[Any, int]
    _rate: dict[Any, float]

    if TYPE_CHECKING:

        def buckets(self, customer_id: str, st: State) -> Buckets:
            raise NotImplementedError

        def fill_bgnbd(
            self, rows: npt.NDArray[np.float64], model: ChurnModel | None = None
        ) -> None:
            raise NotImplementedError

        def model_for(self, as_of: int) -> ChurnModel:
            raise NotImplementedError

        def sweep(self, part: Any, states: Iterable[tuple[str, State]]) -> int:
            raise NotImplementedError

    # -- labels --------------------------------------------------------------------------
    def mature(
        self,
        states: Callable[[], Iterable[tuple[str, State]]],
        out_of_time: Callable[[], bool] | None = None,
    ) -> int:
        """Learn from every snapshot whose horizon is now behind the final watermark, day by
        day; with ``out_of_time`` (the shell's budget: True once it is spent) stop after the
        first day that ends with it spent, the rest in the next calls. Returns the number of
        examples learned."""
        fw = self.final_watermark
        if fw is None or self.sink is not None:  # with a sink: each partition's sweep()
            return 0
        target = fw // DAY  # day boundaries up to target * DAY are final
        model = self.model
        if model.matured_through_day is None:
            model.matured_through_day = target
            return 0
        n = 0
        while model.matured_through_day < target:
            model.matured_through_day += 1
            n += self._learn_day(model.matured_through_day, states())
            if out_of_time is not None and out_of_time():
                break
        if n:
            self._descriptions = model.describe_clusters()
        return n

    def _learn_day(self, day: int, states: Iterable[tuple[str, State]]) -> int:
        """The day boundary ``day`` is final: label the snapshots of ``day - H`` (churned:
        no qualifying day in ``[day - H, day)``) and learn them (the held-back customers'
        only measure the scores as served); refit the BG/NBD if it is due."""
        cfg, model = self.config, self.model
        h = cfg.churn_horizon_days
        end = day * DAY
        due = model.pending.pop(day - h, None)
        want = {} if due is None else {cid: i for i, cid in enumerate(due.ids)}
        now_days = np.full(len(want), -1, dtype=np.int64)
        refit = model.bgnbd_day is None or day - model.bgnbd_day >= cfg.bgnbd_refit_days
        summary: list[tuple[float, float, float]] = []
        for cid, st in states:
            i = want.get(cid)
            if i is not None:
                now_days[i] = self.qualifying_days_before(st, day)
            first = st.get("q_first_ms")
            if refit and first is not None and first < end:
                f, last = first // DAY, int(st["q_last_ms"]) // DAY
                tx = float(last - f)
                summary.append((float(st["q_days"] - 1), tx, max(float(day - f), tx)))
        n = 0
        if due is not None:
            n = self._learn_snapshots(due, now_days, end)
        if refit and len(summary) >= btyd.MIN_FIT_CUSTOMERS:
            a = np.array(summary)
            model.bgnbd = btyd.fit(a[:, 0], a[:, 1], a[:, 2], start=model.bgnbd)
            model.bgnbd_day = day
            model.suggested_horizon_days = self.suggested_horizon_days(states=None, gaps=a)
        return n

    def snapshots(self, states: Callable[[], Iterable[tuple[str, State]]]) -> int:
        """Take the training snapshots of the day boundaries the watermark passed since the
        last call: each customer on the days of its phase (one in ``snapshot_every_days``),
        its features and score as of that midnight. Only customers with no event after the
        boundary are taken here (their state is exactly what it was then); one whose event
        after the boundary came first was taken by :meth:`on_event`, from its state before
        that event. Returns the number of snapshots taken."""
        wm = self.watermark
        if wm is None:
            return 0
        if self.sink is not None:  # per partition, on its own clock
            mine: dict[Any, list[tuple[str, State]]] = {p: [] for p in self.clocks}
            for cid, st in states():
                mine.setdefault(self.part(cid), []).append((cid, st))
            return sum(self.sweep(p, mine[p]) for p in sorted(mine, key=str))
        hi = wm // DAY
        model, cfg = self.model, self.config
        lo = model.snapshot_day
        if lo is None:
            model.snapshot_day = hi
            return 0
        if hi <= lo:
            return 0
        every = cfg.snapshot_every_days
        todo: list[tuple[State, int]] = []
        n = 0
        for cid, st in states():
            n += 1
            todo += [(st, d) for d in self._snapshot_days(cid, st, lo, hi)]
        model.snapshot_day = hi
        cap = cfg.max_pending_labels / max(cfg.churn_horizon_days, 1)
        model.snapshot_rate = min(1.0, cap / max(1.0, n / every))
        ps, _, crows = self._snapshot(todo)
        for cx in crows.tolist():
            model.learn_cluster(dict(zip(_CLUSTER_NAMES, cx, strict=True)))
        model.observe_scores(ps)
        self._descriptions = model.describe_clusters()
        return len(todo)

    def _snapshot_days(
        self, cid: str, st: State, lo: int, hi: int, part: Any | None = None
    ) -> list[int]:
        """The snapshot days ``d`` in ``(lo, hi]`` of the customer's phase that its state
        holds exactly (no event at or after ``d * DAY``), sampled at the snapshot rate (with
        a sink: partition ``part``'s)."""
        every = self.config.snapshot_every_days
        phase = zlib.crc32(cid.encode()) % every
        s0 = max(lo + 1, int(st["last_event_ms"]) // DAY + 1)
        share = self.model.snapshot_rate if part is None else self._rate.get(part, 1.0)
        rate = int(share * 10_000)
        out = []
        for d in range(s0 + (phase - s0) % every, hi + 1, every):
            if rate >= 10_000 or zlib.crc32(f"{cid}:{d}".encode()) % 10_000 < rate:
                out.append(d)
        return out

    def _snapshot(
        self, todo: list[tuple[State, int]], part: Any | None = None
    ) -> tuple[npt.NDArray[np.float64], list[str], npt.NDArray[np.float64]]:
        """Record training snapshots ``(state, day)``: the model input and churn score as
        served at the day boundary (with a sink: by the version that day's scores use, kept
        per ``part``), and how many qualifying days the customer had before. Returns their
        scores, customer ids and cluster inputs."""
        model, cfg = self.model, self.config
        scores, ids, crows_all = [np.zeros(0)], [], [np.zeros((0, len(_CLUSTER_NAMES)))]
        for lo in range(0, len(todo), 512):
            chunk = todo[lo : lo + 512]
            sts = [st for st, _ in chunk]
            bs = [self.buckets(st["customer_id"], st) for st in sts]
            rows = compute_many(sts, [d * DAY for _, d in chunk], bs)
            days = sorted({d for _, d in chunk})
            ps = np.zeros(len(chunk))
            xm = np.zeros((len(chunk), len(_MI_NAMES)))
            for d in days:  # (one day but for a customer's event after several boundaries)
                sel = np.array([dd == d for _, dd in chunk])
                scorer_model = model if self.sink is None else self.model_for(d * DAY)
                sub = rows[sel]
                self.fill_bgnbd(sub, scorer_model)
                rows[sel] = sub
                xm[sel] = model_matrix(sub)
                ps[sel] = scorer_model.predict_explain_matrix(_MI_NAMES, xm[sel], 0)[0]
            crows_all.append(cluster_rows(rows, engagement_rows(rows)))
            for k, (st, d) in enumerate(chunk):
                cid = st["customer_id"]
                ids.append(cid)
                held = zlib.crc32(b"holdout:" + cid.encode()) % cfg.holdout_every == 0
                key: Any = d if self.sink is None else (part, d)
                day = model.pending.get(key)
                if day is None:
                    day = model.pending[key] = Pending()
                day.add(
                    cid,
                    self.qualifying_days_before(st, d),
                    xm[k],
                    float(ps[k]),
                    held,
                    float(rows[k, _SINCE_Q]),
                )
            scores.append(ps)
        return np.concatenate(scores), ids, np.concatenate(crows_all)

    def _learn_snapshots(self, due: Pending, now_days: npt.NDArray[np.int64], end: int) -> int:
        """Label matured snapshots and learn from those not held back; returns how many."""
        model = self.model
        n = 0
        for i in range(len(due.ids)):
            if now_days[i] < 0:
                continue  # the customer was forgotten or merged away since
            churned = bool(now_days[i] == due.q_days[i])
            p = float(due.p[i])
            if due.holdout[i]:
                model.observe_holdout(p, churned, float(due.since[i]))
                continue
            x = dict(zip(_MI_NAMES, due.x[i].astype(np.float64).tolist(), strict=True))
            model.learn(x, churned, at=end, p=p)
            n += 1
        return n

    def qualifying_days_before(self, st: State, day: int) -> int:
        """Distinct days with qualifying activity before the day boundary ``day`` (the
        summary's count less the days from ``day`` on that the buckets hold)."""
        total = int(st.get("q_days", 0))
        head = int(st["head_day"])
        if head < day or total == 0:
            return total
        b = self.buckets(st["customer_id"], st)
        slots = np.arange(max(day, head - RING + 1), head + 1) % RING
        sigs = self._qualifying_signals
        later = int(b.counts[slots][:, sigs].any(axis=1).sum())
        return total - later

    @property
    def _qualifying_signals(self) -> list[int]:
        return [
            EVENT_SIGNAL[k]
            for k in sorted(QUALIFYING[self.config.churn_activity])
            if k in EVENT_SIGNAL
        ]

    def suggested_horizon_days(
        self,
        states: Iterable[tuple[str, State]] | None = None,
        gaps: npt.NDArray[np.float64] | None = None,
    ) -> float:
        """A horizon H for this population: the 80th percentile of the mean gap between
        qualifying days of the customers with more than one (weighted by their gaps), rounded
        up to a week; 30 when no customer has two yet. ``gaps``: summaries ``(x, t_x, T)``."""
        if gaps is None:
            rows = [
                (float(st["q_days"] - 1), float(st["q_gap_sum"]), 0.0)
                for _, st in (states or [])
                if st.get("q_gaps")
            ]
            gaps = np.array(rows).reshape(-1, 3)
        return suggested_horizon(gaps)


def suggested_horizon(gaps: npt.NDArray[np.float64]) -> float:
    """:meth:`Labels.suggested_horizon_days` of summaries ``(x, t_x, T)``."""
    x, tx = gaps[:, 0], gaps[:, 1]
    sel = x > 0
    if not sel.any():
        return 30.0
    mean = tx[sel] / x[sel]
    order = np.argsort(mean)
    w = np.cumsum(x[sel][order])
    q = float(mean[order][np.searchsorted(w, 0.8 * w[-1])])
    return float(max(7, math.ceil(q / 7) * 7))
