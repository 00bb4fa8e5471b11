"""Retry timing: full-jitter backoff, Retry-After, rate-limit headers, circuit breaker."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.dispatcher.backoff import (
    Breaker,
    ceiling,
    next_delay,
    parse_retry_after,
    rate_limit_pause,
)

bases = st.floats(0.01, 10)
caps = st.floats(0.1, 600)


@settings(max_examples=200, deadline=None)
@given(bases, caps, st.integers(0, 200))
def test_the_delay_ceiling_never_decreases_and_is_capped(base: float, cap: float, n: int) -> None:
    assert ceiling(n, base, cap) <= ceiling(n + 1, base, cap) <= cap


@settings(max_examples=200, deadline=None)
@given(bases, caps, st.integers(0, 200), st.floats(0, 1, exclude_max=True))
def test_a_jittered_delay_stays_under_its_ceiling(
    base: float, cap: float, n: int, u: float
) -> None:
    d = next_delay(n, u, base, cap)
    assert 0 <= d <= ceiling(n, base, cap) <= cap


@settings(max_examples=200, deadline=None)
@given(bases, caps, st.integers(0, 50), st.floats(0, 1, exclude_max=True), st.floats(0, 7200))
def test_retry_after_is_honoured_up_to_its_bound(
    base: float, cap: float, n: int, u: float, retry_after: float
) -> None:
    d = next_delay(n, u, base, cap, retry_after=retry_after, max_retry_after=3600)
    assert d >= min(retry_after, 3600)
    assert d <= max(cap, min(retry_after, 3600))


def test_the_schedule_on_a_fake_clock_doubles_until_the_cap() -> None:
    # with the jitter at its top, attempts wait 0.5, 1, 2, 4, ... seconds, capped at 10
    waits = [next_delay(n, 0.999999, base=0.5, cap=10.0) for n in range(8)]
    assert [round(w, 3) for w in waits] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_retry_after_and_rate_limit_headers_parse() -> None:
    assert parse_retry_after("120", 0) == 120
    assert parse_retry_after("soon", 0) is None
    assert rate_limit_pause({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "2"}, 0) == 2
    assert rate_limit_pause({"X-RateLimit-Remaining": "5", "X-RateLimit-Reset": "2"}, 0) is None


def test_breaker_opens_after_the_threshold_and_probes_after_the_cooldown() -> None:
    b = Breaker(threshold=3, cooldown=10)
    for t in range(2):
        b = b.failure(t)
    assert b.state == "closed" and b.allows(2)
    b = b.failure(2)
    assert b.state == "open" and not b.allows(11.9) and b.allows(12)
    assert b.reopen_in(7) == 5
    assert b.success().state == "closed"
