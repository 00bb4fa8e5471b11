"""Scorer core: time without events, coalesced emission, merges, lifecycle, checkpoints."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fastavro
import fastavro.validation
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as hs

from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import Delivery
from services.scorer.core import ScoreEmit, Scorer, ScorerConfig, StateWrite, lifecycle
from services.scorer.features import DAY, FEATURE_INDEX, FEATURE_NAMES, HOUR, MINUTE, compute

T0 = 1_704_067_200_000


def ev(kind: str, t: int, **extra: Any) -> dict[str, Any]:
    return {"event_type": kind, "occurred_at": t, **extra}


class Harness:
    """The scorer with a dict as its state store, applying outputs like the shell does."""

    def __init__(self, config: ScorerConfig | None = None) -> None:
        self.sc = Scorer(config or ScorerConfig())
        self.store: dict[str, dict[str, Any]] = {}
        self.scores: list[dict[str, Any]] = []
        self.tombstones: list[str] = []

    def apply(self, outs: list[Any]) -> None:
        for o in outs:
            if isinstance(o, StateWrite):
                if o.state is None:
                    self.store.pop(o.customer_id, None)
                else:
                    self.store[o.customer_id] = o.state
            elif isinstance(o, ScoreEmit):
                if o.score is None:
                    self.tombstones.append(o.customer_id)
                else:
                    self.scores.append(o.score)

    def event(self, cid: str, e: dict[str, Any]) -> None:
        _, outs = self.sc.on_event(self.store.get(cid), cid, e, now_ms=e["occurred_at"])
        self.apply(outs)

    def flush(self, now: int = 0) -> None:
        self.apply(self.sc.flush(self.store.get, self.store.items, now))

    def of(self, cid: str) -> list[dict[str, Any]]:
        return [s for s in self.scores if s["customer_id"] == cid]


def test_a_silent_customers_recency_grows_with_the_watermark() -> None:
    h = Harness()
    h.event("quiet", ev("purchase", T0 + HOUR, amount=50.0))
    assert h.of("quiet")[-1]["features"]["days_since_purchase"] == 0.0
    for day in range(1, 5):  # only another customer is active: time still moves
        h.event("busy", ev("page_view", T0 + day * DAY + 12 * HOUR))
        h.flush()
    refreshed = h.of("quiet")
    assert [s["as_of"] for s in refreshed[1:]] == [T0 + d * DAY for d in range(1, 5)]
    assert [s["features"]["days_since_purchase"] for s in refreshed[1:]] == [
        round((d * DAY - HOUR) / DAY, 4) for d in range(1, 5)
    ]
    assert refreshed[-1]["features"]["purchases_3d"] == 0.0  # the window rolled


def test_a_burst_of_events_is_coalesced_into_one_score() -> None:
    h = Harness()
    h.event("c1", ev("page_view", T0))
    assert len(h.of("c1")) == 1  # a new customer is scored at once
    for i in range(1, 20):
        h.event("c1", ev("page_view", T0 + i * 5_000))
    assert len(h.of("c1")) == 1  # not urgent: pending until the watermark passes
    h.event("other", ev("page_view", T0 + 11 * MINUTE))  # watermark T0 + 6 min: not yet due
    h.flush()
    assert len(h.of("c1")) == 1
    h.event("other", ev("page_view", T0 + 12 * MINUTE))  # watermark T0 + 7 min
    h.flush()
    first, second = h.of("c1")
    assert second["features"]["page_views_3d"] == 20.0
    assert second["as_of"] == T0 + 95_000 + 5 * MINUTE  # the interval after the burst's last
    h.flush()  # nothing new: nothing re-emitted
    assert len(h.of("c1")) == 2


def test_urgent_events_are_scored_at_once_and_the_rest_at_most_once_per_interval() -> None:
    h = Harness()
    h.event("c1", ev("login", T0))
    h.event("x", ev("login", T0 + MINUTE))
    h.flush()
    assert len(h.of("c1")) == 1
    h.event("c1", ev("page_view", T0 + 2 * MINUTE))
    h.event("x", ev("login", T0 + 8 * MINUTE))  # watermark T0 + 3 min: interval not over
    h.flush()
    assert len(h.of("c1")) == 1
    h.event("c1", ev("purchase", T0 + 9 * MINUTE, amount=5.0))  # urgent
    # the page view's score was due at T0 + 7 min (the interval after it): the later
    # purchase fires it first, as of its own instant, without the purchase
    pending, urgent = h.of("c1")[1:]
    assert (pending["as_of"], urgent["as_of"]) == (T0 + 7 * MINUTE, T0 + 9 * MINUTE)
    assert pending["features"]["page_views_3d"] == 1.0
    assert pending["features"]["purchases_3d"] == 0.0
    assert urgent["features"]["purchases_3d"] == 1.0
    h.event("c1", ev("support_ticket", T0 + 10 * MINUTE, escalated=True, sentiment=-0.8))
    assert h.of("c1")[-1]["features"]["escalations_7d"] == 1.0


def test_scoring_the_same_profile_twice_emits_no_second_change() -> None:
    h = Harness()
    h.event("c1", ev("purchase", T0, amount=10.0))
    st = dict(h.store["c1"])
    sc = h.sc
    again = sc._settle(st, sc.score(st, st["last_event_ms"]), now_ms=0)
    assert again is None


def test_merge_folds_the_absorbed_history_into_the_survivor_and_deletes_it() -> None:
    h = Harness()
    h.event("old", ev("login", T0))
    h.event("old", ev("purchase", T0 + HOUR, amount=10.0))
    h.event("new", ev("login", T0 + 2 * HOUR))
    h.event("new", ev("purchase", T0 + 3 * HOUR, amount=32.0))
    merge = {"merge_id": "m1", "survivor_id": "old", "absorbed_ids": ["new"]}
    h.apply(h.sc.on_merge(h.store.get, merge, now_ms=0))
    assert "new" not in h.store and h.tombstones == ["new"]
    f = h.of("old")[-1]["features"]
    assert (f["logins_7d"], f["purchases_7d"], f["revenue_7d"]) == (2.0, 2.0, 42.0)
    assert f["lifetime_purchases"] == 2.0
    emitted = len(h.scores)
    h.apply(h.sc.on_merge(h.store.get, merge, now_ms=0))  # replayed: nothing to do
    assert len(h.scores) == emitted and h.store["old"]["lifetime_purchases"] == 2


def test_merge_into_an_unknown_survivor_moves_the_state() -> None:
    h = Harness()
    h.event("b", ev("login", T0))
    h.apply(h.sc.on_merge(h.store.get, {"survivor_id": "a", "absorbed_ids": ["b"]}, now_ms=0))
    assert set(h.store) == {"a"} and h.store["a"]["customer_id"] == "a"
    assert h.of("a")[-1]["features"]["logins_3d"] == 1.0


def test_a_forgotten_customer_is_deleted_and_never_profiled_again() -> None:
    h = Harness()
    h.event("gone", ev("login", T0))
    h.event("gone", ev("purchase", T0 + HOUR, amount=10.0))
    h.event("gone", ev("page_view", T0 + 2 * HOUR))  # pending: a timer is waiting
    h.event("alias", ev("login", T0 + 2 * HOUR))  # the same person, merged later
    h.event("other", ev("login", T0 + 2 * HOUR))
    clock = h.sc.max_event_ms
    scores_before = len(h.of("gone")), len(h.of("alias"))
    # stamped with the request's processing time, far ahead of event time
    h.event("gone", ev("customer_forgotten", T0 + 30 * DAY, properties={}))
    assert "gone" not in h.store and h.tombstones == ["gone"]
    assert h.sc.max_event_ms == clock  # the request does not move the event-time clock
    timers = [cid for heap in h.sc._timers.values() for _, cid in heap]
    assert "gone" not in timers and "gone" not in h.sc._cache
    # an event already in flight, a merge read after the forget, time passing
    h.event("gone", ev("purchase", T0 + 3 * HOUR, amount=99.0))
    merge = {"merge_id": "m1", "survivor_id": "gone", "absorbed_ids": ["alias"]}
    h.apply(h.sc.on_merge(h.store.get, merge, now_ms=0))
    for day in range(1, 4):
        h.event("other", ev("login", T0 + day * DAY))
        h.flush()
    assert "gone" not in h.store and "alias" not in h.store
    assert (len(h.of("gone")), len(h.of("alias"))) == scores_before  # nothing new emitted
    assert h.tombstones == ["gone", "alias"] and h.sc.retired == {"gone", "alias"}
    assert len(h.of("other")) > 1  # everyone else goes on as before
    h.event("gone", ev("customer_forgotten", T0 + 31 * DAY))  # replayed: nothing to do
    assert h.tombstones == ["gone", "alias"]


def _vec(**values: float) -> Any:
    v = np.zeros(len(FEATURE_NAMES))
    for k, x in values.items():
        v[FEATURE_INDEX[k]] = x
    return v


def test_lifecycle_stages() -> None:
    cfg = ScorerConfig()
    base = {
        "last_active_ms": T0,
        "last_cancel_ms": None,
        "lifetime_logins": 5,
        "lifetime_purchases": 3,
        "lifetime_feature_use": 20,
    }
    assert lifecycle({**base, "last_active_ms": None}, _vec(), 0.1, True, cfg) == "prospect"
    assert (
        lifecycle(
            {**base, "lifetime_logins": 0, "lifetime_purchases": 0, "lifetime_feature_use": 0},
            _vec(tenure_days=50),
            0.1,
            True,
            cfg,
        )
        == "prospect"
    )
    assert lifecycle({**base, "last_cancel_ms": T0 + 1}, _vec(), 0.1, True, cfg) == "churned"
    assert lifecycle(base, _vec(days_since_active=31), 0.1, True, cfg) == "churned"
    assert lifecycle(base, _vec(tenure_days=90), 0.8, True, cfg) == "at_risk"
    assert lifecycle(base, _vec(tenure_days=90), 0.8, False, cfg) != "at_risk"  # cold model
    assert (
        lifecycle(base, _vec(tenure_days=90, activity_14d_vs_prior28_change=-0.7), 0.1, True, cfg)
        == "at_risk"
    )
    assert lifecycle(base, _vec(tenure_days=5), 0.1, True, cfg) == "onboarded"
    assert lifecycle(base, _vec(tenure_days=30, active_days_28d=20), 0.1, True, cfg) == "adopting"
    assert lifecycle(base, _vec(tenure_days=90, active_days_28d=20), 0.1, True, cfg) == "loyal"


def _simulated(customers: int = 60, days: int = 110) -> Harness:
    sim = Simulation(SimConfig(customers=customers, days=days, seed=11))
    h = Harness()
    for i, d in enumerate(x for x in sim.run() if isinstance(x, Delivery)):
        h.event(d.customer, d.event)
        if i % 500 == 0:
            h.flush(d.event["occurred_at"])
    h.flush()
    return h


def test_on_a_simulated_population_scores_are_bounded_and_the_model_learns() -> None:
    h = _simulated()
    assert h.sc.model.n_learned > 300
    assert all(0.0 <= s["churn_probability"] <= 1.0 for s in h.scores)
    assert all(0.0 <= s["engagement_score"] <= 100.0 for s in h.scores)
    assert all(s["clv"] >= 0 for s in h.scores)
    assert {s["lifecycle_stage"] for s in h.scores} >= {"loyal", "at_risk", "churned"}
    assert all(len(s["top_features"]) == 5 for s in h.scores)
    q = h.sc.model.quality()
    assert 0.0 < q["roc_auc"] <= 1.0 and q["log_loss"] > 0


def test_a_checkpoint_round_trip_gives_identical_predictions() -> None:
    h = _simulated(customers=30, days=80)
    record = h.sc.checkpoint("churn.t", now_ms=1)
    avsc = Path(__file__).resolve().parents[2] / "schemas/io.segflow.ModelCheckpoint.avsc"
    schema = json.loads(avsc.read_text())
    assert fastavro.validation.validate(record, fastavro.parse_schema(schema), raise_errors=True)
    restored = Scorer(ScorerConfig())
    restored.restore(record)
    assert restored.model.n_learned == h.sc.model.n_learned > 0
    # snapshots waiting for their labels stay out of the checkpoint (a Kafka record)
    assert h.sc.model.pending and not restored.model.pending
    assert len(record["model"]) < 300_000
    for st in h.store.values():
        a = h.sc.score(st, st["last_event_ms"])
        b = restored.score(st, st["last_event_ms"])
        assert (a.churn, a.top, a.cluster, a.stage) == (b.churn, b.top, b.cluster, b.stage)


def test_a_checkpoint_of_the_old_churn_model_is_not_resumed() -> None:
    # before issue #17 the model learned another label on other inputs, unconstrained
    from services.scorer.model import ChurnModel

    old = ChurnModel()
    for _ in range(50):
        old.learn({"idle_days_active": 3.0}, True)
    sc = Scorer(ScorerConfig())
    sc.restore({"model": old.to_bytes(), "created_at": 5})
    assert sc.model.n_learned == 0 and sc.model.prior_share() == 1.0
    assert sc.model.classifier.signs  # the new, constrained model


@settings(max_examples=40, deadline=None)
@given(
    hs.lists(
        hs.tuples(
            hs.sampled_from(
                [
                    "login",
                    "purchase",
                    "feature_use",
                    "email_open",
                    "support_ticket",
                    "cart_view",
                    "webinar",
                ]
            ),
            hs.integers(0, 200 * DAY),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_any_history_scores_within_bounds(events: list[tuple[str, int]]) -> None:
    h = Harness()
    for kind, t in sorted(events, key=lambda kt: kt[1]):
        h.event("c", ev(kind, T0 + t, amount=3.0, sentiment=-0.2, escalated=True))
    st = h.store["c"]
    s = h.sc.score(st, st["last_event_ms"] + 3 * DAY)
    assert 0.0 <= s.churn <= 1.0 and 0.0 <= s.engagement <= 100.0
    assert np.isfinite(compute(st, st["last_event_ms"]).vector).all()


def test_before_any_label_the_churn_score_is_the_prior_not_a_flat_half() -> None:
    h = Harness()
    for d in range(60):
        h.event("busy", ev("login", T0 + d * DAY + HOUR))
        if d < 30:  # daily, then silent for 30 days
            h.event("gone", ev("login", T0 + d * DAY + 2 * HOUR))
    as_of = T0 + 60 * DAY
    busy, gone = (h.sc.score(h.store[c], as_of) for c in ("busy", "gone"))
    assert h.sc.model.n_learned == 0
    assert busy.churn < 0.1 and gone.churn > 0.5
    assert gone.top[0][0] == "bgnbd_p_none"  # the BG/NBD prior: 30 silent days after 30 busy
    assert gone.top[0][1] > 0  # pushes towards churn
    record = h.sc.record("gone", gone, now_ms=0)
    assert record["features"]["churn_prior_share"] == 1.0
    assert record["model_version"].endswith("+n0+prior100")


def test_the_prior_gives_way_to_the_model_as_labels_are_learned() -> None:
    h = _simulated(customers=30, days=80)
    m = h.sc.model
    assert m.n_learned > 0 and m.prior_share() == 1000 / (1000 + m.n_learned)
    shares = [s["features"]["churn_prior_share"] for s in h.scores]  # in emission order
    assert shares[0] == 1.0 and min(shares) < 1.0 and shares == sorted(shares, reverse=True)


# -- churn labels ------------------------------------------------------------------------------
DAY0 = T0 // DAY


def _history(
    days: Iterable[int], cancel_day: int | None = None, config: ScorerConfig | None = None
) -> tuple[Scorer, dict[str, Any]]:
    events = [ev("login", T0 + d * DAY + HOUR) for d in days]
    if cancel_day is not None:
        events.append(ev("subscription_cancel", T0 + cancel_day * DAY + 2 * HOUR))
    sc = Scorer(config or ScorerConfig())
    st = None
    for e in sorted(events, key=lambda e: e["occurred_at"]):
        st, _ = sc.on_event(st, "c", e, now_ms=e["occurred_at"])
    assert st is not None
    return sc, st


def _days_run(h: Harness, purchases: dict[str, list[int]], days: range) -> None:
    """Replay day by day: the clock passes midnight (5 minutes in), then the day's
    purchases at noon."""
    for d in days:
        h.sc.max_event_ms = max(h.sc.max_event_ms or 0, T0 + d * DAY + 5 * MINUTE)
        h.flush()
        for cid, ds in purchases.items():
            if d in ds:
                h.event(cid, ev("purchase", T0 + d * DAY + 12 * HOUR, amount=10.0))


def test_every_sampled_customer_day_is_labelled_exactly_at_the_horizon() -> None:
    # every customer snapshotted every day, all held back (so every label is recorded with
    # the recency it was scored with), H = 10 days, 1 h allowed lateness
    cfg = ScorerConfig(
        churn_horizon_days=10,
        churn_activity="purchase",
        snapshot_every_days=1,
        holdout_every=1,
        allowed_lateness_ms=HOUR,
    )
    purchases = {
        "gone": [0, 1, 2, 3, 4],  # never again
        "back": [0, 1, 2, 3, 4, 20],  # back after 16 quiet days
        "stay": list(range(0, 46)),
    }
    h = Harness(cfg)
    for d in range(0, 46):
        _days_run(h, purchases, range(d, d + 1))
        # day d's boundary is final at the next day's first minutes (1 h lateness): the
        # snapshots of day d - 1 - 10 and before have matured, not one later
        assert h.sc.model.holdout_labels == 3 * max(0, d - 1 - 10), d
    assert h.sc.model.n_learned == 0  # all held back
    # independently: every customer-day 1..34, labelled "no purchase in [d, d + 10)"
    want: Counter[tuple[float, bool]] = Counter()
    for ds in purchases.values():
        for d in range(1, 35):
            last = max(x for x in ds if x < d)
            want[(d - last - 0.5, not any(d <= x < d + 10 for x in ds))] += 1
    got = Counter((round(since, 4), y) for _, y, since in h.sc.model.holdout)
    assert got == want
    # 15.5 days quiet: churned for the customer who never came back, not for the one back
    # on day 20 (labelled by each day's horizon, not once for good)
    assert want[(15.5, True)] == 1 and want[(15.5, False)] == 1


def test_a_model_quality_with_one_class_is_undefined_not_zero() -> None:
    sc = Scorer(ScorerConfig())
    for _ in range(5):
        sc.model.learn({"x": 1.0}, False)
        sc.model.observe_holdout(0.2, False, 3.0)
    q = sc.model.quality()
    assert q["roc_auc"] is None and q["holdout_roc_auc"] is None
    assert q["holdout_recency_roc_auc"] is None and q["holdout_auc_minus_recency"] is None
    sc.model.observe_holdout(0.9, True, 1.0)  # a churner the score ranks above, recency below
    q = sc.model.quality()
    assert q["holdout_roc_auc"] == 1.0 and q["holdout_recency_roc_auc"] == 0.0
    assert q["holdout_auc_minus_recency"] == 1.0


def test_the_score_distribution_reports_the_share_of_ties() -> None:
    sc = Scorer(ScorerConfig())
    sc.model.observe_scores(np.array([0.1, 0.1, 0.1, 0.2, 0.30001]))
    q = sc.model.quality()
    assert q["score_tie_share"] == 0.6 and abs(q["mean_score"] - 0.16) < 1e-4


def test_a_sparse_customer_is_churned_only_after_three_of_its_usual_gaps() -> None:
    cfg = ScorerConfig()
    sc, st = _history(range(0, 61, 20))  # active every 20 days, then silent after day 60
    at = lambda d: sc.score(st, T0 + d * DAY + 2 * HOUR).stage  # noqa: E731
    assert at(60 + 35) == "at_risk"  # 35 quiet days: 1.5 usual gaps, not 3
    assert at(60 + 57) == "churned"
    _, regular = _history(range(0, 61))
    assert sc.score(regular, T0 + 95 * DAY).stage == "churned"  # 35 days for a daily one
    assert cfg.churn_horizon_days == 30


def test_deferred_urgent_events_are_scored_as_of_their_instants_without_later_read_ones() -> None:
    h = Harness()
    h.sc = sc = Scorer(ScorerConfig(), defer_scores=True)
    h.event("c1", ev("purchase", T0, amount=5.0))
    h.event("c2", ev("login", T0 + 2 * MINUTE))
    h.event("c1", ev("purchase", T0 + 2 * MINUTE, amount=7.0))
    h.event("c1", ev("page_view", T0 + MINUTE))  # out of order: before the purchase
    h.event("c1", ev("purchase", T0 + 2 * MINUTE, amount=1.0))  # at the same instant
    assert h.scores == []  # score outputs are held until the batch's settle
    h.apply(sc.settle(h.store.get, now_ms=0))  # before the batch commits
    # a customer's next event read fires its deferred score first, as of the score's own
    # instant and with what was read before it, as settling after every event would: the
    # first purchase at the second, the second at the page view (older, but read after it,
    # so it is not in that score whether or not the batch ended in between)
    first, second, c1 = h.of("c1")
    assert first["as_of"] == T0 and first["features"]["purchases_3d"] == 1.0
    assert second["as_of"] == T0 + 2 * MINUTE
    assert (second["features"]["purchases_3d"], second["features"]["page_views_3d"]) == (2, 0)
    # in the order of their events: c2's first event came between c1's first two purchases
    assert [s["customer_id"] for s in h.scores] == ["c1", "c2", "c1", "c1"]
    assert (c1["features"]["purchases_3d"], c1["features"]["page_views_3d"]) == (3.0, 1.0)
    assert c1["as_of"] == T0 + 2 * MINUTE and not h.store["c1"]["pending"]
    assert len(h.of("c1")) == 3 and len(h.of("c2")) == 1
    h.apply(sc.settle(h.store.get, now_ms=0))
    assert len(h.scores) == 4  # settled once


def test_deferred_scoring_settled_after_every_event_gives_the_same_scores() -> None:
    sim = Simulation(SimConfig(customers=20, days=40, seed=5))
    items = [(d.customer, d.event) for d in sim.run() if isinstance(d, Delivery)]

    def replay(defer: bool) -> tuple[dict[str, Any], list[Any]]:
        sc = Scorer(ScorerConfig(), pack_states=False, defer_scores=defer)
        store: dict[str, Any] = {}
        scores: list[Any] = []

        def apply(outs: list[Any]) -> None:
            for o in outs:
                if isinstance(o, StateWrite) and o.state is not None:
                    store[o.customer_id] = o.state
                elif isinstance(o, ScoreEmit) and o.score is not None:
                    scores.append({**o.score, "scored_at": 0})

        for i, (cid, e) in enumerate(items):
            apply(sc.on_event(store.get(cid), cid, e, now_ms=e["occurred_at"])[1])
            apply(sc.settle(store.get, e["occurred_at"]))
            if i % 200 == 199:
                apply(sc.flush(store.get, store.items, e["occurred_at"]))
                apply(sc.seal())
        apply(sc.flush(store.get, store.items, items[-1][1]["occurred_at"]))
        apply(sc.seal())
        return store, scores

    def per_customer(scores: list[Any]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for s in scores:  # (a flush may list different customers in another order)
            out.setdefault(s["customer_id"], []).append(s)
        return out

    (now_states, now_scores), (deferred_states, deferred_scores) = replay(False), replay(True)
    assert deferred_states == now_states
    assert per_customer(deferred_scores) == per_customer(now_scores)
    assert len(now_scores) > 50


def test_a_tick_does_bounded_work_and_the_next_ticks_finish_it() -> None:
    h = Harness(ScorerConfig(max_scores_per_flush=7))
    tick = lambda: h.apply(h.sc.flush(h.store.get, h.store.items, 0, out_of_time=lambda: True))  # noqa: E731
    for i in range(20):
        h.event(f"c{i}", ev("login", T0 + i * MINUTE))
    h.flush()
    model = h.sc.model
    start = model.matured_through_day
    h.event("late", ev("login", T0 + 5 * DAY))  # everyone is due for 4 refreshes, 3 label days
    emitted, scored = len(h.scores), h.sc.scored
    tick()  # the deadline has passed: one day of labels
    assert len(h.scores) - emitted == 7 and model.matured_through_day == start + 1
    assert h.sc.scored - scored == 7
    for n in range(2, 13):  # 80 refreshes (20 customers, 4 day boundaries), 7 a tick
        before = h.sc.scored
        tick()
        assert h.sc.scored - before == min(7, 80 - 7 * (n - 1))
        if n == 4:
            assert model.matured_through_day == start + 4
    refreshed = {s["customer_id"] for s in h.scores[emitted:]}
    assert refreshed == {f"c{i}" for i in range(20)}
    # each customer scored once at each day boundary, as of it: 80 in all, none twice
    assert h.sc.scored - scored == 80
    assert {h.store[f"c{i}"]["scored_as_of"] for i in range(20)} == {T0 + 4 * DAY}
    tick()
    assert h.sc.scored - scored == 80  # nothing left due


# -- refresh timers ------------------------------------------------------------------------------
def test_months_of_silence_every_customer_is_rescored_on_schedule() -> None:
    # 40 customers active for one to two weeks, then silent for five months while time passes
    # day by day: each is rescored every day until it has been silent for four weeks or a
    # refresh turns it churned, then on the weekly grid, to the end (issue #17: a customer
    # turned churned by a refresh lost its timer)
    h = Harness()
    ids = [f"c{i}" for i in range(40)]
    for d in range(14):
        h.sc.max_event_ms = max(h.sc.max_event_ms or 0, T0 + d * DAY + 5 * MINUTE)
        h.flush()
        for i, cid in enumerate(ids):
            if d <= 6 + i % 7:  # the last active day varies over a week
                h.event(cid, ev("login" if i % 2 else "purchase", T0 + d * DAY + HOUR, amount=5))
    scored: dict[str, list[tuple[int, str]]] = {cid: [] for cid in ids}
    end = 160
    for d in range(14, end + 1):
        h.sc.max_event_ms = T0 + d * DAY + 5 * MINUTE  # time passes (the watermark: d * DAY)
        h.flush()
        for cid in ids:
            st = h.store[cid]
            at = (st["scored_as_of"] - T0) // DAY
            quiet = st["scored_as_of"] - st["last_event_ms"]
            if not scored[cid] or scored[cid][-1][0] != at:
                scored[cid].append((at, st["emitted_stage"], quiet))
    for cid in ids:
        seen = scored[cid]
        assert seen[0][0] == 14 and seen[-1][1] == "churned", (cid, seen[:2], seen[-1])
        for (a, stage, quiet), (b, _, _) in zip(seen, seen[1:], strict=False):
            if stage == "churned" or quiet >= 28 * DAY:  # the next point of the weekly grid
                assert 1 <= b - a <= 7 and (DAY0 + b) % 7 == 0, (cid, a, stage, b)
            else:
                assert b - a == 1, (cid, a, stage, b)
        assert seen[-1][0] > end - 7, (cid, seen[-1])  # still on schedule at the end


def test_a_silent_customer_is_emitted_only_when_what_segments_read_moves() -> None:
    h = Harness()
    h.event("quiet", ev("purchase", T0 + HOUR, amount=50.0))
    refreshed = set()
    for d in range(1, 200):
        h.sc.max_event_ms = T0 + d * DAY + 5 * MINUTE
        h.flush()
        refreshed.add(h.store["quiet"]["scored_as_of"])
    scores = h.of("quiet")
    # refreshed every day (every week after four quiet weeks), emitted only on material
    # moves: the windows rolling past the purchase, the churn probability moving by 0.02
    assert len(refreshed) >= 50 and len(scores) < 0.6 * len(refreshed), (
        len(refreshed),
        len(scores),
    )
    for a, b in zip(scores, scores[1:], strict=False):
        moved = {k for k, v in b["features"].items() if v != a["features"].get(k)}
        aging = {k for k in moved if k.startswith(("days_since_", "bgnbd_"))} | {
            "tenure_days",
            "btyd_age_days",
            "btyd_gap_z",
        }
        assert (
            abs(b["churn_probability"] - a["churn_probability"]) >= 0.02
            or b["lifecycle_stage"] != a["lifecycle_stage"]
            or b["cluster"] != a["cluster"]
            or abs(b["engagement_score"] - a["engagement_score"]) >= 2.0
            or moved - aging
        ), (a["as_of"], b["as_of"])
