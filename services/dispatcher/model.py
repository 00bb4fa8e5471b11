r"""The dispatcher's data types, pure: its inputs (:class:`SegmentChange`, :class:`Observation`,
:class:`Outcome`), a customer's state (:class:`Customer`, its :class:`Action` ledger and
:class:`Assignment`\ s), the effects :mod:`services.dispatcher.core` returns and the
:class:`Request` an adapter performs. Moved out of ``core.py`` unchanged (it re-exports them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
    #: The current attempt's call was recorded as started (committed before the call, for a
    #: channel whose vendor does not de-duplicate); cleared by its outcome. Found set by an
    #: owner that did not start it (``kill -9``), it means the outcome is unknown.
    started: bool = False


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


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


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
