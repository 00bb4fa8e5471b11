"""Signed webhooks: HMAC-SHA256 over ``timestamp.body``, verifiable and replay-protected.

The sender adds ``X-Segflow-Timestamp`` (epoch seconds), ``X-Segflow-Signature``
(``v1=<hex>``) and ``Idempotency-Key``. A receiver checks the signature in constant time,
rejects timestamps outside a tolerance (an old capture cannot be replayed later) and
remembers idempotency keys inside that tolerance (a capture cannot be replayed now).

>>> body = b'{"a": 1}'
>>> headers = sign(b"secret", body, timestamp=1_700_000_000)
>>> verify(b"secret", body, headers, now=1_700_000_100)
True
>>> verify(b"secret", body + b" ", headers, now=1_700_000_100)
False
>>> verify(b"secret", body, headers, now=1_700_001_000)   # too old: replay refused
False
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

TIMESTAMP = "X-Segflow-Timestamp"
SIGNATURE = "X-Segflow-Signature"


def signature(secret: bytes, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


def sign(secret: bytes, body: bytes, timestamp: int) -> dict[str, str]:
    """Headers that make ``body`` verifiable by a holder of ``secret``."""
    return {TIMESTAMP: str(timestamp), SIGNATURE: signature(secret, body, timestamp)}


def verify(
    secret: bytes, body: bytes, headers: Mapping[str, str], now: float, tolerance: float = 300.0
) -> bool:
    """True when the signature matches and the timestamp is within ``tolerance`` seconds."""
    h = {k.lower(): v for k, v in headers.items()}
    try:
        ts = int(h[TIMESTAMP.lower()])
    except (KeyError, ValueError):
        return False
    if abs(now - ts) > tolerance:
        return False
    return hmac.compare_digest(signature(secret, body, ts), h.get(SIGNATURE.lower(), ""))


class ReplayGuard:
    """Remembers idempotency keys seen within the tolerance window (a receiver-side helper).

    >>> g = ReplayGuard(tolerance=300)
    >>> g.first_time("k1", now=0), g.first_time("k1", now=10), g.first_time("k1", now=700)
    (True, False, True)
    """

    def __init__(self, tolerance: float = 300.0) -> None:
        self.tolerance = tolerance
        self._seen: dict[str, float] = {}

    def first_time(self, key: str, now: float) -> bool:
        cutoff = now - 2 * self.tolerance
        if len(self._seen) > 10_000:
            self._seen = {k: t for k, t in self._seen.items() if t >= cutoff}
        seen = self._seen.get(key)
        self._seen[key] = now
        return seen is None or seen < cutoff
