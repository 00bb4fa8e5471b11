"""The shared churn model's days in the scorer (pure): each input partition's training
snapshots, labels and BG/NBD summaries per event-time day, sent as contributions when its
watermark passes the day boundary, and the model versions scores use, by day (a mixin of
:class:`services.scorer.core.Scorer`; see :mod:`services.scorer.shared`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from services.scorer.features import DAY, State
from services.scorer.labels import Labels
from services.scorer.model import CLUSTER_DIMS, ChurnModel
from services.scorer.shared import empty_contribution, label_lag, version_day
from services.scorer.view import _CLUSTER_NAMES, _MI_NAMES, new_model


class SharedDays(Labels):
    """With a :attr:`sink` (N instances, one model): per partition and day, and the versions."""

    versions: dict[int, ChurnModel]
    version_lag_days: int
    keep_versions: int
    early_scores: int
    _initial: ChurnModel | None

    def restore_clocks(self, clocks: Mapping[Any, Any]) -> None:
        """As :meth:`EventClock.restore_clocks`; a partition's days are swept up to its
        watermark's (the last owner swept them at the records that moved it)."""
        super().restore_clocks(clocks)
        for p in clocks:
            wm = self.watermark_of(p)
            if wm is None:
                self._swept.pop(p, None)
            else:
                self._swept[p] = wm // DAY

    def drop_sources(self, sources: Iterable[Any]) -> None:
        sources = list(sources)
        super().drop_sources(sources)
        for p in sources:
            self._swept.pop(p, None)
            self._rate.pop(p, None)

    def _day_passed(self, source: Any) -> None:
        if self.sink is not None and self.partition_states is not None:
            self.sweep(source, self.partition_states(source))

    def sweep(self, part: Any, states: Iterable[tuple[str, State]], hi: int | None = None) -> int:
        """With a sink: partition ``part``'s watermark passed day boundaries since the last
        call: for each day ``D`` send its contribution (:mod:`services.scorer.shared`): the
        cluster inputs of the day's snapshots of its customers ``states`` (each as of that
        midnight; those whose event after it came first were taken by ``on_event``), the
        examples whose label matured at boundary ``D - label_lag`` and, on a refit day, the
        BG/NBD summaries. A function of the partition's records: called at the record that
        moves the watermark (the shell's :attr:`partition_states`), or ahead of it, up to day
        ``hi``, by :meth:`precomplete`. The partition's first record completes its day (no
        snapshots: nothing before it). Returns the snapshots."""
        if hi is None:
            wm = self.watermark_of(part)
            if wm is None:
                return 0
            hi = wm // DAY
        lo = self._swept.get(part)
        if lo is None:
            self._swept[part] = hi
            if self.sink is not None:
                self.sink("day", empty_contribution(hi, int(part), True))
            return 0
        if hi <= lo:
            return 0
        items = list(states)
        cfg, model = self.config, self.model
        n = 0
        for d in range(lo + 1, hi + 1):
            out = empty_contribution(d, int(part), True)
            todo = [(st, d) for cid, st in items if self._snapshot_days(cid, st, d - 1, d, part)]
            every = cfg.snapshot_every_days
            cap = cfg.max_pending_labels / max(cfg.churn_horizon_days, 1)
            self._rate[part] = min(1.0, cap / max(1.0, len(items) / every))
            ps, ids, crows = self._snapshot(todo, part)
            out["ids"], out["rows"] = np.asarray(ids, dtype=str), crows
            if len(ps):
                model.observe_scores(ps)
            n += len(todo)
            m = d - label_lag(cfg)  # the label day boundary final now
            self._label_day(part, m, items, out)
            self._swept[part] = d
            if self.sink is not None:
                self.sink("day", out)
        return n

    def version_needed(self, part: Any, t: int) -> int | None:
        """The shared model's version a record of event time ``t`` read from partition ``part``
        may score with (its own instant, and the timers its watermark passes), if this scorer
        does not have it yet (None: it has it, or there is no shared model). The shell holds
        the partition at such a record until the version arrives (after :meth:`precomplete`)."""
        if self.sink is None:
            return None
        c = self.clocks.get(part)
        latest = t if c is None or c.latest < 0 else max(c.latest, t)
        need = version_day(max(t, latest - self.config.watermark_delay_ms), self.version_lag_days)
        return None if self.has_version(need) else need

    def has_version(self, day: int) -> bool:
        """Whether :meth:`model_for` gives version ``day`` (or the initial model, for a day
        before the learner's first version)."""
        if not self.versions:
            return False
        first = getattr(next(iter(self.versions.values())), "first_day", None)
        return (first is not None and day < first) or day <= max(self.versions)

    def precomplete(self, part: Any, t: int, states: Iterable[tuple[str, State]]) -> int | None:
        """Before holding partition ``part`` at a record of event time ``t`` for the version
        it needs: sweep what reading it would, up to that version's day (the days its
        watermark passes, from the states before it), so that the version does not wait for
        this partition. A day's snapshots are scored with the version of the day before:
        returns the version day it stopped at for want of it (None: swept up to the day
        needed); hold the partition until that one arrives. The record, once handled, sweeps
        the rest."""
        c = self.clocks.get(part)
        latest = t if c is None or c.latest < 0 else max(c.latest, t)
        wm_day = (latest - self.config.watermark_delay_ms) // DAY
        need = version_day(max(t, latest - self.config.watermark_delay_ms), self.version_lag_days)
        items = list(states)
        lo = self._swept.get(part)
        if lo is None:  # the partition's first record: completes its day, nothing to score
            self.sweep(part, items, wm_day)
            return None
        for d in range(lo + 1, min(need, wm_day) + 1):
            if not self.has_version(d - 1):
                return d - 1
            self.sweep(part, items, d)
        return None

    def _label_day(
        self, part: Any, day: int, items: list[tuple[str, State]], out: dict[str, Any]
    ) -> None:
        """Partition ``part``'s examples of label day boundary ``day`` (its snapshots of
        ``day - H``, labelled) and, on a refit day, its BG/NBD summaries, into ``out``."""
        cfg = self.config
        due = self.model.pending.pop((part, day - cfg.churn_horizon_days), None)
        if due is not None:
            want = {cid: i for i, cid in enumerate(due.ids)}
            now_days = np.full(len(want), -1, dtype=np.int64)
            for cid, st in items:
                i = want.get(cid)
                if i is not None:
                    now_days[i] = self.qualifying_days_before(st, day)
            idx = np.flatnonzero(now_days >= 0)  # not forgotten or merged away since
            out["ex_ids"] = np.asarray([due.ids[i] for i in idx], dtype=str)
            out["x"] = np.array([due.x[i] for i in idx], dtype=np.float32).reshape(
                -1, len(_MI_NAMES)
            )
            out["y"] = now_days[idx] == np.asarray(due.q_days, dtype=np.int64)[idx]
            out["p"] = np.asarray(due.p, dtype=np.float64)[idx]
            out["holdout"] = np.asarray(due.holdout, dtype=bool)[idx]
            out["since"] = np.asarray(due.since, dtype=np.float64)[idx]
        if day % cfg.bgnbd_refit_days == 0:  # refit days: a function of the day alone
            end = day * DAY
            summary = []
            for _, st in items:
                first = st.get("q_first_ms")
                if first is not None and first < end:
                    f, last = first // DAY, int(st["q_last_ms"]) // DAY
                    tx = float(last - f)
                    summary.append((float(st["q_days"] - 1), tx, max(float(day - f), tx)))
            out["bg"] = np.array(summary, dtype=np.float64).reshape(-1, 3)
            out["refit"] = True

    def _snapshot_early(self, state: State, days: list[int], part: Any) -> None:
        """Snapshots of a customer before its event after their day boundaries (learned in
        place, or sent as partial contributions of its partition's days)."""
        ps, ids, crows = self._snapshot([(state, d) for d in days], part)
        if self.sink is None:
            for cx in crows.tolist():
                self.model.learn_cluster(dict(zip(_CLUSTER_NAMES, cx, strict=True)))
            return
        for k, d in enumerate(days):
            out = empty_contribution(d, int(part), False)
            out["ids"], out["rows"] = np.asarray(ids[k : k + 1], dtype=str), crows[k : k + 1]
            self.sink("day", out)

    def model_for(self, as_of: int) -> ChurnModel:
        """The model a score as of ``as_of`` uses: this scorer's own without a sink; with one,
        the shared model's version of day ``as_of // DAY - version_lag_days`` (a function of
        the data: :mod:`services.scorer.shared`). Not received yet: the newest before it
        (counted in :attr:`early_scores`; the shell holds the partition instead once it can);
        before the first version (fewer than :attr:`keep_versions` kept): the initial model;
        older than every version kept: the oldest kept."""
        versions = self.versions
        if self.sink is None or not versions:
            return self.model
        day = as_of // DAY - self.version_lag_days
        hit = versions.get(day)
        if hit is not None:
            return hit
        older = [d for d in versions if d < day]
        first = getattr(next(iter(versions.values())), "first_day", None)
        if first is not None and day < first:
            if self._initial is None:
                self._initial = new_model()
                self._initial.cluster_rows(np.zeros((1, len(CLUSTER_DIMS))))
            return self._initial
        if not older:
            return versions[min(versions)]
        if day > max(versions):
            self.early_scores += 1
        return versions[max(older)]

    def receive(self, day: int, model: ChurnModel) -> None:
        """Version ``day`` of the shared model arrived (not shared with anything else
        afterwards): kept for the scores of day ``day + version_lag_days``; the last
        :attr:`keep_versions` days are kept; the newest is also :attr:`model` (``adopt``)."""
        model.cluster_rows(np.zeros((1, len(CLUSTER_DIMS))))  # its cached centres
        self.versions[day] = model
        for old in sorted(self.versions)[: -self.keep_versions]:
            del self.versions[old]
        if day == max(self.versions):
            adopt(self, model)


def adopt(scorer: SharedDays, shared: ChurnModel) -> None:
    """Score with ``shared`` (a model version the deployment's learner published; not shared
    with anything else afterwards), keeping this scorer's own label bookkeeping: the snapshots
    waiting for their labels, the days snapshotted and matured, the tie metrics."""
    old = scorer.model
    for name in (
        "pending",
        "snapshot_day",
        "snapshot_rate",
        "matured_through_day",
        "tie_share",
        "mean_score",
    ):
        setattr(shared, name, getattr(old, name))
    scorer.model = shared
    scorer._descriptions = shared.describe_clusters()
