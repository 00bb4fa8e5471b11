"""The raw event contract of SPEC §2, as pure checks (no I/O; cores may import this).

>>> ev = {"event_id": "e1", "event_type": "login", "occurred_at": 1_000, "user_id": "u1"}
>>> validate_event(ev, now_ms=2_000, max_future_ms=60_000)
>>> validate_event({**ev, "user_id": None}, now_ms=2_000, max_future_ms=60_000)
Traceback (most recent call last):
...
segflow.errors.InvalidRecord: event e1 has no identifier (user_id, anonymous_id, device_id, email)
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from segflow.errors import InvalidRecord

EVENT_TYPES = frozenset(
    {
        "identify",
        "session_start",
        "login",
        "page_view",
        "feature_use",
        "cart_view",
        "cart_abandon",
        "purchase",
        "subscription_cancel",
        "email_sent",
        "email_open",
        "email_click",
        "email_unsubscribe",
        "email_bounce",
        "support_ticket",
    }
)
IDENTIFIERS = ("user_id", "anonymous_id", "device_id", "email")

#: What a valid event time looks like, named in every rejection.
TIME_FORMS = (
    "epoch milliseconds (e.g. 1704067200000) or ISO-8601 with an offset or Z "
    "(e.g. 2024-01-01T00:00:00Z or 2024-01-01T01:00:00+01:00)"
)
#: Below this an epoch number is taken for seconds, not milliseconds (1973-03-03 in ms).
_MIN_EPOCH_MS = 100_000_000_000


def parse_event_time(value: Any) -> int:
    """Epoch milliseconds from what people write: epoch ms (number or digits) or ISO-8601.

    ISO-8601 needs an offset or ``Z``: a local time without one names no instant. A number
    small enough to be epoch *seconds* is refused rather than read as a date in 1970.

    >>> parse_event_time(1704067200000), parse_event_time("1704067200000")
    (1704067200000, 1704067200000)
    >>> parse_event_time("2024-01-01T00:00:00Z"), parse_event_time("2024-01-01T01:00:00.250+01:00")
    (1704067200000, 1704067200250)
    >>> parse_event_time("2024-01-01T00:00:00")
    Traceback (most recent call last):
    ...
    ValueError: '2024-01-01T00:00:00' has no UTC offset; expected epoch milliseconds (e.g. 1704067200000) or ISO-8601 with an offset or Z (e.g. 2024-01-01T00:00:00Z or 2024-01-01T01:00:00+01:00)
    >>> parse_event_time(1704067200)
    Traceback (most recent call last):
    ...
    ValueError: 1704067200 looks like epoch seconds; expected epoch milliseconds (e.g. 1704067200000) or ISO-8601 with an offset or Z (e.g. 2024-01-01T00:00:00Z or 2024-01-01T01:00:00+01:00)
    """  # noqa: E501
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is a boolean; expected {TIME_FORMS}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{value} is not after 1970; expected {TIME_FORMS}")
        if value < _MIN_EPOCH_MS:
            raise ValueError(f"{value} looks like epoch seconds; expected {TIME_FORMS}")
        return value
    if not isinstance(value, str):
        shown = "nothing" if value is None else f"{type(value).__name__} {value!r}"
        raise ValueError(f"got {shown}; expected {TIME_FORMS}")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a date and time; expected {TIME_FORMS}") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no UTC offset; expected {TIME_FORMS}")
    ms = round(parsed.timestamp() * 1000)
    if ms <= 0:
        raise ValueError(f"{value!r} is not after 1970; expected {TIME_FORMS}")
    return ms


def is_known_type(event_type: str) -> bool:
    """Unknown types are kept and counted, not rejected.

    >>> is_known_type("purchase"), is_known_type("webinar_joined")
    (True, False)
    """
    return event_type in EVENT_TYPES


def validate_event(event: Mapping[str, Any], now_ms: int, max_future_ms: int) -> None:
    """Raise InvalidRecord (with a DLQ reason) if ``event`` breaks the contract."""
    event_id = event.get("event_id")
    if not event_id:
        raise InvalidRecord("event has an empty event_id", reason="missing_field")
    if not event.get("event_type"):
        raise InvalidRecord(f"event {event_id} has an empty event_type", reason="missing_field")
    if not any(event.get(name) for name in IDENTIFIERS):
        raise InvalidRecord(
            f"event {event_id} has no identifier (user_id, anonymous_id, device_id, email)",
            reason="no_identifier",
        )
    occurred_at = event.get("occurred_at")
    if not isinstance(occurred_at, int) or isinstance(occurred_at, bool) or occurred_at <= 0:
        got = "none" if occurred_at is None else repr(occurred_at)
        raise InvalidRecord(
            f"event {event_id} has no valid occurred_at (got {got}); expected {TIME_FORMS}",
            reason="missing_field",
        )
    if occurred_at > now_ms + max_future_ms:
        raise InvalidRecord(
            f"event {event_id} occurred {(occurred_at - now_ms) / 1000:.0f}s in the future "
            f"(allowed {max_future_ms / 1000:.0f}s)",
            reason="future_event",
        )
    sentiment = event.get("sentiment")
    if sentiment is not None and not -1.0 <= sentiment <= 1.0:
        raise InvalidRecord(
            f"event {event_id}: sentiment {sentiment} outside [-1, 1]", reason="invalid_field"
        )
