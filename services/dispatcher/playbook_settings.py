"""Where the dispatcher's playbooks are, ``SEGFLOW_DISPATCHER_PLAYBOOKS`` (pure: no Kafka, no
HTTP client). :class:`~services.dispatcher.settings.DispatcherSettings` inherits it; ``segflow
replay`` reads it alone, so a replay loads none of the dispatcher's I/O modules."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from services.dispatcher.playbooks import DEFAULT_DIR


class PlaybookSettings(BaseSettings):
    """The playbook files the dispatcher runs (``SEGFLOW_DISPATCHER_PLAYBOOKS``)."""

    model_config = SettingsConfigDict(env_prefix="SEGFLOW_DISPATCHER_", extra="ignore", frozen=True)

    playbooks: str = str(DEFAULT_DIR)  # files or folders, comma-separated
