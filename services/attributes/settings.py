"""The attributes service's own settings, ``SEGFLOW_ATTRIBUTES_*`` (pure: no Kafka, no I/O;
moved out of :mod:`services.attributes.app`, which re-exports :class:`AttributesConfig`)."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class AttributesConfig(BaseSettings):
    """``SEGFLOW_ATTRIBUTES_*`` settings."""

    model_config = SettingsConfigDict(env_prefix="SEGFLOW_ATTRIBUTES_", extra="ignore")

    group_id: str = "attributes"
    instance: str = "attributes-0"
    #: Comma-separated PII traits stored in clear anyway (e.g. "first_name" for templates).
    plain_traits: str = ""
    batch_size: int = 2000
    tick_interval: float = 1.0
