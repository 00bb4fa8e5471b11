"""Where the services' internal query endpoints listen: loopback unless told otherwise."""

from __future__ import annotations

import pytest

from segflow.runtime.internal_api import Routes, serve


@pytest.mark.parametrize(
    ("env", "given", "expected"),
    [
        (None, "127.0.0.1", "127.0.0.1"),  # the default: nothing outside the machine sees it
        ("0.0.0.0", "127.0.0.1", "0.0.0.0"),  # a container on the compose network
        ("0.0.0.0", "127.0.0.2", "127.0.0.2"),  # an explicit host from the caller wins
    ],
)
def test_bind_host(
    monkeypatch: pytest.MonkeyPatch, env: str | None, given: str, expected: str
) -> None:
    if env is None:
        monkeypatch.delenv("SEGFLOW_INTERNAL_API_HOST", raising=False)
    else:
        monkeypatch.setenv("SEGFLOW_INTERNAL_API_HOST", env)
    server = serve(Routes("t"), 0, given)
    try:
        assert server.server_address[0] == expected
    finally:
        server.stop()
