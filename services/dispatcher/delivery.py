"""Delivery decisions, pure: when a due call may go out, and what a failed attempt becomes.

The dispatcher's shell (``app.py``) holds, per endpoint, a :class:`~backoff.Breaker` and the
time until which the vendor asked it to pause (rate-limit headers); it asks :func:`hold_until`
before each call and :func:`after_attempt` after each one. Nothing here reads a clock or a
random source: the shell passes ``now`` and the jitter.

>>> from services.dispatcher.backoff import Breaker
>>> hold_until(Breaker(), paused_until=0.0, now=10.0, probe_taken=False) is None
True
>>> hold_until(Breaker(), paused_until=12.0, now=10.0, probe_taken=False)
12.0
"""

from __future__ import annotations

from services.dispatcher.backoff import Breaker, next_delay
from services.dispatcher.core import Outcome

#: An open breaker is looked at again no sooner than this (seconds).
MIN_RECHECK = 0.05


def hold_until(
    breaker: Breaker, paused_until: float, now: float, probe_taken: bool
) -> float | None:
    """None when a call to the endpoint may go out now; otherwise when to look again.

    A vendor's pause (``Retry-After``, ``X-RateLimit-Reset``) holds every call until it ends.
    An open breaker holds calls until its cooldown has passed; then it is half-open and lets
    one probe through per round (``probe_taken``: this round's probe already went).

    >>> b = Breaker(threshold=1, cooldown=10.0).failure(100.0)
    >>> hold_until(b, 0.0, 105.0, probe_taken=False)  # open: wait for the cooldown
    110.0
    >>> hold_until(b, 0.0, 110.0, probe_taken=False) is None  # half-open: one probe goes
    True
    >>> hold_until(b, 0.0, 110.0, probe_taken=True)  # the others wait a little
    110.05
    """
    if paused_until > now:
        return paused_until
    if breaker.state == "open" and (probe_taken or not breaker.allows(now)):
        return now + max(breaker.reopen_in(now), MIN_RECHECK)
    return None


def after_attempt(
    attempt: int,
    outcome: Outcome,
    *,
    now_ms: int,
    max_attempts: int,
    backoff_base: float,
    backoff_cap: float,
    jitter: float,
) -> Outcome:
    """A raw ``retry`` outcome of attempt number ``attempt`` (0-based) becomes a retry at a
    backoff time (never before the server's ``Retry-After``), or ``failed`` with reason
    ``retries_exhausted`` once ``max_attempts`` attempts were made. Other outcomes pass.

    >>> raw = Outcome("retry", 503, "crm", "HTTP 503", retry_at=30_000)
    >>> after_attempt(0, raw, now_ms=1_000, max_attempts=3, backoff_base=0.5,
    ...               backoff_cap=60.0, jitter=0.5).retry_at  # Retry-After 30 s wins
    31000
    >>> after_attempt(2, raw, now_ms=1_000, max_attempts=3, backoff_base=0.5,
    ...               backoff_cap=60.0, jitter=0.5).detail
    'retries_exhausted: HTTP 503'
    """
    if outcome.kind != "retry":
        return outcome
    if attempt + 1 >= max_attempts:
        return Outcome(
            "failed",
            outcome.http_status,
            outcome.endpoint,
            f"retries_exhausted: {outcome.detail}",
            dispatched_at=outcome.dispatched_at,
        )
    delay = next_delay(
        attempt,
        jitter,
        backoff_base,
        backoff_cap,
        outcome.retry_at / 1000 if outcome.retry_at else None,
    )
    return Outcome(
        "retry",
        outcome.http_status,
        outcome.endpoint,
        outcome.detail,
        retry_at=int(now_ms + delay * 1000),
    )
