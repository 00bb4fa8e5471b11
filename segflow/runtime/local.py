"""Which broker a command talks to: the one the user configured, or segflow's local one."""

from __future__ import annotations

import os

from segflow.runtime.settings import Settings


def external_bootstrap() -> str | None:
    """The broker address the user configured explicitly, if any."""
    return os.environ.get("SEGFLOW_BOOTSTRAP_SERVERS") or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")


def settings_for(port: int) -> Settings:
    """Settings for a command: the configured broker if there is one, else the local broker
    on ``port`` (``--port``)."""
    if external_bootstrap():
        return Settings()
    return Settings(bootstrap_servers=f"127.0.0.1:{port}")
