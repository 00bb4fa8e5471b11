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
    if not isinstance(occurred_at, int) or occurred_at <= 0:
        raise InvalidRecord(f"event {event_id} has no valid occurred_at", reason="missing_field")
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
