"""The dispatcher's decisions, pure: what to send, when, to whom, and whether it may go.

Per customer, a state (:class:`Customer`) holds the send ledger (one :class:`Action` per
customer × playbook × step × segment entry), the send history that caps and cooldowns
count, suppressions, the time zone, and the experiment assignments that KPIs attribute
outcomes to. Four steps move it, each ``(state, input, now) -> (state, effects)``:

* :func:`decide` — a segment change starts a playbook (variant or holdout frozen here),
  cancels one, or is a duplicate (the ledger already holds its steps);
* ``observe`` — an outcome event: suppression, engagement, attribution to KPIs (in
  :mod:`services.dispatcher.observing`, with ``set_attributes``);
* :func:`promote` — due steps pass the policy (suppression, conditions, priority, caps,
  quiet hours) and become ``in_flight`` (the shell calls the API only for those);
* :func:`record_outcome` — the API's answer: ``sent``, retry later (same idempotency key) or
  ``failed`` (results topic and DLQ); :func:`start_call` records that a call is about to go out
  (channels whose vendor does not de-duplicate), :func:`unknown_outcome` settles a call started
  by an earlier owner that never recorded its answer (``failed``, reason ``ambiguous: ...``).

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
>>> from services.dispatcher.observing import observe
>>> cust, _ = observe(cust, Observation("c1", "email_open", HOUR, campaign_id="P"), HOUR, book)
>>> cust, effects = promote(cust, 48 * HOUR, book)  # engaged since the email: task skipped
>>> [(e.action.step, e.status, e.reason) for e in effects if isinstance(e, Result)]
[('task', 'suppressed', 'engaged')]
"""

from __future__ import annotations

from services.dispatcher.experiments import assign
from services.dispatcher.model import (
    DAY,
    FORGET_EVENTS,
    HOUR,
    MERGED,
    PROFILE_PROPERTIES,
    TERMINAL,
    TRUE,
    UNKNOWN_CUSTOMER_TYPES,
    Action,
    Assignment,
    Customer,
    DeadLetterAction,
    Effect,
    KpiDelta,
    Observation,
    Outcome,
    Request,
    Result,
    SegmentChange,
    idempotency_key,
    replace,
)
from services.dispatcher.playbooks import (
    CUSTOMER_FACING,
    EMAIL_CHANNELS,
    HOLDOUT,
    SYNC_CHANNELS,
    Book,
    Playbook,
    Step,
)
from services.dispatcher.policy import blocked, quiet_until
from services.dispatcher.records import (
    apply_kpis,
    customer_from_record,
    customer_record,
    kpi_record,
    record_timers,
    request_for,
    result_record,
)

__all__ = [
    "Action",
    "Assignment",
    "Customer",
    "DAY",
    "DeadLetterAction",
    "Effect",
    "FORGET_EVENTS",
    "HOUR",
    "KpiDelta",
    "MERGED",
    "Observation",
    "Outcome",
    "PROFILE_PROPERTIES",
    "Request",
    "Result",
    "SegmentChange",
    "TERMINAL",
    "TRUE",
    "UNKNOWN_CUSTOMER_TYPES",
    "apply_kpis",
    "customer_from_record",
    "customer_record",
    "decide",
    "fire_due",
    "forget",
    "idempotency_key",
    "in_flight",
    "kpi_record",
    "next_due",
    "promote",
    "prune",
    "record_outcome",
    "record_timers",
    "replace",
    "request_for",
    "result_record",
    "start_call",
    "unknown_outcome",
    "UNKNOWN_OUTCOME",
]

#: The reason of an action whose call an earlier owner of its partition recorded as started
#: and never settled (``kill -9`` while it was under way): it may or may not have reached the
#: customer, and is not made again (at most once; the DLQ holds it for a review).
UNKNOWN_OUTCOME = (
    "ambiguous: started by an earlier owner, outcome unknown; at-most-once, not retried"
)


# -- helpers -----------------------------------------------------------------------------------
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


def _may_have_reached(a: Action) -> bool:
    """Sent, or failed after the request may have taken effect (``ambiguous: ...``): such an
    action keeps its place under the caps, and later steps count engagement from it."""
    return a.status == "sent" or (
        a.status == "failed" and a.reason is not None and a.reason.startswith("ambiguous")
    )


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
    customer: Customer | None,
    change: SegmentChange,
    now: int,
    book: Book,
    keep_in_flight: bool = False,
) -> tuple[Customer, list[Effect]]:
    """Apply a segment change: start, cancel or ignore (duplicate) playbooks, then promote.

    A holdout customer gets ledger entries with status ``holdout`` and never a call.
    ``keep_in_flight``: see :func:`forget`.
    """
    c = customer or Customer(change.customer_id)
    out: list[Effect] = []
    if change.reason == "forgotten":
        c, out = forget(c, now, keep_in_flight)
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


def forget(c: Customer, now: int, keep_in_flight: bool = False) -> tuple[Customer, list[Effect]]:
    """Erase what the dispatcher holds about a customer, cancel pending steps, suppress for good.

    In-flight actions (decided, call not made or not recorded yet) are cancelled too, unless
    ``keep_in_flight`` (the event clock: they were taken before the forget in event time, and
    whether the call is still under way when the forget is read is processing timing)."""
    out: list[Effect] = []
    kept: list[Action] = []
    pending = ("scheduled",) if keep_in_flight else ("scheduled", "in_flight")
    for a in c.actions:
        if a.status in pending:
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
            since = ref.settled_at if ref is not None and _may_have_reached(ref) else a.decided_at
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


def fire_due(c: Customer, upto: int, book: Book, at_due: bool) -> tuple[Customer, list[Effect]]:
    """Promote every step due by ``upto``: all at ``upto`` (the wall clock), or with ``at_due``
    (the event clock) each at its own due time, in order, so that the decisions (caps, quiet
    hours) are the same whenever the shell gets to them. Pruned at ``upto``."""
    out: list[Effect] = []
    new = c
    if not at_due:
        new, out = promote(c, upto, book)
    while at_due and (due := next_due(new)) is not None and due <= upto:
        new, more = promote(new, due, book)  # a step held by quiet hours is due later
        out += more
    return (c, out) if new is c else (prune(new, upto, book), out)


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
            started=False,
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
                started=False,
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
        started=False,
        attempt=attempt,
        settled_at=now,
        dispatched_at=outcome.dispatched_at,
        http_status=outcome.http_status,
        endpoint=outcome.endpoint,
    )
    c = _replace_action(c, done)
    if not _may_have_reached(done):  # nothing reached them: the place under the caps goes back
        c = replace(c, sends=tuple(s for s in c.sends if s[2] != key))
    out += [Result(done, "failed", reason, now), DeadLetterAction(done, reason)]
    return c, out


def start_call(c: Customer, key: str) -> Customer:
    """The in-flight action ``key``'s call is about to go out: recorded (and committed by the
    shell) before the call, so that an owner that did not start it knows it may have taken
    effect. Only for channels whose vendor does not de-duplicate (SendGrid, SMTP, Marketo
    campaigns, under the ``at_most_once`` policy); cleared by :func:`record_outcome`.

    >>> a = Action("k", "c", "P", "s", "S", "e", "email", "A", 0, "P", 0, 0, status="in_flight")
    >>> start_call(Customer("c", actions=(a,)), "k").actions[0].started
    True
    """
    a = c.action(key)
    if a is None or a.status != "in_flight" or a.started:
        return c
    return _replace_action(c, replace(a, started=True))


def unknown_outcome(c: Customer, key: str, now: int, book: Book) -> tuple[Customer, list[Effect]]:
    """The in-flight action ``key`` was recorded as started by an earlier owner of its
    partition, which never recorded the answer (it was killed while the call was under way, or
    before it went out). Making the call again could send the customer a second email, so the
    action fails with :data:`UNKNOWN_OUTCOME` (a DLQ entry; it keeps its place under the caps,
    as it may have reached the customer).

    >>> from services.dispatcher.playbooks import Book
    >>> a = Action("k", "c", "P", "s", "S", "e", "email", "A", 0, "P", 0, 0, status="in_flight")
    >>> c = start_call(Customer("c", actions=(a,), sends=(("email", 0, "k"),)), "k")
    >>> c, effects = unknown_outcome(c, "k", 5, Book(()))
    >>> c.actions[0].status, c.actions[0].started, c.sends, effects[0].reason[:9]
    ('failed', False, (('email', 0, 'k'),), 'ambiguous')
    """
    a = c.action(key)
    if a is None or a.status != "in_flight" or not a.started:
        return c, []
    return record_outcome(c, key, Outcome("failed", None, a.endpoint, UNKNOWN_OUTCOME), now, book)
