"""In-process retries of Kafka client calls, with tenacity.

A transaction commit, a watermark query right after a topic was created, a changelog restore
while a partition has no leader yet: librdkafka reports these as *retriable* errors, and the
caller tries again after a short, growing pause. A transaction that must be aborted is never
retried here (the caller aborts and rewinds). Every retry is logged with what was retried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_never,
    wait_exponential,
)
from tenacity.stop import StopBaseT

log = logging.getLogger("segflow.runtime.retry")


def retriable(exc: BaseException) -> bool:
    """A Kafka error the client may simply repeat (not one that requires an abort)."""
    if not isinstance(exc, KafkaException) or not exc.args:
        return False
    err = exc.args[0]
    if not isinstance(err, KafkaError):
        return False
    return bool(err.retriable()) and not err.txn_requires_abort()


def kafka_retrying(
    what: str,
    *,
    when: Callable[[BaseException], bool] = retriable,
    stop: StopBaseT = stop_never,
    first: float = 0.05,
    longest: float = 2.0,
    before_retry: Callable[[BaseException], Any] | None = None,
) -> Retrying:
    """Retry ``what`` while ``when(exception)``: exponential pauses from ``first`` to
    ``longest`` seconds, until ``stop``; the last exception is re-raised as it was.

    >>> calls = []
    >>> for attempt in kafka_retrying("demo", when=lambda e: isinstance(e, OSError), first=0):
    ...     with attempt:
    ...         calls.append(1)
    ...         if len(calls) < 3:
    ...             raise OSError("not yet")
    >>> len(calls)
    3
    """

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            f"{what} retry",
            extra={"fields": {"attempt": state.attempt_number, "error": str(exc)}},
        )
        if before_retry is not None and exc is not None:
            before_retry(exc)

    return Retrying(
        retry=retry_if_exception(when),
        wait=wait_exponential(multiplier=first, min=first, max=longest),
        stop=stop,
        before_sleep=log_retry,
        reraise=True,
    )
