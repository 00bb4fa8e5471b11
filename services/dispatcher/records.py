"""The dispatcher's records on Kafka, pure: the results topic's ``DispatchResult``, the
changelog's ``DispatcherStateEntry`` (a customer in the compact form, and read back in both
forms; KPI rows), what a restore's timer index reads from a record, and the rendered
:class:`Request` of a ledger entry (``request_for``). Moved out of ``core.py`` (which
re-exports every name).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from services.dispatcher.model import (
    Action,
    Assignment,
    Customer,
    KpiDelta,
    Request,
    Result,
)
from services.dispatcher.playbooks import (
    HOLDOUT,
    Book,
    RenderError,
    render,
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
        "started": [_key_bytes(a.key) for a in c.actions if a.started],
    }


def _steps(cid: str, r: Mapping[str, Any], strings: list[str]) -> Iterator[Action]:
    def text(i: int) -> str | None:
        return None if i < 0 else strings[i]

    started = set(r.get("started") or ())

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
            started=e["key"] in started,
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
    >>> record_timers(customer_record(c)) == (90, [(7, "sf-1")])
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
