"""The errors segflow raises at its edges, under one root.

::

    SegflowError
     ├── ConfigError              bad settings or definition files: fix and restart
     ├── BrokerError              the local broker could not be installed, started or reached
     ├── RetryableError           try again later; carries ``retry_after`` (seconds) if known
     ├── PermanentError           will never succeed as is (e.g. HTTP 400 from a CRM)
     └── PoisonMessage            one input record cannot be processed: it goes to the DLQ
          ├── DecodeError         bytes are not Confluent-framed Avro of a known schema
          └── InvalidRecord       decoded, but breaks the event contract

Business outcomes (a suppressed send, a duplicate event) are events, not exceptions.
"""

from __future__ import annotations


class SegflowError(Exception):
    """Root of every error segflow raises on purpose."""


class ConfigError(SegflowError):
    """Settings or a definition file are wrong; the message says where."""


class BrokerError(SegflowError):
    """The local Kafka broker could not be installed, started, stopped or reached."""


class RetryableError(SegflowError):
    """A transient failure; retry after ``retry_after`` seconds when given."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(SegflowError):
    """A failure that retrying will not fix."""


class PoisonMessage(SegflowError):
    """One input record cannot be processed; ``reason`` is the DLQ reason code."""

    reason = "poison"

    def __init__(self, detail: str, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if reason is not None:
            self.reason = reason


class DecodeError(PoisonMessage):
    """The bytes are not Confluent-framed Avro of a schema we know."""

    reason = "undecodable"


class InvalidRecord(PoisonMessage):
    """The record decoded but breaks the event contract."""

    reason = "invalid_record"
