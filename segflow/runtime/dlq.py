"""The dead-letter path: turn a record we could not process into a ``DeadLetter`` value."""

from __future__ import annotations

import time
from typing import Any

from segflow.errors import PoisonMessage

MAX_DETAIL = 1000


def dead_letter(
    *,
    service: str,
    error: BaseException,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes | None]] | None,
    now_ms: int | None = None,
) -> dict[str, Any]:
    """The DeadLetter record for ``error`` on one source record (original bytes kept).

    >>> from segflow.errors import DecodeError
    >>> dl = dead_letter(service="t", error=DecodeError("bad magic"), topic="in",
    ...                  partition=0, offset=7, timestamp_ms=None, key=b"k",
    ...                  value=b"\\x01", headers=[("h", b"v")], now_ms=1)
    >>> dl["reason"], dl["source_offset"], dl["original_value"], dl["original_headers"]
    ('undecodable', 7, b'\\x01', [{'key': 'h', 'value': b'v'}])
    """
    reason = error.reason if isinstance(error, PoisonMessage) else "handler_error"
    detail = error.detail if isinstance(error, PoisonMessage) else str(error)
    return {
        "reason": reason,
        "detail": detail[:MAX_DETAIL],
        "error_class": type(error).__name__,
        "service": service,
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "source_timestamp": timestamp_ms,
        "original_key": key,
        "original_value": value,
        "original_headers": [{"key": k, "value": v} for k, v in headers or []],
        "failed_at": now_ms if now_ms is not None else int(time.time() * 1000),
    }
