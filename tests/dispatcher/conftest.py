"""Fixtures for the dispatcher tests: the local HTTP receiver and SMTP server."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from receiver import Receiver, SMTPReceiver  # noqa: E402


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
