"""Retry timing: exponential backoff with full jitter, rate-limit headers, circuit breakers.

Pure: time is an argument, randomness is a number in [0, 1) passed in.

>>> [ceiling(a, base=1.0, cap=30.0) for a in range(7)]
[1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
>>> next_delay(3, 0.5, base=1.0, cap=30.0)
4.0
>>> next_delay(3, 0.5, base=1.0, cap=30.0, retry_after=20.0)
20.0
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping
from dataclasses import dataclass, replace


def ceiling(attempt: int, base: float, cap: float) -> float:
    """Upper bound of the delay before retry ``attempt`` (0-based): min(cap, base·2^n)."""
    return min(cap, base * (2.0 ** min(attempt, 60)))


def next_delay(
    attempt: int,
    jitter: float,
    base: float = 0.5,
    cap: float = 60.0,
    retry_after: float | None = None,
    max_retry_after: float = 3600.0,
) -> float:
    """Seconds to wait before the next try: full jitter under :func:`ceiling`, but never less
    than the server's ``Retry-After`` (itself bounded by ``max_retry_after``).

    >>> next_delay(0, 0.999, base=1.0, cap=30.0) < 1.0
    True
    """
    delay = jitter * ceiling(attempt, base, cap)
    if retry_after is not None:
        delay = max(delay, min(max(retry_after, 0.0), max_retry_after))
    return delay


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from ``Retry-After`` (delta seconds or an HTTP date), None if absent or bad.

    >>> parse_retry_after("7", 0.0)
    7.0
    >>> parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", 1445412480.0)
    10.0
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def rate_limit_pause(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to hold an endpoint when its rate-limit headers say the budget is spent.

    Understands ``X-RateLimit-Remaining``/``X-RateLimit-Reset`` (SendGrid: reset is an epoch
    second; others send a delta), HubSpot's ``X-HubSpot-RateLimit-Remaining`` with
    ``-Interval-Milliseconds``, and Salesforce's ``Sforce-Limit-Info: api-usage=used/limit``.

    >>> rate_limit_pause({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1700000005"}, 1.7e9)
    5.0
    >>> rate_limit_pause({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "3"}, 100.0)
    3.0
    >>> rate_limit_pause({"x-ratelimit-remaining": "12"}, 100.0) is None
    True
    >>> rate_limit_pause({"x-hubspot-ratelimit-remaining": "0",
    ...                   "x-hubspot-ratelimit-interval-milliseconds": "10000"}, 0.0)
    10.0
    >>> rate_limit_pause({"sforce-limit-info": "api-usage=15000/15000"}, 0.0)
    60.0
    """
    h = headers if all(k.islower() for k in headers) else {k.lower(): v for k, v in headers.items()}
    remaining = h.get("x-ratelimit-remaining")
    if remaining is not None and _num(remaining) == 0:
        reset = _num(h.get("x-ratelimit-reset"))
        if reset is None:
            return 1.0
        return max(0.0, reset - now) if reset > 1e9 else reset
    hub = h.get("x-hubspot-ratelimit-remaining")
    if hub is not None and _num(hub) == 0:
        interval = _num(h.get("x-hubspot-ratelimit-interval-milliseconds"))
        return (interval or 1000.0) / 1000.0
    sf = h.get("sforce-limit-info")
    if sf and "api-usage=" in sf:
        try:
            used, limit = sf.split("api-usage=", 1)[1].split(",")[0].split("/")
            if int(used) >= int(limit):
                return 60.0
        except ValueError:
            return None
    return None


def _num(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


@dataclass(frozen=True)
class Breaker:
    """A circuit breaker's state for one endpoint.

    closed → (``threshold`` consecutive failures) → open for ``cooldown`` seconds →
    half-open: one probe allowed → closed on success, open again on failure.

    >>> b = Breaker()
    >>> for t in range(5): b = b.failure(float(t))
    >>> b.state, b.allows(5.0), b.allows(4.0 + 10.0)
    ('open', False, True)
    >>> b.success().state
    'closed'
    """

    threshold: int = 5
    cooldown: float = 10.0
    failures: int = 0
    opened_at: float | None = None

    @property
    def state(self) -> str:
        return "open" if self.opened_at is not None else "closed"

    def allows(self, now: float) -> bool:
        """True when a call may go out (closed, or open long enough for a half-open probe)."""
        return self.opened_at is None or now - self.opened_at >= self.cooldown

    def success(self) -> Breaker:
        return replace(self, failures=0, opened_at=None)

    def failure(self, now: float) -> Breaker:
        """One more failure: opens at ``threshold``; a failed half-open probe re-opens it
        (a fresh cooldown from ``now``).

        >>> b = Breaker(threshold=1, cooldown=10.0).failure(0.0).failure(12.0)
        >>> b.state, b.allows(15.0), b.allows(22.0)
        ('open', False, True)
        """
        failures = self.failures + 1
        if failures >= self.threshold:
            return replace(self, failures=failures, opened_at=now)
        return replace(self, failures=failures)

    def reopen_in(self, now: float) -> float:
        """Seconds until the next probe is allowed (0 when calls may go out)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown - now)
