"""The dispatcher's decisions, pure: what to send, when, to whom, and whether it may go.

Per customer, a state (:class:`Customer`) holds the send ledger (one :class:`Action` per
customer × playbook × step × segment entry), the send history that caps and cooldowns
count, suppressions, the time zone, and the experiment assignments that KPIs attribute
outcomes to. Four steps move it, each ``(state, input, now) -> (state, effects)``:

* :func:`decide` — a segment change starts a playbook (variant or holdout frozen here),
  cancels one, or is a duplicate (the ledger already holds its steps);
* :func:`observe` — an outcome event: suppression, engagement, attribution to KPIs;
* :func:`promote` — due steps pass the policy (suppression, conditions, priority, caps,
  quiet hours) and become ``in_flight`` (the shell calls the API only for those);
* :func:`record_outcome` — the API's answer: ``sent``, retry later (same idempotency key) or
  ``failed`` (results topic and DLQ).

Effects are frozen dataclasses the shell turns into records. ``now`` is the pipeline clock
in epoch ms (wall clock live, event time when replaying); retry times are wall-clock ms
computed by the shell.

>>> from services.dispatcher.playbooks import Book, Playbook, Step
>>> steps = (Step("mail", "email", 0, template="t"),
...          Step("task", "crm_task", 48 * HOUR, no_engagement_since="mail"))
>>> book = Book((Playbook("P", "S", steps),))
>>> change = SegmentChange("c1", "S", "entered", "c1:S:1", 0)
>>> cust, effects = decide(None, change, 0, book)
>>> [(a.step, a.status) for a in cust.actions]
[('mail', 'in_flight'), ('task', 'scheduled')]
>>> sent = Outcome("sent", 202, "email")
>>> cust, effects = record_outcome(cust, cust.actions[0].key, sent, 1, book)
>>> cust.actions[0].status, [e.status for e in effects if isinstance(e, Result)]
('sent', ['sent'])
>>> cust, effects = decide(cust, change, 5, book)   # the same change again: nothing new
>>> effects
[]
>>> cust, _ = observe(cust, Observation("c1", "email_open", HOUR, campaign_id="P"), HOUR, book)
>>> cust, effects = promote(cust, 48 * HOUR, book)  # engaged since the email: task skipped
>>> [(e.action.step, e.status, e.reason) for e in effects if isinstance(e, Result)]
[('task', 'suppressed', 'engaged')]
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from services.dispatcher.experiments import assign
from services.dispatcher.playbooks import (
    CUSTOMER_FACING,
    EMAIL_CHANNELS,
    HOLDOUT,
    SYNC_CHANNELS,
    Book,
    Playbook,
    RenderError,
    Step,
    render,
)
from services.dispatcher.policy import blocked, quiet_until

HOUR = 3_600_000
DAY = 24 * HOUR
TERMINAL = frozenset({"sent", "suppressed", "failed", "holdout"})
TRUE = frozenset({"true", "1", "yes", "y"})
FORGET_EVENTS = frozenset({"forget", "gdpr_forget", "customer_forgotten"})
# What an event about a customer the dispatcher does not know yet can still change (see
# ``observe``): these event types, and these keys in its properties. Anything else about an
# unknown customer is ignored, which lets the shell skip such events without decoding them.
UNKNOWN_CUSTOMER_TYPES = frozenset({"email_unsubscribe", "email_bounce"}) | FORGET_EVENTS
PROFILE_PROPERTIES = ("do_not_contact", "timezone", "first_name")
# The customer id was absorbed by an identity merge: it is never contacted again (its
# survivor is). Set from the segmenter's ``exited``/``merged`` change.
MERGED = "merged"


_T = TypeVar("_T")


def replace(obj: _T, /, **changes: Any) -> _T:
    """``dataclasses.replace`` for this module's frozen records, about ten times cheaper: a
    shallow copy with the changed fields set, without re-running the generated ``__init__``
    (these records have no ``__post_init__``; the field names are still checked).

    >>> a = Assignment("P", "S", "e", "A", "P", 1)
    >>> b = replace(a, variant="B")
    >>> (a.variant, b.variant, b == Assignment("P", "S", "e", "B", "P", 1))
    ('A', 'B', True)
    """
    fields = obj.__dataclass_fields__  # type: ignore[attr-defined]
    for name in changes:
        if name not in fields:
            raise TypeError(f"{type(obj).__name__} has no field {name!r}")
    new = object.__new__(type(obj))
    state = new.__dict__  # frozen: attribute assignment raises, the instance dict does not
    state.update(obj.__dict__)
    state.update(changes)
    return new


# -- inputs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentChange:
    """The part of a SegmentChange the dispatcher uses."""

    customer_id: str
    segment: str
    transition: str
    entry_id: str
    occurred_at: int
    reason: str | None = None
    features: tuple[tuple[str, str], ...] = ()  # observed values from the explanation

    @staticmethod
    def from_record(r: Mapping[str, Any]) -> SegmentChange:
        """From a decoded ``io.segflow.SegmentChange``."""
        feats = tuple(
            (str(e["feature"]), _fmt(e.get("observed")))
            for e in r.get("explanation") or ()
            if e.get("observed") is not None
        )
        return SegmentChange(
            r["customer_id"],
            r["segment"],
            r["transition"],
            r["entry_id"],
            int(r["occurred_at"]),
            r.get("reason"),
            feats,
        )


@dataclass(frozen=True)
class Observation:
    """The part of an IdentifiedEvent the dispatcher uses (outcomes, suppression, profile)."""

    customer_id: str
    event_type: str
    occurred_at: int
    campaign_id: str | None = None
    variant: str | None = None
    product_id: str | None = None
    properties: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def from_record(r: Mapping[str, Any]) -> Observation:
        """From a decoded ``io.segflow.IdentifiedEvent``."""
        ev = r["event"]
        return Observation(
            r["customer_id"],
            ev["event_type"],
            int(ev["occurred_at"]),
            ev.get("campaign_id"),
            ev.get("variant"),
            ev.get("product_id"),
            tuple(sorted((ev.get("properties") or {}).items())),
        )


@dataclass(frozen=True)
class Outcome:
    """One delivery attempt's result: ``sent``, ``retry`` (at wall ms ``retry_at``), ``failed``."""

    kind: str
    http_status: int | None = None
    endpoint: str | None = None
    detail: str | None = None
    retry_at: int = 0
    dispatched_at: int | None = None


# -- state -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    """One ledger entry: a step of a playbook for one segment entry of one customer."""

    key: str
    customer_id: str
    playbook: str
    step: str
    segment: str
    entry_id: str
    channel: str
    variant: str
    priority: int
    campaign_id: str
    decided_at: int
    due_at: int
    status: str = "scheduled"  # scheduled, in_flight, sent, suppressed, failed, holdout
    reason: str | None = None
    attempt: int = 0
    retry_at: int = 0
    settled_at: int | None = None
    dispatched_at: int | None = None
    http_status: int | None = None
    endpoint: str | None = None
    features: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Assignment:
    """A frozen experiment assignment, and which KPIs it has already counted."""

    playbook: str
    segment: str
    entry_id: str
    variant: str
    campaign_id: str
    decided_at: int
    counted: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Customer:
    customer_id: str
    suppressions: frozenset[str] = frozenset()
    timezone: str | None = None
    attrs: tuple[tuple[str, str], ...] = ()
    last_engagement_at: int | None = None
    sends: tuple[tuple[str, int, str], ...] = ()  # (channel, at, idempotency key)
    actions: tuple[Action, ...] = ()
    assignments: tuple[Assignment, ...] = ()

    def action(self, key: str) -> Action | None:
        for a in self.actions:
            if a.key == key:
                return a
        return None


# -- effects -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    """A decision to publish on the results topic."""

    action: Action
    status: str
    reason: str | None
    at: int


@dataclass(frozen=True)
class KpiDelta:
    segment: str
    playbook: str
    variant: str
    kpi: str


@dataclass(frozen=True)
class DeadLetterAction:
    """A permanently failed action, for the DLQ."""

    action: Action
    reason: str


Effect = Result | KpiDelta | DeadLetterAction


@dataclass(frozen=True)
class Request:
    """Everything an adapter needs to perform one action (rendered, variant applied)."""

    key: str
    customer_id: str
    channel: str
    playbook: str
    step: str
    segment: str
    variant: str
    campaign_id: str
    template: str | None
    subject: str | None
    body: str | None
    variables: Mapping[str, str] = field(default_factory=dict)
    list_id: str | None = None
    properties: Mapping[str, str] = field(default_factory=dict)
    task_priority: str = "HIGH"
    #: Why the request could not be rendered (the action fails and nothing is sent).
    problem: str | None = None


# -- helpers -----------------------------------------------------------------------------------
def idempotency_key(
    customer_id: str, playbook: str, step: str, entry_id: str, entered_at: int
) -> str:
    """The key of one action, stable across restarts and replays.

    ``entered_at`` (the entry's event time) is part of the key: a redelivered change gives
    the same key, but a stay that reuses an ``entry_id`` (the segmenter lost a customer's
    counter, e.g. an id revived after a merge) gets new keys instead of colliding with a
    send the API has already de-duplicated.

    >>> idempotency_key("c1", "P", "mail", "c1:S:1", 1_700_000_000_000)
    'sf-f9a0288dfaec32b898aa9e3a69187346'
    """
    raw = "\x1f".join((customer_id, playbook, step, entry_id, str(entered_at)))
    return "sf-" + hashlib.sha256(raw.encode()).hexdigest()[:32]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _suppression(suppressions: frozenset[str], channel: str) -> str | None:
    if "forgotten" in suppressions:
        return "forgotten"
    if MERGED in suppressions:
        return MERGED
    if channel in EMAIL_CHANNELS:
        for s in ("unsubscribed", "bounced"):
            if s in suppressions:
                return s
    if "do_not_contact" in suppressions and channel in CUSTOMER_FACING | {
        "crm_task",
        "support_escalation",
    }:
        return "do_not_contact"
    return None


def _replace_action(c: Customer, new: Action) -> Customer:
    return replace(c, actions=tuple(new if a.key == new.key else a for a in c.actions))


def _sibling(c: Customer, a: Action, step: str) -> Action | None:
    """Another step of the same playbook run (decided together, for the same entry)."""
    for b in c.actions:
        if (b.playbook, b.entry_id, b.decided_at, b.step) == (
            a.playbook,
            a.entry_id,
            a.decided_at,
            step,
        ):
            return b
    return None


def _flag(c: Customer, idx: int, kpi: str, out: list[Effect]) -> Customer:
    a = c.assignments[idx]
    if kpi in a.counted:
        return c
    new = replace(a, counted=a.counted | {kpi})
    out.append(KpiDelta(a.segment, a.playbook, a.variant, kpi))
    return replace(c, assignments=c.assignments[:idx] + (new,) + c.assignments[idx + 1 :])


def prune(c: Customer, now: int, book: Book) -> Customer:
    """Drop what no decision can need any more: old terminal ledger entries (kept for
    ``ledger_retention``), assignments past the attribution window, old sends."""
    p = book.policy
    actions = tuple(
        a
        for a in c.actions
        if a.status not in TERMINAL or (a.settled_at or a.decided_at) > now - p.ledger_retention_ms
    )
    assignments = tuple(a for a in c.assignments if a.decided_at > now - p.attribution_ms)
    sends = tuple(s for s in c.sends if s[1] > now - p.history_ms)
    if (len(actions), len(assignments), len(sends)) == (
        len(c.actions),
        len(c.assignments),
        len(c.sends),
    ):
        return c
    return replace(c, actions=actions, assignments=assignments, sends=sends)


# -- decide ------------------------------------------------------------------------------------
def decide(
    customer: Customer | None, change: SegmentChange, now: int, book: Book
) -> tuple[Customer, list[Effect]]:
    """Apply a segment change: start, cancel or ignore (duplicate) playbooks, then promote.

    A holdout customer gets ledger entries with status ``holdout`` and never a call.
    """
    c = customer or Customer(change.customer_id)
    out: list[Effect] = []
    if change.reason == "forgotten":
        c, out = forget(c, now)
        return c, out
    if change.reason == MERGED and MERGED not in c.suppressions:
        c = replace(c, suppressions=c.suppressions | {MERGED})
    for pb in book.for_segment(change.segment):
        if change.transition in pb.cancel_on:
            c = _cancel(c, pb, change, now, f"segment_{change.transition}", out)
        if change.transition in pb.triggers:
            c = _start(c, pb, change, now, book, out)
    c, more = promote(c, now, book)
    return prune(c, now, book), out + more


def _cancel(
    c: Customer, pb: Playbook, ch: SegmentChange, now: int, reason: str, out: list[Effect]
) -> Customer:
    for a in c.actions:
        if a.playbook == pb.name and a.entry_id == ch.entry_id and a.status == "scheduled":
            done = replace(a, status="suppressed", reason=reason, settled_at=now)
            c = _replace_action(c, done)
            out.append(Result(done, "suppressed", reason, now))
    return c


def _start(
    c: Customer, pb: Playbook, ch: SegmentChange, now: int, book: Book, out: list[Effect]
) -> Customer:
    step_keys = [
        idempotency_key(c.customer_id, pb.name, s.id, ch.entry_id, ch.occurred_at) for s in pb.steps
    ]
    keys = {a.key for a in c.actions}
    if any(k in keys for k in step_keys):
        return c  # already decided: the ledger makes a redelivered change a no-op
    variant = assign(c.customer_id, pb.name, pb.experiment)
    campaign = pb.campaign_id or pb.name
    actions = [
        Action(
            key=key,
            customer_id=c.customer_id,
            playbook=pb.name,
            step=s.id,
            segment=ch.segment,
            entry_id=ch.entry_id,
            channel=s.channel,
            variant=variant,
            priority=pb.priority,
            campaign_id=campaign,
            decided_at=now,
            due_at=ch.occurred_at + s.after_ms,
            features=ch.features,
        )
        for s, key in zip(pb.steps, step_keys, strict=True)
    ]
    # Priority between playbooks (contacts only; CRM data syncs never compete): a running
    # higher-priority sequence wins, a lower-priority one yields.
    running = [
        a
        for a in c.actions
        if a.status == "scheduled" and a.playbook != pb.name and a.channel not in SYNC_CHANNELS
    ]
    blocker = max((a.priority for a in running), default=None)
    reason: str | None = None
    if "forgotten" in c.suppressions:
        reason = "forgotten"
    elif MERGED in c.suppressions:
        reason = MERGED
    elif variant == HOLDOUT:
        reason = HOLDOUT
    lower = blocker is not None and blocker > pb.priority
    if reason is None and any(a.channel not in SYNC_CHANNELS for a in actions):
        for a in running:
            if a.priority < pb.priority:
                done = replace(a, status="suppressed", reason="preempted", settled_at=now)
                c = _replace_action(c, done)
                out.append(Result(done, "suppressed", "preempted", now))
    final: list[Action] = []
    for a in actions:
        why = reason
        if why is None and lower and a.channel not in SYNC_CHANNELS:
            why = "lower_priority"
        if why is not None:
            status = HOLDOUT if why == HOLDOUT else "suppressed"
            a = replace(a, status=status, reason=why, settled_at=now)
            out.append(Result(a, status, why, now))
        elif a.due_at > now:
            out.append(Result(a, "scheduled", None, now))
        final.append(a)
    if reason == "forgotten":
        return c  # nothing about a forgotten customer is kept
    c = replace(c, actions=c.actions + tuple(final))
    if reason == HOLDOUT or (reason is None and any(a.status == "scheduled" for a in final)):
        c = replace(
            c,
            assignments=c.assignments
            + (Assignment(pb.name, ch.segment, ch.entry_id, variant, campaign, now),),
        )
        c = _flag(c, len(c.assignments) - 1, "assigned", out)
    return c


def forget(c: Customer, now: int) -> tuple[Customer, list[Effect]]:
    """Erase what the dispatcher holds about a customer, cancel pending steps, suppress for good."""
    out: list[Effect] = []
    kept: list[Action] = []
    for a in c.actions:
        if a.status in ("scheduled", "in_flight"):
            a = replace(a, status="suppressed", reason="forgotten", settled_at=now, features=())
            out.append(Result(a, "suppressed", "forgotten", now))
        kept.append(replace(a, features=()))
    return Customer(c.customer_id, suppressions=frozenset({"forgotten"}), actions=tuple(kept)), out


# -- promote -----------------------------------------------------------------------------------
def promote(c: Customer, now: int, book: Book) -> tuple[Customer, list[Effect]]:
    """Pass every due step through the policy: suppress it, delay it (quiet hours) or make it
    ``in_flight`` (reserving its place under the caps). Higher priority goes first."""
    due = [a for a in c.actions if a.status == "scheduled" and a.due_at <= now]
    if not due:
        return c, []
    out: list[Effect] = []
    policy = book.policy
    order = {a.key: i for i, a in enumerate(c.actions)}
    for a in sorted(due, key=lambda a: (-a.priority, a.due_at, order[a.key])):
        pb = book.get(a.playbook)
        step: Step | None = None
        if pb is not None:
            try:
                step = pb.step(a.step)
            except KeyError:
                step = None
        reason = "playbook_removed" if step is None else _suppression(c.suppressions, a.channel)
        if reason is None and step is not None and step.no_engagement_since:
            ref = _sibling(c, a, step.no_engagement_since)
            since = ref.settled_at if ref is not None and ref.status == "sent" else a.decided_at
            if (
                c.last_engagement_at is not None
                and since is not None
                and c.last_engagement_at >= since
            ):
                reason = "engaged"
        if reason is None:
            reason = blocked(policy, [(ch, at) for ch, at, _ in c.sends], a.channel, now)
        if reason is not None:
            done = replace(a, status="suppressed", reason=reason, settled_at=now)
            c = _replace_action(c, done)
            out.append(Result(done, "suppressed", reason, now))
            continue
        wake = quiet_until(policy, a.channel, c.timezone, now)
        if wake is not None:
            later = replace(a, due_at=wake, reason="quiet_hours")
            c = _replace_action(c, later)
            out.append(Result(later, "scheduled", "quiet_hours", now))
            continue
        c = _replace_action(c, replace(a, status="in_flight", reason=None))
        c = replace(c, sends=c.sends + ((a.channel, now, a.key),))
    return c, out


def next_due(c: Customer) -> int | None:
    """When :func:`promote` has work next for this customer (pipeline ms), if ever."""
    return min((a.due_at for a in c.actions if a.status == "scheduled"), default=None)


def in_flight(c: Customer) -> list[Action]:
    """The actions the shell must (re)try, oldest decision first."""
    return [a for a in c.actions if a.status == "in_flight"]


# -- record_outcome --------------------------------------------------------------------------
def record_outcome(
    c: Customer, key: str, outcome: Outcome, now: int, book: Book
) -> tuple[Customer, list[Effect]]:
    """Record a delivery attempt's outcome for the in-flight action ``key``."""
    a = c.action(key)
    if a is None or a.status != "in_flight":
        return c, []  # settled already (or cancelled): nothing to do
    out: list[Effect] = []
    attempt = a.attempt + 1
    if outcome.kind == "sent":
        done = replace(
            a,
            status="sent",
            reason=None,
            attempt=attempt,
            settled_at=now,
            dispatched_at=outcome.dispatched_at,
            http_status=outcome.http_status,
            endpoint=outcome.endpoint,
        )
        c = _replace_action(c, done)
        out.append(Result(done, "sent", None, now))
        for i, asg in enumerate(c.assignments):
            if asg.playbook == a.playbook and asg.entry_id == a.entry_id:
                c = _flag(c, i, "sent", out)
        return c, out
    if outcome.kind == "retry":
        c = _replace_action(
            c,
            replace(
                a,
                attempt=attempt,
                retry_at=outcome.retry_at,
                http_status=outcome.http_status,
                endpoint=outcome.endpoint,
                reason=outcome.detail,
            ),
        )
        return c, out
    reason = outcome.detail or "failed"
    done = replace(
        a,
        status="failed",
        reason=reason,
        attempt=attempt,
        settled_at=now,
        dispatched_at=outcome.dispatched_at,
        http_status=outcome.http_status,
        endpoint=outcome.endpoint,
    )
    c = _replace_action(c, done)
    c = replace(c, sends=tuple(s for s in c.sends if s[2] != key))  # nothing reached them
    out += [Result(done, "failed", reason, now), DeadLetterAction(done, reason)]
    return c, out


# -- attributes (issue 19) -----------------------------------------------------------------------
def set_attributes(
    customer: Customer | None, customer_id: str, attributes: Mapping[str, str], book: Book
) -> Customer | None:
    """The customer's attributes changed (segflow.attributes): keep those the playbooks'
    templates read, for rendering (``{{product_tier}}``); None stays None when none is read.

    >>> from services.dispatcher.playbooks import Book, Playbook, Step
    >>> book = Book((Playbook("p", "S", (Step("m", "email", subject="For {{product_tier}}"),)),))
    >>> set_attributes(None, "c", {"product_tier": "enterprise", "zip": "1"}, book).attrs
    (('product_tier', 'enterprise'),)
    >>> set_attributes(None, "c", {"zip": "1"}, book) is None
    True
    """
    wanted = book.template_traits
    picked = {k: str(v) for k, v in attributes.items() if k in wanted}
    if customer is None and not picked:
        return None
    c = customer or Customer(customer_id)
    attrs = dict(c.attrs)
    attrs.update(picked)
    if attrs == dict(c.attrs):
        return c
    return replace(c, attrs=tuple(sorted(attrs.items())))


# -- observe -----------------------------------------------------------------------------------
_PROFILE = (("timezone", "timezone"), ("first_name", "first_name"))


def observe(
    customer: Customer | None, ev: Observation, now: int, book: Book
) -> tuple[Customer | None, list[Effect]]:
    """Apply an outcome or profile event. Returns the same object when nothing changed (the
    shell then writes nothing); None stays None for events that concern no known customer."""
    props = dict(ev.properties)
    out: list[Effect] = []
    et = ev.event_type
    relevant = et in UNKNOWN_CUSTOMER_TYPES or any(k in props for k in PROFILE_PROPERTIES)
    if customer is None and not relevant:
        return None, []
    c = customer or Customer(ev.customer_id)
    if et in FORGET_EVENTS:
        return forget(c, now)
    if "forgotten" in c.suppressions:
        return c, []
    sup = set(c.suppressions)
    if et == "email_unsubscribe":
        sup.add("unsubscribed")
    elif et == "email_bounce":
        sup.add("bounced")
    if "do_not_contact" in props:
        if props["do_not_contact"].lower() in TRUE:
            sup.add("do_not_contact")
        else:
            sup.discard("do_not_contact")
    if sup != c.suppressions:
        c = replace(c, suppressions=frozenset(sup))
    attrs = dict(c.attrs)
    if props.get("first_name"):
        attrs["first_name"] = props["first_name"]
    if (
        ev.product_id
        and et in ("purchase", "cart_view", "cart_abandon", "page_view")
        and customer is not None
    ):
        attrs["product_recommended"] = ev.product_id
    tz = props.get("timezone") or c.timezone
    if attrs != dict(c.attrs) or tz != c.timezone:
        c = replace(c, attrs=tuple(sorted(attrs.items())), timezone=tz)
    if (
        et in book.policy.engagement_events
        and any(a.status not in TERMINAL for a in c.actions)
        and (c.last_engagement_at is None or ev.occurred_at > c.last_engagement_at)
    ):
        c = replace(c, last_engagement_at=ev.occurred_at)
    c = _attribute(c, ev, book, out)
    if c == customer:
        return customer, []
    return c, out


def _attribute(c: Customer, ev: Observation, book: Book, out: list[Effect]) -> Customer:
    """Credit outcomes to assignments inside the attribution window (last touch)."""
    window = book.policy.attribution_ms
    kpi = {
        "email_open": "opened",
        "email_click": "clicked",
        "purchase": "converted",
        "email_unsubscribe": "unsubscribed",
        "subscription_cancel": "churned",
    }.get(ev.event_type)
    if kpi is None:
        return c
    candidates = [
        i
        for i, a in enumerate(c.assignments)
        if a.decided_at <= ev.occurred_at <= a.decided_at + window
        and (
            ev.campaign_id is None
            or ev.campaign_id == a.campaign_id
            or kpi in ("converted", "churned")
        )
        and (ev.variant is None or kpi in ("converted", "churned") or ev.variant == a.variant)
    ]
    if not candidates:
        return c
    latest = max(candidates, key=lambda i: c.assignments[i].decided_at)
    if kpi == "clicked":  # a click implies the email was opened
        c = _flag(c, latest, "opened", out)
    return _flag(c, latest, kpi, out)


# -- requests ----------------------------------------------------------------------------------
def request_for(c: Customer, a: Action, book: Book) -> Request | None:
    """The rendered request for an in-flight action (None if its playbook is gone)."""
    pb = book.get(a.playbook)
    if pb is None:
        return None
    try:
        step = pb.step(a.step)
    except KeyError:
        return None
    variant = pb.variant(a.variant)
    if variant is not None:
        step = variant.apply(step)
    variables: dict[str, str] = dict(pb.defaults)
    variables.update(a.features)
    variables.update(c.attrs)
    variables.update(segment=a.segment, playbook=a.playbook, variant=a.variant)
    try:
        variables.update({k: render(v, variables) for k, v in step.variables})
        subject = None if step.subject is None else render(step.subject, variables)
        body = None if step.body is None else render(step.body, variables)
        properties = {k: render(v, variables) for k, v in step.properties}
        problem = None
    except RenderError as exc:  # loading rules this out; never send a half-rendered text
        subject = body = None
        properties = {}
        problem = f"template: {exc}"
    return Request(
        key=a.key,
        customer_id=a.customer_id,
        channel=a.channel,
        playbook=a.playbook,
        step=a.step,
        segment=a.segment,
        variant=a.variant,
        campaign_id=a.campaign_id,
        template=step.template,
        subject=subject,
        body=body,
        variables=variables,
        list_id=step.list_id,
        properties=properties,
        task_priority=step.task_priority,
        problem=problem,
    )


# -- records (the changelog and results schemas) -----------------------------------------------
def result_record(r: Result, decided_at: int | None = None) -> dict[str, Any]:
    """The ``io.segflow.DispatchResult`` for one decision (deterministic ``result_id``)."""
    a = r.action
    suffix = f":{r.reason}:{a.due_at}" if r.status == "scheduled" else ""
    return {
        "result_id": f"{a.key}:{r.status}{suffix}",
        "customer_id": a.customer_id,
        "playbook": a.playbook,
        "step": a.step,
        "segment": a.segment,
        "entry_id": a.entry_id,
        "channel": a.channel,
        "status": r.status,
        "reason": r.reason,
        "variant": a.variant,
        "holdout": a.variant == HOLDOUT,
        "idempotency_key": a.key,
        "attempt": a.attempt,
        "campaign_id": a.campaign_id,
        "endpoint": a.endpoint,
        "http_status": a.http_status,
        "decided_at": r.at if decided_at is None else decided_at,
        "dispatched_at": a.dispatched_at if r.status in ("sent", "failed") else None,
        "due_at": a.due_at,
    }


_ACTION_FIELDS = (
    "key",
    "customer_id",
    "playbook",
    "step",
    "segment",
    "entry_id",
    "channel",
    "variant",
    "priority",
    "campaign_id",
    "decided_at",
    "due_at",
    "status",
    "reason",
    "attempt",
    "retry_at",
    "settled_at",
    "dispatched_at",
    "http_status",
    "endpoint",
)
_KEY_PREFIX = "sf-"
_OTHER_KEY = b"\xff"  # a key that is not "sf-" + 32 hex digits follows as UTF-8


def _key_bytes(key: str) -> bytes:
    """An idempotency key as stored: the 16 bytes its hex digits spell, or 0xFF + UTF-8.

    >>> _key_bytes("sf-f9a0288dfaec32b898aa9e3a69187346").hex()
    'f9a0288dfaec32b898aa9e3a69187346'
    >>> [_key_str(_key_bytes(k)) for k in ("odd-key", "sf-F9", "x" * 15)]
    ['odd-key', 'sf-F9', 'xxxxxxxxxxxxxxx']
    """
    digits = key[3:]
    if (
        key.startswith(_KEY_PREFIX)
        and len(digits) == 32
        and digits == digits.lower()
        and all(ch in "0123456789abcdef" for ch in digits)
    ):
        return bytes.fromhex(digits)
    raw = _OTHER_KEY + key.encode()  # UTF-8 never holds 0xFF
    return _OTHER_KEY + raw if len(raw) == 16 else raw  # 16 bytes would read as hex


def _key_str(raw: bytes) -> str:
    if len(raw) == 16:
        return _KEY_PREFIX + raw.hex()
    return raw.lstrip(_OTHER_KEY).decode()


class _Strings:
    """A record's string table: each text once, referred to by its index."""

    __slots__ = ("index", "table")

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.table: list[str] = []

    def __call__(self, text: str | None) -> int:
        if text is None:
            return -1
        i = self.index.get(text)
        if i is None:
            i = self.index[text] = len(self.table)
            self.table.append(text)
        return i

    def entry(self, customer_id: str, segment: str, entry_id: str) -> int:
        """An entry id: ``-2 - i`` when it is ``customer|segment|`` + text ``i`` (the
        segmenter's form), else the index of the whole id."""
        prefix = f"{customer_id}|{segment}|"
        if entry_id.startswith(prefix):
            return -2 - self(entry_id[len(prefix) :])
        return self(entry_id)


def _entry(i: int, customer_id: str, segment: str, strings: list[str]) -> str:
    return f"{customer_id}|{segment}|{strings[-2 - i]}" if i <= -2 else strings[i]


def _step_record(a: Action, s: _Strings, previous_decided: int) -> dict[str, Any]:
    decided = a.decided_at
    feats: list[int] = []
    for name, value in a.features:
        feats.append(s(name))
        feats.append(s(value))
    return {
        "key": _key_bytes(a.key),
        "playbook": s(a.playbook),
        "step": s(a.step),
        "segment": s(a.segment),
        "entry_id": s.entry(a.customer_id, a.segment, a.entry_id),
        "channel": s(a.channel),
        "variant": s(a.variant),
        "campaign_id": s(a.campaign_id),
        "priority": a.priority,
        "decided_after": decided - previous_decided,
        "due_after": a.due_at - decided,
        "status": s(a.status),
        "reason": s(a.reason),
        "attempt": a.attempt,
        "retry_at": a.retry_at,
        "settled_after": None if a.settled_at is None else a.settled_at - decided,
        "dispatched_after": None if a.dispatched_at is None else a.dispatched_at - decided,
        "http_status": a.http_status,
        "endpoint": s(a.endpoint),
        "features": feats,
    }


def customer_record(c: Customer) -> dict[str, Any]:
    """``io.segflow.DispatcherStateEntry`` (kind ``customer``) for the changelog, in the
    compact form (``strings``, ``ledger``, ``sent``, ``assigned``; the schema's doc)."""
    s = _Strings()
    ledger = []
    previous = 0
    for a in c.actions:
        ledger.append(_step_record(a, s, previous))
        previous = a.decided_at
    return {
        "kind": "customer",
        "customer_id": c.customer_id,
        "suppressions": sorted(c.suppressions),
        "timezone": c.timezone,
        "attrs": dict(c.attrs),
        "last_engagement_at": c.last_engagement_at,
        "ledger": ledger,
        "sent": [{"channel": s(ch), "at": at, "key": _key_bytes(k)} for ch, at, k in c.sends],
        "assigned": [
            {
                "playbook": s(x.playbook),
                "segment": s(x.segment),
                "entry_id": s.entry(c.customer_id, x.segment, x.entry_id),
                "variant": s(x.variant),
                "campaign_id": s(x.campaign_id),
                "decided_at": x.decided_at,
                "counted": [s(k) for k in sorted(x.counted)],
            }
            for x in c.assignments
        ],
        "strings": s.table,
    }


def _steps(cid: str, r: Mapping[str, Any], strings: list[str]) -> Iterator[Action]:
    def text(i: int) -> str | None:
        return None if i < 0 else strings[i]

    decided = 0
    for e in r.get("ledger") or ():
        decided += int(e["decided_after"])
        settled, dispatched = e.get("settled_after"), e.get("dispatched_after")
        feats = e.get("features") or ()
        segment = strings[e["segment"]]
        yield Action(
            key=_key_str(e["key"]),
            customer_id=cid,
            playbook=strings[e["playbook"]],
            step=strings[e["step"]],
            segment=segment,
            entry_id=_entry(e["entry_id"], cid, segment, strings),
            channel=strings[e["channel"]],
            variant=strings[e["variant"]],
            priority=int(e.get("priority") or 0),
            campaign_id=strings[e["campaign_id"]],
            decided_at=decided,
            due_at=decided + int(e["due_after"]),
            status=strings[e["status"]],
            reason=text(e.get("reason", -1)),
            attempt=int(e.get("attempt") or 0),
            retry_at=int(e.get("retry_at") or 0),
            settled_at=None if settled is None else decided + int(settled),
            dispatched_at=None if dispatched is None else decided + int(dispatched),
            http_status=e.get("http_status"),
            endpoint=text(e.get("endpoint", -1)),
            features=tuple(
                sorted((strings[feats[i]], strings[feats[i + 1]]) for i in range(0, len(feats), 2))
            ),
        )


def customer_from_record(r: Mapping[str, Any]) -> Customer:
    """Inverse of :func:`customer_record`; reads the form the version before wrote
    (``actions``, ``sends``, ``assignments`` with every text in place) too.

    >>> c = Customer("c1", frozenset({"bounced"}), "UTC", (("first_name", "Ada"),), 5,
    ...              (("email", 1, "k"),), (), (Assignment("P", "S", "e", "A", "P", 1),))
    >>> customer_from_record(customer_record(c)) == c
    True
    """
    cid = r["customer_id"]
    strings = list(r.get("strings") or ())
    actions = tuple(_steps(cid, r, strings)) + tuple(
        Action(
            **{f: a.get(f) for f in _ACTION_FIELDS},
            features=tuple(sorted((a.get("features") or {}).items())),
        )
        for a in r.get("actions") or ()
    )
    sends = tuple(
        (strings[x["channel"]], int(x["at"]), _key_str(x["key"])) for x in r.get("sent") or ()
    ) + tuple((x["channel"], int(x["at"]), x["key"]) for x in r.get("sends") or ())
    assignments = tuple(
        Assignment(
            strings[x["playbook"]],
            strings[x["segment"]],
            _entry(x["entry_id"], cid, strings[x["segment"]], strings),
            strings[x["variant"]],
            strings[x["campaign_id"]],
            int(x["decided_at"]),
            frozenset(strings[k] for k in x.get("counted") or ()),
        )
        for x in r.get("assigned") or ()
    ) + tuple(
        Assignment(
            x["playbook"],
            x["segment"],
            x["entry_id"],
            x["variant"],
            x["campaign_id"],
            int(x["decided_at"]),
            frozenset(x.get("counted") or ()),
        )
        for x in r.get("assignments") or ()
    )
    return Customer(
        customer_id=cid,
        suppressions=frozenset(r.get("suppressions") or ()),
        timezone=r.get("timezone"),
        attrs=tuple(sorted((r.get("attrs") or {}).items())),
        last_engagement_at=r.get("last_engagement_at"),
        sends=sends,
        actions=actions,
        assignments=assignments,
    )


def record_timers(r: Mapping[str, Any]) -> tuple[int | None, list[tuple[int, str]]]:
    """:func:`next_due` and the in-flight actions' ``(retry_at, key)`` of a customer record,
    without building the customer (what a restore's index rebuild needs).

    >>> c = Customer("c1", actions=(Action("sf-1", "c1", "P", "s", "S", "e", "email", "A", 0,
    ...     "P", 1, 50, status="in_flight", retry_at=7), Action("sf-2", "c1", "P", "t", "S", "e",
    ...     "email", "A", 0, "P", 1, 90)))
    >>> record_timers(customer_record(c)) == (next_due(c), [(7, "sf-1")])
    True
    """
    strings = r.get("strings") or ()
    due: int | None = None
    flights: list[tuple[int, str]] = []
    decided = 0
    for e in r.get("ledger") or ():
        decided += e["decided_after"]
        status = strings[e["status"]]
        if status == "scheduled":
            at = decided + e["due_after"]
            due = at if due is None or at < due else due
        elif status == "in_flight":
            flights.append((int(e.get("retry_at") or 0), _key_str(e["key"])))
    for a in r.get("actions") or ():  # written by the version before
        if a["status"] == "scheduled":
            at = int(a["due_at"])
            due = at if due is None or at < due else due
        elif a["status"] == "in_flight":
            flights.append((int(a.get("retry_at") or 0), a["key"]))
    return due, flights


def kpi_record(
    segment: str, playbook: str, variant: str, counts: Mapping[str, int]
) -> dict[str, Any]:
    """``io.segflow.DispatcherStateEntry`` (kind ``kpi``)."""
    return {
        "kind": "kpi",
        "segment": segment,
        "playbook": playbook,
        "variant": variant,
        "counts": dict(counts),
    }


def apply_kpis(
    current: Mapping[tuple[str, str, str], Mapping[str, int]], deltas: Iterable[KpiDelta]
) -> dict[tuple[str, str, str], dict[str, int]]:
    """The KPI counters after ``deltas`` (only the rows that changed).

    >>> apply_kpis({}, [KpiDelta("S", "P", "A", "sent"), KpiDelta("S", "P", "A", "sent")])
    {('S', 'P', 'A'): {'sent': 2}}
    """
    changed: dict[tuple[str, str, str], dict[str, int]] = {}
    for d in deltas:
        row = (d.segment, d.playbook, d.variant)
        counts = changed.setdefault(row, dict(current.get(row, {})))
        counts[d.kpi] = counts.get(d.kpi, 0) + 1
    return changed
