"""The dispatcher's pure core on a fake clock: sequences, conditions, policy, experiments."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from services.dispatcher import core, observing
from services.dispatcher.core import HOUR, Customer, Observation, Outcome, Result, SegmentChange
from services.dispatcher.experiments import assign, summarise
from services.dispatcher.playbooks import (
    DEFAULT_DIR,
    Book,
    Cap,
    Experiment,
    Playbook,
    Policy,
    Step,
    Variant,
    load_book,
)

DAY = 24 * HOUR
NOON = int(datetime(2026, 3, 2, 12, tzinfo=UTC).timestamp() * 1000)  # a Monday, 12:00 UTC
DEFAULTS = load_book([DEFAULT_DIR])
ATRISK = DEFAULTS.get("AtRisk-60d")
assert ATRISK is not None


def treated(playbook: Playbook, n: int = 1, prefix: str = "c") -> list[str]:
    """Customer ids that the playbook's experiment does not hold out."""
    out = [
        f"{prefix}{i}"
        for i in range(10 * n + 50)
        if assign(f"{prefix}{i}", playbook.name, playbook.experiment) != "holdout"
    ]
    return out[:n]


def entered(cid: str, segment: str = "AtRisk-60d", at: int = NOON, n: int = 1) -> SegmentChange:
    return SegmentChange(cid, segment, "entered", f"{cid}:{segment}:{n}", at)


class Sim:
    """The shell, minus I/O: decide, promote on ticks, and every call succeeds at once."""

    def __init__(self, book: Book) -> None:
        self.book = book
        self.c: Customer | None = None
        self.results: list[Result] = []
        self.calls: list[core.Action] = []
        self.call_times: list[int] = []

    def change(self, ch: SegmentChange, now: int) -> None:
        self.c, effects = core.decide(self.c, ch, now, self.book)
        self._collect(effects)
        self._deliver(now)

    def event(self, ev: Observation, now: int) -> None:
        c, effects = observing.observe(self.c, ev, now, self.book)
        self.c = c
        self._collect(effects)

    def tick(self, now: int) -> None:
        assert self.c is not None
        self.c, effects = core.promote(self.c, now, self.book)
        self._collect(effects)
        self._deliver(now)

    def _deliver(self, now: int) -> None:
        assert self.c is not None
        for a in core.in_flight(self.c):
            self.calls.append(a)
            self.call_times.append(now)
            self.c, effects = core.record_outcome(
                self.c, a.key, Outcome("sent", 200, "x"), now, self.book
            )
            self._collect(effects)

    def _collect(self, effects: list[core.Effect]) -> None:
        self.results += [e for e in effects if isinstance(e, Result)]

    def status(self, step: str) -> tuple[str, str | None]:
        assert self.c is not None
        for a in self.c.actions:
            if a.step == step:
                return a.status, a.reason
        raise KeyError(step)


def test_atrisk_three_step_intervention_runs_on_the_clock_when_nobody_engages() -> None:
    cid = treated(ATRISK)[0]
    sim = Sim(DEFAULTS)
    sim.change(entered(cid), NOON)
    assert [a.step for a in sim.calls] == ["reengagement_email"]
    sim.tick(NOON + 47 * HOUR)
    assert sim.status("owner_task") == ("scheduled", None)
    sim.tick(NOON + 48 * HOUR)
    assert [a.channel for a in sim.calls] == ["email", "crm_task"]
    sim.tick(NOON + 96 * HOUR)
    assert [a.channel for a in sim.calls] == ["email", "crm_task", "support_escalation"]
    assert len({a.key for a in sim.calls}) == 3


def test_engagement_after_the_email_skips_the_owner_task_and_the_escalation() -> None:
    cid = treated(ATRISK)[0]
    sim = Sim(DEFAULTS)
    sim.change(entered(cid), NOON)
    sim.event(Observation(cid, "email_open", NOON + 5 * HOUR, ATRISK.campaign_id), NOON + 5 * HOUR)
    sim.tick(NOON + 48 * HOUR)
    sim.tick(NOON + 96 * HOUR)
    assert [a.step for a in sim.calls] == ["reengagement_email"]
    assert sim.status("owner_task") == ("suppressed", "engaged")
    assert sim.status("support_escalation") == ("suppressed", "engaged")


def test_engagement_before_the_email_does_not_count_as_engagement_since_it() -> None:
    cid = treated(ATRISK)[0]
    sim = Sim(DEFAULTS)
    sim.event(
        Observation(cid, "identify", NOON - HOUR, properties=(("timezone", "UTC"),)), NOON - HOUR
    )
    sim.change(entered(cid), NOON)
    sim.event(Observation(cid, "login", NOON - 1), NOON)  # late event from before the send
    sim.tick(NOON + 48 * HOUR)
    assert sim.status("owner_task") == ("sent", None)


def test_a_redelivered_change_decides_nothing_new() -> None:
    cid = treated(ATRISK)[0]
    c, first = core.decide(None, entered(cid), NOON, DEFAULTS)
    again, effects = core.decide(c, entered(cid), NOON + 5, DEFAULTS)
    assert effects == [] and again.actions == c.actions
    # a new stay in the segment is a new entry: a new sequence with new keys
    new, _ = core.decide(c, entered(cid, n=2), NOON + 5, DEFAULTS)
    assert len({a.key for a in new.actions}) == 6


def test_exit_cancels_the_pending_steps_of_that_entry() -> None:
    cid = treated(ATRISK)[0]
    sim = Sim(DEFAULTS)
    sim.change(entered(cid), NOON)
    sim.change(
        SegmentChange(cid, "AtRisk-60d", "re_engaged", f"{cid}:AtRisk-60d:1", NOON + HOUR),
        NOON + HOUR,
    )
    sim.tick(NOON + 100 * HOUR)
    assert [a.step for a in sim.calls] == ["reengagement_email"]
    assert sim.status("owner_task") == ("suppressed", "segment_re_engaged")


def test_the_idempotency_key_is_per_customer_playbook_step_and_entry() -> None:
    k = core.idempotency_key
    keys = {
        k("c1", "P", "s", "e1", NOON),
        k("c2", "P", "s", "e1", NOON),
        k("c1", "Q", "s", "e1", NOON),
        k("c1", "P", "t", "e1", NOON),
        k("c1", "P", "s", "e2", NOON),
        k("c1", "P", "s", "e1", NOON + 1),  # a later stay that reuses the entry id
    }
    assert len(keys) == 6
    assert k("c1", "P", "s", "e1", NOON) == k("c1", "P", "s", "e1", NOON)


def test_an_id_absorbed_by_a_merge_is_never_contacted_again_even_when_it_reenters() -> None:
    # Seen in the demo: the segmenter dropped an absorbed id's state, a late score revived
    # the id and it re-entered with the same entry id; 30 days later (ledger pruned) the
    # dispatcher sent the step again under the very same idempotency key.
    cid = treated(ATRISK)[0]
    sim = Sim(DEFAULTS)
    sim.change(entered(cid), NOON)
    assert len(sim.calls) == 1
    later = NOON + 40 * DAY
    sim.change(
        SegmentChange(cid, "AtRisk-60d", "exited", f"{cid}:AtRisk-60d:1", later, "merged"), later
    )
    assert sim.c is not None
    sim.c = core.prune(sim.c, later, DEFAULTS)
    sim.change(entered(cid, at=later + HOUR), later + HOUR)  # revived id, same entry id
    sim.tick(later + 200 * HOUR)
    assert len(sim.calls) == 1, "a merged-away customer id was contacted again"
    revived = [r for r in sim.results if r.at >= later + HOUR]
    assert revived and {r.reason for r in revived} == {"merged"}


def test_a_stay_reusing_an_entry_id_after_pruning_gets_new_keys() -> None:
    cid = treated(ATRISK)[0]
    sim = Sim(DEFAULTS)
    sim.change(entered(cid), NOON)
    sim.tick(NOON + 100 * HOUR)  # the whole first sequence
    assert sim.c is not None
    later = NOON + 60 * DAY
    sim.c = core.prune(sim.c, later, DEFAULTS)
    assert sim.c.actions == ()
    sim.change(entered(cid, at=later), later)
    mails = [a for a in sim.calls if a.step == "reengagement_email"]
    assert len(mails) == 2
    assert len({a.key for a in mails}) == 2, "the second stay collided with the first key"


# -- experiments --------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=30, unique=True))
def test_holdout_customers_are_never_contacted(cids: list[str]) -> None:
    pb = Playbook(
        "P",
        "S",
        (Step("m", "email", 0, template="t"), Step("t", "crm_task", DAY)),
        experiment=Experiment(0.5, (Variant("A"), Variant("B"))),
    )
    book = Book((pb,))
    for cid in cids:
        sim = Sim(book)
        sim.change(SegmentChange(cid, "S", "entered", f"{cid}:1", NOON), NOON)
        sim.tick(NOON + 2 * DAY)
        if assign(cid, "P", pb.experiment) == "holdout":
            assert sim.calls == []
            assert {r.status for r in sim.results} == {"holdout"}
            assert sim.c is not None and {a.status for a in sim.c.actions} == {"holdout"}
        else:
            assert len(sim.calls) == 2


def test_assignment_is_stable_and_frozen_at_decision_time() -> None:
    pb = Playbook(
        "P",
        "S",
        (Step("m", "email", 0, template="t"), Step("t", "crm_task", DAY)),
        experiment=Experiment(0.0, (Variant("A"), Variant("B"))),
    )
    cids = [f"c{i}" for i in range(400)]
    first = {cid: assign(cid, "P", pb.experiment) for cid in cids}
    assert first == {cid: assign(cid, "P", pb.experiment) for cid in cids}
    assert 150 < sum(v == "A" for v in first.values()) < 250
    # decided with A/B; then the experiment changes to B only: the pending step keeps its variant
    decided = {
        cid: core.decide(None, SegmentChange(cid, "S", "entered", "e", NOON), NOON, Book((pb,)))[0]
        for cid in cids[:50]
    }
    changed = Book((replace(pb, experiment=Experiment(0.0, (Variant("B"),))),))
    for cid, c in decided.items():
        c, _ = core.promote(c, NOON + DAY, changed)
        assert {a.variant for a in c.actions} == {first[cid]}
        req = core.request_for(c, c.actions[1], changed)
        assert req is not None and req.variant == first[cid]


def test_variant_overrides_and_template_variables_are_rendered() -> None:
    cid = next(c for c in treated(ATRISK, 40) if assign(c, ATRISK.name, ATRISK.experiment) == "B")
    sim = Sim(DEFAULTS)
    sim.event(Observation(cid, "identify", NOON - 1, properties=(("first_name", "Ada"),)), NOON)
    sim.event(Observation(cid, "cart_view", NOON - 1, product_id="p-42"), NOON)
    c, _ = core.decide(sim.c, entered(cid), NOON, DEFAULTS)
    req = core.request_for(c, c.actions[0], DEFAULTS)
    assert req is not None
    assert req.subject == "Still interested in p-42?"  # variant B's subject
    assert req.variables["cta"] == "Come back to p-42"
    assert req.variables["first_name"] == "Ada"
    other = core.decide(None, entered("zz-unknown"), NOON, DEFAULTS)[0]
    req2 = core.request_for(other, other.actions[0], DEFAULTS)
    assert req2 is not None and "our latest features" in req2.variables["cta"]  # defaults


def test_kpis_attribute_outcomes_within_the_window_and_compute_uplift() -> None:
    pb = Playbook(
        "P",
        "S",
        (Step("m", "email", 0, template="t"),),
        campaign_id="camp",
        experiment=Experiment(0.5, (Variant("A"),)),
    )
    book = Book((pb,), Policy(attribution_ms=7 * DAY))
    counts: dict[tuple[str, str, str], dict[str, int]] = {}
    for i in range(200):
        cid = f"k{i}"
        c, eff = core.decide(None, SegmentChange(cid, "S", "entered", "e", NOON), NOON, book)
        for a in core.in_flight(c):
            c, more = core.record_outcome(c, a.key, Outcome("sent", 202, "email"), NOON, book)
            eff += more
        group = assign(cid, "P", pb.experiment)
        # treated customers open and buy more often; a late purchase is outside the window
        if group == "A" and i % 2 == 0:
            obs, e2 = observing.observe(
                c, Observation(cid, "email_click", NOON + HOUR, "camp", "A"), NOON + HOUR, book
            )
            assert obs is not None
            c, eff = obs, eff + e2
        if i % (3 if group == "A" else 10) == 0:
            obs, e2 = observing.observe(
                c, Observation(cid, "purchase", NOON + DAY), NOON + DAY, book
            )
            assert obs is not None
            c, eff = obs, eff + e2
        obs, e2 = observing.observe(
            c, Observation(cid, "purchase", NOON + 9 * DAY), NOON + 9 * DAY, book
        )
        eff += e2
        changed = core.apply_kpis(counts, [e for e in eff if isinstance(e, core.KpiDelta)])
        counts.update(changed)
    a, h = counts[("S", "P", "A")], counts[("S", "P", "holdout")]
    assert a["assigned"] + h["assigned"] == 200
    assert a["sent"] == a["assigned"] and "sent" not in h
    assert a["opened"] == a["clicked"] > 0  # a click implies an open, counted once
    n_a = sum(1 for i in range(200) if assign(f"k{i}", "P", pb.experiment) == "A" and i % 3 == 0)
    assert a["converted"] == n_a  # the day-9 purchases are outside the window
    rows = [("S", "P", v, counts[("S", "P", v)]) for v in ("A", "holdout")]
    summary = {s.variant: s for s in summarise(rows)}
    up = summary["A"]
    assert up.uplift is not None and up.uplift_low is not None and up.uplift_high is not None
    assert up.uplift_low < up.uplift < up.uplift_high
    assert abs(up.uplift - (a["converted"] / a["assigned"] - h["converted"] / h["assigned"])) < 1e-9


# -- policy -------------------------------------------------------------------------------
def test_quiet_hours_delay_delivery_in_the_customers_time_zone() -> None:
    book = Book(
        (Playbook("P", "S", (Step("m", "email", 0, template="t"), Step("t", "crm_task", 0))),),
        Policy(quiet_start_min=21 * 60, quiet_end_min=8 * 60),
    )
    sim = Sim(book)
    sim.event(Observation("c", "identify", NOON, properties=(("timezone", "Asia/Tokyo"),)), NOON)
    sim.change(SegmentChange("c", "S", "entered", "e", NOON), NOON)  # 21:00 in Tokyo
    assert [a.channel for a in sim.calls] == ["crm_task"]  # not a quiet channel
    status, reason = sim.status("m")
    assert (status, reason) == ("scheduled", "quiet_hours")
    assert sim.c is not None
    wake = next(a.due_at for a in sim.c.actions if a.step == "m")
    assert wake == NOON + 11 * HOUR  # 08:00 in Tokyo = 23:00 UTC
    sim.tick(wake - 1)
    assert len(sim.calls) == 1
    sim.tick(wake)
    assert [a.channel for a in sim.calls] == ["crm_task", "email"]
    assert [r.reason for r in sim.results if r.status == "scheduled"] == ["quiet_hours"]


def test_unknown_time_zone_falls_back_to_the_default() -> None:
    book = Book(
        (Playbook("P", "S", (Step("m", "email", 0, template="t"),)),),
        Policy(quiet_start_min=11 * 60, quiet_end_min=13 * 60, default_timezone="UTC"),
    )
    sim = Sim(book)
    sim.event(Observation("c", "identify", NOON, properties=(("timezone", "Mars/Olympus"),)), NOON)
    sim.change(SegmentChange("c", "S", "entered", "e", NOON), NOON)
    assert sim.status("m") == ("scheduled", "quiet_hours")


CAPS = Policy(
    caps=(("email", (Cap(2, 3 * DAY),)), ("crm_task", (Cap(1, DAY),))),
    cooldowns=(("email", 12 * HOUR),),
)
CAP_BOOK = Book(
    tuple(
        Playbook(
            f"P{i}",
            f"S{i % 3}",
            (
                Step("m", "email", 0, template="t"),
                Step("n", "email", (i + 1) * 5 * HOUR, template="t"),
                Step("t", "crm_task", i * HOUR),
            ),
            priority=i % 2,
        )
        for i in range(4)
    ),
    CAPS,
)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2),
            st.integers(0, 6 * DAY // HOUR),
            st.sampled_from(["entered", "exited"]),
        ),
        max_size=25,
    ),
    st.lists(st.integers(0, 8 * DAY // HOUR), max_size=40),
)
def test_caps_and_cooldowns_are_never_exceeded_across_playbooks(
    changes: list[tuple[int, int, str]], ticks: list[int]
) -> None:
    sim = Sim(CAP_BOOK)
    timeline = sorted(
        [(h * HOUR, "change", (seg, tr)) for seg, h, tr in changes]
        + [(h * HOUR + 7, "tick", None) for h in ticks],
        key=lambda x: x[0],
    )
    entries: dict[int, int] = {}
    for t, kind, arg in timeline:
        if kind == "change":
            assert arg is not None
            seg, tr = arg
            if tr == "entered":
                entries[seg] = entries.get(seg, 0) + 1
            n = entries.get(seg, 0)
            sim.change(SegmentChange("c", f"S{seg}", tr, f"c:S{seg}:{n}", NOON + t), NOON + t)
        elif sim.c is not None:
            sim.tick(NOON + t)
    sends: dict[str, list[int]] = {}
    for a, at in zip(sim.calls, sim.call_times, strict=True):
        sends.setdefault(a.channel, []).append(at)
    for channel, times in sends.items():
        times.sort()
        for cap in CAPS.caps_for(channel):
            for i, t in enumerate(times):
                assert sum(1 for u in times[: i + 1] if u > t - cap.per_ms) <= cap.max
        gap = CAPS.cooldown_for(channel)
        assert all(b - a >= gap for a, b in zip(times, times[1:], strict=False))


def test_capped_step_is_suppressed_with_its_reason_and_other_channels_still_go() -> None:
    book = Book(
        (
            Playbook("P", "S", (Step("m", "email", 0, template="t"),)),
            Playbook("Q", "T", (Step("m", "email", 0, template="t"), Step("t", "crm_task", 0))),
        ),
        Policy(cooldowns=(("email", DAY),)),
    )
    sim = Sim(book)
    sim.change(SegmentChange("c", "S", "entered", "e1", NOON), NOON)
    sim.change(SegmentChange("c", "T", "entered", "e2", NOON + HOUR), NOON + HOUR)
    assert [(a.playbook, a.channel) for a in sim.calls] == [("P", "email"), ("Q", "crm_task")]
    assert ("suppressed", "cooldown") in [(r.status, r.reason) for r in sim.results]


def test_suppressions_unsubscribe_bounce_do_not_contact_and_forget() -> None:
    steps = (
        Step("m", "email", 0, template="t"),
        Step("t", "crm_task", 0),
        Step("p", "crm_property", 0, properties=(("x", "1"),)),
    )
    book = Book((Playbook("P", "S", steps),))

    def run(ev: Observation) -> Sim:
        sim = Sim(book)
        sim.event(ev, NOON - 1)
        sim.change(SegmentChange("c", "S", "entered", "e", NOON), NOON)
        return sim

    unsub = run(Observation("c", "email_unsubscribe", NOON - 1))
    assert [a.channel for a in unsub.calls] == ["crm_task", "crm_property"]
    assert unsub.status("m") == ("suppressed", "unsubscribed")
    bounced = run(Observation("c", "email_bounce", NOON - 1))
    assert bounced.status("m") == ("suppressed", "bounced")
    dnc = run(Observation("c", "identify", NOON - 1, properties=(("do_not_contact", "true"),)))
    assert [a.channel for a in dnc.calls] == ["crm_property"]
    forgotten = run(Observation("c", "gdpr_forget", NOON - 1))
    assert forgotten.calls == [] and forgotten.c is not None and forgotten.c.actions == ()
    assert {r.reason for r in forgotten.results} == {"forgotten"}


def test_forget_cancels_pending_steps_and_erases_profile_attributes() -> None:
    cid = treated(ATRISK)[0]
    sim = Sim(DEFAULTS)
    sim.event(
        Observation(
            cid, "identify", NOON - 1, properties=(("first_name", "Ada"), ("timezone", "UTC"))
        ),
        NOON,
    )
    sim.change(entered(cid), NOON)
    sim.event(Observation(cid, "gdpr_forget", NOON + HOUR), NOON + HOUR)
    sim.tick(NOON + 200 * HOUR)
    assert len(sim.calls) == 1
    assert sim.c is not None and sim.c.attrs == () and sim.c.timezone is None
    assert all(a.features == () for a in sim.c.actions)
    assert sim.status("owner_task") == ("suppressed", "forgotten")


def test_higher_priority_playbook_preempts_and_lower_priority_yields() -> None:
    low = Playbook(
        "Low",
        "A",
        (Step("m", "email", 0, template="t"), Step("later", "crm_task", DAY)),
        priority=1,
    )
    high = Playbook("High", "B", (Step("e", "support_escalation", HOUR),), priority=9)
    sync = Playbook(
        "Sync", "C", (Step("p", "crm_property", HOUR, properties=(("x", "1"),)),), priority=0
    )
    book = Book((low, high, sync))
    sim = Sim(book)
    sim.change(SegmentChange("c", "A", "entered", "a1", NOON), NOON)
    sim.change(SegmentChange("c", "B", "entered", "b1", NOON + 1), NOON + 1)
    assert sim.status("later") == ("suppressed", "preempted")
    sim.change(SegmentChange("c", "A", "entered", "a2", NOON + 2), NOON + 2)
    assert sim.c is not None
    assert {a.reason for a in sim.c.actions if a.entry_id == "a2"} == {"lower_priority"}
    sim.change(SegmentChange("c", "C", "entered", "c1", NOON + 3), NOON + 3)  # syncs never yield
    sim.tick(NOON + 2 * DAY)
    assert [a.playbook for a in sim.calls] == ["Low", "High", "Sync"]


def test_retry_keeps_the_action_in_flight_and_a_permanent_failure_releases_its_cap_slot() -> None:
    book = Book(
        (
            Playbook("P", "S", (Step("m", "email", 0, template="t"),)),
            Playbook("Q", "T", (Step("m", "email", 0, template="t"),)),
        ),
        Policy(caps=(("email", (Cap(1, DAY),)),)),
    )
    c, _ = core.decide(None, SegmentChange("c", "S", "entered", "e", NOON), NOON, book)
    key = c.actions[0].key
    c, eff = core.record_outcome(
        c, key, Outcome("retry", 503, "email", "http 503", retry_at=99), NOON, book
    )
    a = c.action(key)
    assert eff == [] and a is not None and (a.status, a.attempt, a.retry_at) == ("in_flight", 1, 99)
    c, eff = core.record_outcome(
        c, key, Outcome("failed", 400, "email", "http 400"), NOON + 1, book
    )
    assert [type(e).__name__ for e in eff] == ["Result", "DeadLetterAction"]
    assert c.sends == ()
    c, _ = core.decide(c, SegmentChange("c", "T", "entered", "e2", NOON + 2), NOON + 2, book)
    assert [a.status for a in c.actions] == ["failed", "in_flight"]  # the slot was free again
    same, eff = core.record_outcome(c, key, Outcome("sent", 200, "email"), NOON + 3, book)
    assert eff == [] and same is c  # a late answer for a settled action changes nothing


def test_ledger_entries_are_pruned_after_retention_but_pending_ones_never() -> None:
    book = Book(
        (Playbook("P", "S", (Step("m", "crm_task", 0), Step("x", "crm_task", 60 * DAY))),),
        Policy(ledger_retention_ms=30 * DAY),
    )
    sim = Sim(book)
    sim.change(SegmentChange("c", "S", "entered", "e", NOON), NOON)
    sim.event(
        Observation("c", "identify", NOON + 31 * DAY, properties=(("first_name", "B"),)),
        NOON + 31 * DAY,
    )
    assert sim.c is not None
    sim.c = core.prune(sim.c, NOON + 31 * DAY, book)
    assert [a.step for a in sim.c.actions] == ["x"]


def test_state_records_round_trip_through_the_changelog_schema() -> None:
    from segflow.runtime.serde import SchemaStore, Serde
    from segflow.runtime.topics import TOPICS

    serde = Serde(SchemaStore.from_dir())
    cid = treated(ATRISK)[0]
    sim = Sim(DEFAULTS)
    sim.event(Observation(cid, "identify", NOON, properties=(("first_name", "Ada"),)), NOON)
    sim.change(
        SegmentChange(cid, "AtRisk-60d", "entered", "e", NOON, features=(("opens_drop", "-0.7"),)),
        NOON,
    )
    assert sim.c is not None
    rec = core.customer_record(sim.c)
    back = serde.decode(TOPICS.dispatcher_state, serde.encode(TOPICS.dispatcher_state, rec))
    assert core.customer_from_record(back) == sim.c
    for r in sim.results:
        res = core.result_record(r)
        assert (
            serde.decode(TOPICS.dispatch_results, serde.encode(TOPICS.dispatch_results, res)) == res
        )


def test_default_playbooks_cover_every_default_segment() -> None:
    from segflow.sim.truth import SEGMENTS

    assert set(SEGMENTS) <= {p.segment for p in DEFAULTS.playbooks}
    stages = ["prospect", "onboarded", "adopting", "loyal", "at_risk", "churned"]
    assert {f"Lifecycle: {s}" for s in stages} <= {p.segment for p in DEFAULTS.playbooks}
    steps = [(s.id, s.channel, s.after_ms, s.no_engagement_since) for s in ATRISK.steps]
    assert steps == [
        ("reengagement_email", "email", 0, None),
        ("owner_task", "crm_task", 48 * HOUR, "reengagement_email"),
        ("support_escalation", "support_escalation", 96 * HOUR, "reengagement_email"),
    ]
    assert Path(ATRISK.source).parent == DEFAULT_DIR


def test_a_template_that_cannot_render_fails_the_action_instead_of_sending_a_gap() -> None:
    # Built in code, so the load-time check does not run: the request says why, sends nothing.
    pb = Playbook("P", "S", (Step("m", "email", 0, template="t", subject="Hi {{nickname}}"),))
    book = Book((pb,))
    c, _ = core.decide(None, SegmentChange("c1", "S", "entered", "e", NOON), NOON, book)
    assert c is not None
    req = core.request_for(c, c.actions[0], book)
    assert req is not None
    assert req.subject is None and req.problem == "template: 'nickname' is undefined"
