"""Typed settings from the environment, one object per process.

Every variable is ``SEGFLOW_<FIELD>`` except the Kafka address, which also honours the
conventional ``KAFKA_BOOTSTRAP_SERVERS``. Secrets are ``SecretStr``: their value never
appears in ``repr``, logs or errors.

>>> s = Settings(bootstrap_servers="127.0.0.1:9092", hash_secret="s3cret")
>>> "s3cret" in repr(s)
False
>>> s.topic_prefix
'segflow.'
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]


class Settings(BaseSettings):
    """Connection, naming and security settings shared by every segflow process."""

    model_config = SettingsConfigDict(env_prefix="SEGFLOW_", extra="ignore", frozen=True)

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices(
            "bootstrap_servers", "SEGFLOW_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS"
        ),
    )
    topic_prefix: str = "segflow."
    schema_registry_url: str | None = None
    schema_registry_user: str | None = None
    schema_registry_password: SecretStr | None = None
    schemas_dir: Path = REPO_ROOT / "schemas"
    # Keyed hash for PII (emails). The default is for local demos only.
    hash_secret: SecretStr = SecretStr("segflow-local-development-only")
    # Extra librdkafka settings as "key=value,key=value" (e.g. security.protocol=SASL_SSL).
    kafka_extra: str = ""
    kafka_password: SecretStr | None = None
    metrics_port: int | None = None
    # Where the services' internal query endpoints (for the API gateway) bind when the
    # service leaves it at the loopback default. They have no authentication: widen it
    # (e.g. 0.0.0.0 in a container) only on a private network, as docker-compose.yml does.
    internal_api_host: str = "127.0.0.1"
    # This process's id within its service's consumer group ("0", "1", "pod-name"...): stable
    # across restarts, it names the transactional.id and the static group.instance.id, so a
    # restarted instance fences its predecessor and takes its partitions back at once. None:
    # each service's own default (one instance). "hostname": this host's name (a container's
    # or pod's: what `docker compose up --scale` replicas can tell apart).
    instance_id: str | None = None
    # How long the group waits for a silent (killed) member before moving its partitions, and
    # how long a dead instance's open transaction blocks readers of its outputs (read_committed).
    session_timeout_ms: int = 45000
    transaction_timeout_ms: int = 60000
    log_level: str = "INFO"
    log_format: str = "json"
    state_dir: Path = Path(".segflow")

    @field_validator("instance_id")
    @classmethod
    def _instance_from_hostname(cls, value: str | None) -> str | None:
        return socket.gethostname() if value == "hostname" else value

    def kafka_config(self) -> dict[str, Any]:
        """librdkafka settings common to producers, consumers and admin clients."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        for item in filter(None, (p.strip() for p in self.kafka_extra.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                from segflow.errors import ConfigError

                raise ConfigError(f"SEGFLOW_KAFKA_EXTRA: expected key=value, got {key!r}")
            conf[key.strip()] = value.strip()
        if self.kafka_password is not None:
            conf["sasl.password"] = self.kafka_password.get_secret_value()
        return conf
