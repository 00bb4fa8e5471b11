"""Segment tracking-API messages to ``BehaviorEvent`` records (pure: no I/O, clock or env).

A Segment call (``identify``, ``track``, ``page``, ``screen``, ``alias``, ``group``, alone or
inside a ``batch``) becomes one ``BehaviorEvent``:

=====================================  ==================================================
Segment                                BehaviorEvent
=====================================  ==================================================
``messageId``                          ``event_id`` (a content hash when absent, so a
                                       retried message keeps its id)
``userId`` / ``anonymousId``           ``user_id`` / ``anonymous_id``
``context.device.id``                  ``device_id``
``traits.email`` (identify),           ``email``, raw, as ``segflow produce`` sends it:
``context.traits.email``               identity hashes it and never forwards it; it is
                                       kept out of ``properties``
``track`` ``event`` name               ``event_type`` through :class:`EventMap`
``identify``, ``page``, ``screen``,    ``identify``, ``page_view``, ``page_view``,
``alias``, ``group``                   ``identify`` (previousId as ``anonymous_id``),
                                       ``group``
``timestamp`` (or ``originalTimestamp``) ``occurred_at``, corrected for the sender's clock
with ``sentAt`` and the receive time   skew: ``receivedAt - (sentAt - timestamp)``
``properties`` / ``traits``            typed fields (``amount`` from amount, revenue or
                                       total; ``currency``, ``product_id``, ``feature``,
                                       ``session_seconds``, ``sentiment``, ``escalated``,
                                       ``campaign_id``, ``variant``), the rest as strings
                                       in ``properties``
=====================================  ==================================================

Segment requires ``userId`` or ``anonymousId``; the collector also accepts a message whose only
identifier is a device id or an email (an email provider's webhook), as the event contract does.

>>> m = map_message({"type": "track", "event": "Order Completed", "userId": "u1",
...     "messageId": "m1", "timestamp": "2024-01-01T00:00:00Z",
...     "properties": {"revenue": 42.5, "currency": "EUR", "coupon": "X"}},
...     received_at=1704067200000, sent_at=None, config=MappingConfig())
>>> m["event_id"], m["event_type"], m["occurred_at"], m["amount"], m["properties"]
('m1', 'purchase', 1704067200000, 42.5, {'coupon': 'X'})
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from segflow.errors import InvalidRecord
from segflow.events import parse_event_time, validate_event

CALL_TYPES = ("identify", "track", "page", "screen", "alias", "group")

#: Segment's spec'd and common event names (normalised) -> segflow event types.
DEFAULT_EVENT_NAMES: dict[str, str] = {
    "order_completed": "purchase",
    "purchase_completed": "purchase",
    "cart_viewed": "cart_view",
    "cart_abandoned": "cart_abandon",
    "signed_in": "login",
    "logged_in": "login",
    "application_opened": "session_start",
    "session_started": "session_start",
    "feature_used": "feature_use",
    "email_delivered": "email_sent",
    "email_opened": "email_open",
    "email_link_clicked": "email_click",
    "email_clicked": "email_click",
    "unsubscribed": "email_unsubscribe",
    "email_unsubscribed": "email_unsubscribe",
    "email_bounced": "email_bounce",
    "ticket_created": "support_ticket",
    "support_ticket_created": "support_ticket",
    "subscription_cancelled": "subscription_cancel",
    "subscription_canceled": "subscription_cancel",
}
#: What the non-track calls become.
DEFAULT_CALL_TYPES: dict[str, str] = {
    "identify": "identify",
    "page": "page_view",
    "screen": "page_view",
    "alias": "identify",
    "group": "group",
}

_NAME_RE = re.compile(r"[^a-z0-9]+")
# property name -> typed field, first match wins (amount: amount, then revenue, then total)
_NUMBER_FIELDS = (
    ("amount", "amount"),
    ("revenue", "amount"),
    ("total", "amount"),
    ("session_seconds", "session_seconds"),
    ("sentiment", "sentiment"),
)
_STRING_FIELDS = (
    ("currency", "currency"),
    ("product_id", "product_id"),
    ("feature", "feature"),
    ("campaign_id", "campaign_id"),
    ("variant", "variant"),
)


def normalize_name(name: str) -> str:
    """``"Order Completed"`` -> ``"order_completed"`` (lower case, runs of others as ``_``).

    >>> normalize_name("  Email Link-Clicked! ")
    'email_link_clicked'
    """
    return _NAME_RE.sub("_", name.strip().lower()).strip("_")


@dataclass(frozen=True)
class EventMap:
    """Track event names to event types: overrides, then Segment's spec'd names, then the name
    itself normalised (an unknown type is kept and counted downstream, not rejected).

    >>> em = EventMap({"Trial Started": "session_start"})
    >>> em.event_type("Trial Started"), em.event_type("Order Completed"), em.event_type("login")
    ('session_start', 'purchase', 'login')
    >>> em.event_type("Webinar Joined")
    'webinar_joined'
    """

    overrides: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        table = dict(DEFAULT_EVENT_NAMES)
        table.update({normalize_name(k): v for k, v in self.overrides.items()})
        object.__setattr__(self, "_table", table)

    def event_type(self, name: str) -> str:
        norm = normalize_name(name)
        table: dict[str, str] = self._table  # type: ignore[attr-defined]
        return table.get(norm, norm)


@dataclass(frozen=True)
class MappingConfig:
    """How messages are mapped and checked."""

    events: EventMap = field(default_factory=EventMap)
    calls: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_CALL_TYPES))
    #: sentAt and receive time closer than this are transit time, not clock skew: no
    #: correction, so a sender with a right clock keeps its timestamps exactly.
    skew_tolerance_ms: int = 1000
    #: Events further in the future than this (after correction) are rejected.
    max_future_ms: int = 3_600_000


class MessageError(ValueError):
    """One message cannot be accepted; ``str()`` names the field and what was expected."""


def _str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return json.dumps(value)
    return None


def _prop_string(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise MessageError(f"properties.{name}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise MessageError(f"properties.{name}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise MessageError(f"properties.{name}: expected a finite number, got {value!r}")
    return number


def message_id(msg: Mapping[str, Any]) -> str:
    """``messageId``, or a hash of the message without its send-time fields when absent.

    >>> a = {"type": "track", "event": "x", "userId": "u", "sentAt": "2024-01-01T00:00:00Z"}
    >>> message_id(a) == message_id({**a, "sentAt": "2024-01-01T00:00:09Z"}), len(message_id(a))
    (True, 35)
    """
    mid = msg.get("messageId")
    if isinstance(mid, str) and mid:
        return mid
    if isinstance(mid, int) and not isinstance(mid, bool):
        return str(mid)
    body = {k: v for k, v in msg.items() if k not in ("sentAt", "receivedAt", "writeKey")}
    digest = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()
    return f"sf-{digest[:32]}"


def occurred_at(
    msg: Mapping[str, Any], received_at: int, sent_at: Any, config: MappingConfig
) -> int:
    """Event time in epoch ms with Segment's clock-skew correction.

    ``timestamp`` (or ``originalTimestamp``) is the sender's clock; ``sentAt`` (the message's,
    else the batch's) is the sender's clock at sending; ``received_at`` is ours. When the two
    clocks differ by more than the tolerance, the event moves by the difference.

    >>> cfg = MappingConfig()
    >>> occurred_at({"timestamp": "2024-01-01T00:00:00Z"}, 1704067260000,
    ...             "2024-01-01T00:00:30Z", cfg)                  # sender 30 s behind
    1704067230000
    >>> occurred_at({"timestamp": 1704067200000}, 1704067200400, 1704067200000, cfg)  # transit
    1704067200000
    >>> occurred_at({}, 1704067200000, None, cfg)                       # no time: receive time
    1704067200000
    """
    raw = msg.get("timestamp")
    if raw is None:
        raw = msg.get("originalTimestamp")
    if raw is None:
        return received_at
    try:
        at = parse_event_time(raw)
    except ValueError as exc:
        raise MessageError(f"timestamp: {exc}") from None
    sent = msg.get("sentAt")
    if sent is None:
        sent = sent_at
    if sent is None:
        return at
    try:
        sent_ms = parse_event_time(sent)
    except ValueError as exc:
        raise MessageError(f"sentAt: {exc}") from None
    skew = received_at - sent_ms
    if abs(skew) <= config.skew_tolerance_ms:
        return at
    return at + skew


def _id(msg: Mapping[str, Any], name: str) -> str | None:
    value = msg.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise MessageError(f"{name}: expected a string, got {value!r}")


def _dict(msg: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = msg.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MessageError(f"{name}: expected an object, got {type(value).__name__}")
    return value


def map_message(
    msg: Any, received_at: int, sent_at: Any, config: MappingConfig, call: str | None = None
) -> dict[str, Any]:
    """One Segment message as a ``BehaviorEvent`` dict, or :class:`MessageError`.

    ``call`` is the endpoint's call type (``/v1/track``); inside a batch it is the message's
    ``type``.

    >>> cfg = MappingConfig()
    >>> ev = map_message({"type": "identify", "anonymousId": "a1", "messageId": "m2",
    ...     "traits": {"email": "Ana@x.io", "plan": "pro", "seats": 3},
    ...     "context": {"device": {"id": "d1"}}}, 1704067200000, None, cfg)
    >>> ev["event_type"], ev["email"], ev["device_id"], ev["properties"]
    ('identify', 'Ana@x.io', 'd1', {'plan': 'pro', 'seats': '3'})
    >>> map_message({"type": "track", "userId": "u1"}, 1, None, cfg)
    Traceback (most recent call last):
    ...
    segflow.collector.core.MessageError: event: expected the track call's event name (a non-empty string)
    """  # noqa: E501
    if not isinstance(msg, Mapping):
        raise MessageError(f"expected a JSON object, got {type(msg).__name__}")
    kind = call or msg.get("type")
    if kind not in CALL_TYPES:
        raise MessageError(f"type: expected one of {', '.join(CALL_TYPES)}, got {kind!r}")
    context = _dict(msg, "context")
    traits = _dict(msg, "traits") if kind in ("identify", "group") else {}
    raw_traits = context.get("traits")
    ctx_traits: Mapping[str, Any] = raw_traits if isinstance(raw_traits, Mapping) else {}
    device = context.get("device") if isinstance(context.get("device"), Mapping) else {}

    user_id = _id(msg, "userId")
    anonymous_id = _id(msg, "anonymousId")
    try:
        device_id = _id(device, "id") if device else None
    except MessageError as exc:
        raise MessageError(f"context.device.{exc}") from None
    email = traits.get("email") or ctx_traits.get("email")
    if email is not None and not isinstance(email, str):
        raise MessageError(f"traits.email: expected a string, got {email!r}")
    email = email or None

    props: dict[str, Any] = {}
    if kind == "track":
        name = msg.get("event")
        if not isinstance(name, str) or not name.strip():
            raise MessageError("event: expected the track call's event name (a non-empty string)")
        event_type = config.events.event_type(name)
        props.update(_dict(msg, "properties"))
    else:
        event_type = config.calls.get(kind, kind)
        if kind in ("page", "screen"):
            props.update(_dict(msg, "properties"))
            for extra in ("name", "category"):
                if msg.get(extra) is not None:
                    props.setdefault(extra, msg[extra])
        elif kind == "identify":
            props.update(traits)
        elif kind == "group":
            group_id = _id(msg, "groupId")
            if group_id is None:
                raise MessageError("groupId: expected the group call's group id (a string)")
            props.update(traits)
            props["group_id"] = group_id
        elif kind == "alias":
            previous = _id(msg, "previousId")
            if previous is None or user_id is None:
                raise MessageError(
                    "alias: expected previousId and userId (the old and the new id, strings)"
                )
            anonymous_id = previous
    if not (user_id or anonymous_id or device_id or email):
        raise MessageError(
            "expected userId or anonymousId (or context.device.id, or traits.email): "
            "a message needs at least one identifier"
        )

    event: dict[str, Any] = {
        "event_id": message_id(msg),
        "event_type": event_type,
        "occurred_at": occurred_at(msg, received_at, sent_at, config),
        "user_id": user_id,
        "anonymous_id": anonymous_id,
        "device_id": device_id,
        "email": email,
    }
    props.pop("email", None)  # raw PII travels only in the email field, which identity hashes
    for prop, target in _NUMBER_FIELDS:
        if prop in props:
            value = props.pop(prop)
            if value is not None and event.get(target) is None:
                event[target] = _number(prop, value)
    for prop, target in _STRING_FIELDS:
        if prop in props:
            value = props.pop(prop)
            if value is not None and event.get(target) is None:
                event[target] = _prop_string(value)
    if "product_id" not in event and "productId" in props:
        event["product_id"] = _prop_string(props.pop("productId"))
    if "escalated" in props:
        value = props.pop("escalated")
        if value is not None and not isinstance(value, bool):
            raise MessageError(f"properties.escalated: expected true or false, got {value!r}")
        event["escalated"] = value
    if event.get("sentiment") is not None and not -1.0 <= event["sentiment"] <= 1.0:
        raise MessageError(
            f"properties.sentiment: expected a number in [-1, 1], got {event['sentiment']}"
        )
    event["properties"] = {
        str(k): s for k, v in props.items() if (s := _prop_string(v)) is not None
    }
    try:
        validate_event(event, received_at, config.max_future_ms)
    except InvalidRecord as exc:
        raise MessageError(exc.detail) from None
    return event


@dataclass(frozen=True)
class Rejected:
    """A message of a request that was not accepted, and why (for the 400 answer)."""

    index: int
    message_id: str | None
    error: str

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "messageId": self.message_id, "error": self.error}


def map_request(
    body: Any, call: str, received_at: int, config: MappingConfig
) -> tuple[list[dict[str, Any]], list[Rejected]]:
    """The events of one request body (a single call, or ``batch``) and its rejected messages.

    >>> events, bad = map_request({"batch": [
    ...     {"type": "page", "anonymousId": "a1", "messageId": "p1"},
    ...     {"type": "track", "userId": "u1", "messageId": "t1", "event": "Signed In",
    ...      "timestamp": "yesterday"}]}, "batch", 1704067200000, MappingConfig())
    >>> [e["event_type"] for e in events], bad[0].index, bad[0].message_id
    (['page_view'], 1, 't1')
    >>> bad[0].error.split(";")[0]
    "timestamp: 'yesterday' is not a date and time"
    """
    if not isinstance(body, Mapping):
        raise MessageError(f"expected a JSON object, got {type(body).__name__}")
    if call != "batch":
        messages: list[Any] = [body]
        sent_at = body.get("sentAt")
    else:
        batch = body.get("batch")
        if not isinstance(batch, list):
            raise MessageError('batch: expected {"batch": [message, ...]} with a list of calls')
        messages = batch
        sent_at = body.get("sentAt")
    events: list[dict[str, Any]] = []
    rejected: list[Rejected] = []
    for i, msg in enumerate(messages):
        try:
            events.append(
                map_message(msg, received_at, sent_at, config, None if call == "batch" else call)
            )
        except MessageError as exc:
            mid = msg.get("messageId") if isinstance(msg, Mapping) else None
            rejected.append(Rejected(i, mid if isinstance(mid, str) else None, str(exc)))
    return events, rejected


@dataclass
class TokenBucket:
    """Messages per second with a burst, per write key; time is an argument.

    >>> b = TokenBucket(rate=100.0, burst=200.0)
    >>> b.take(150, now=0.0), b.take(100, now=0.0), round(b.wait_for(100, now=0.0), 2)
    (True, False, 0.5)
    >>> b.take(100, now=0.5)
    True
    """

    rate: float
    burst: float
    tokens: float = -1.0
    at: float | None = None

    def _refill(self, now: float) -> None:
        if self.at is None or self.tokens < 0:
            self.tokens, self.at = self.burst, now
            return
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def take(self, n: int, now: float) -> bool:
        """Take ``n`` tokens if there are that many; False (and nothing taken) otherwise."""
        self._refill(now)
        if n <= self.tokens:
            self.tokens -= n
            return True
        return False

    def wait_for(self, n: int, now: float) -> float:
        """Seconds until ``n`` tokens are there (``inf`` if ``n`` exceeds the burst)."""
        self._refill(now)
        if n > self.burst:
            return math.inf
        return max(0.0, (n - self.tokens) / self.rate)
