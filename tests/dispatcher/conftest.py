"""Fixtures for the dispatcher tests: the local HTTP receiver and SMTP server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from segflow.receiver import Receiver, SMTPReceiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def smtp_server() -> Iterator[SMTPReceiver]:
    s = SMTPReceiver().start()
    try:
        yield s
    finally:
        s.stop()
