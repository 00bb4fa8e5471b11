"""Kafka client retries: what is repeated, what is not, and how long it waits."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException
from tenacity import stop_after_attempt

from segflow.runtime.retry import kafka_retrying, retriable


def kafka_error(*, retriable: bool = False, abort: bool = False) -> KafkaException:
    return KafkaException(
        KafkaError(
            KafkaError._TIMED_OUT,
            "timed out",
            fatal=False,
            retriable=retriable,
            txn_requires_abort=abort,
        )
    )


def run(errors: list[BaseException], **kw: object) -> int:
    """Call a function that raises ``errors`` in turn, then succeeds; returns attempts made."""
    calls = 0
    for attempt in kafka_retrying("test", first=0, longest=0, **kw):  # type: ignore[arg-type]
        with attempt:
            calls += 1
            if calls <= len(errors):
                raise errors[calls - 1]
    return calls


def test_retriable_errors_are_repeated_until_the_call_succeeds() -> None:
    assert run([kafka_error(retriable=True)] * 3) == 4


def test_an_error_that_needs_an_abort_is_not_repeated() -> None:
    err = kafka_error(retriable=True, abort=True)
    assert not retriable(err)
    with pytest.raises(KafkaException) as caught:
        run([err])
    assert caught.value is err  # re-raised as it was, for the caller to abort


def test_a_non_retriable_error_and_other_exceptions_pass_straight_through() -> None:
    with pytest.raises(KafkaException):
        run([kafka_error(retriable=False)])
    with pytest.raises(ValueError):
        run([ValueError("bug")])


def test_stop_and_the_hook_before_each_retry() -> None:
    seen: list[BaseException] = []
    errors = [kafka_error(retriable=True)] * 5
    with pytest.raises(KafkaException):
        run(errors, stop=stop_after_attempt(3), before_retry=seen.append)
    assert seen == errors[:2]  # two retries after the first attempt, then the stop


def test_pauses_grow_exponentially_up_to_the_longest() -> None:
    retrying = kafka_retrying("test", first=0.05, longest=2.0)
    waits = []
    for n in range(1, 9):
        state = type("S", (), {"attempt_number": n})()
        waits.append(retrying.wait(state))  # type: ignore[arg-type]
    assert waits == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
