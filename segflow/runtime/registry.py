"""Schema ids from a Confluent-compatible schema registry, through the client that ships with
confluent-kafka (``confluent_kafka.schema_registry``).

segflow needs two calls: register a schema under a subject (its id goes in front of every
record) and fetch a writer's schema by id. The library caches both, retries transient
failures, and speaks the registry's authentication (basic auth here; bearer/OAuth through
``SEGFLOW_SCHEMA_REGISTRY_EXTRA``-style settings if ever needed). Credentials come from
settings and are never logged. This module maps the library's errors onto segflow's:
unreachable or 5xx/429 → :class:`RetryableError`, any other refusal → :class:`ConfigError`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from segflow.errors import ConfigError, RetryableError

if TYPE_CHECKING:
    from segflow.runtime.settings import Settings


class RegistryClient:
    """Register and look up Avro schemas in a Confluent-compatible registry."""

    def __init__(self, base_url: str, basic_auth: tuple[str, str] | None = None) -> None:
        conf: dict[str, Any] = {"url": base_url.rstrip("/"), "timeout": 10}
        if basic_auth is not None:
            conf["basic.auth.user.info"] = f"{basic_auth[0]}:{basic_auth[1]}"
        self.base_url = conf["url"]
        self.client = SchemaRegistryClient(conf)

    @classmethod
    def from_settings(cls, settings: Settings) -> RegistryClient:
        if not settings.schema_registry_url:
            raise ConfigError("SEGFLOW_SCHEMA_REGISTRY_URL is not set")
        auth = None
        if settings.schema_registry_user:
            password = settings.schema_registry_password
            auth = (settings.schema_registry_user, password.get_secret_value() if password else "")
        return cls(settings.schema_registry_url, auth)

    def register(self, subject: str, schema: dict[str, Any]) -> int:
        text = json.dumps(schema, separators=(",", ":"), sort_keys=True)
        return int(
            self._call(
                f"register under {subject}",
                self.client.register_schema,
                subject,
                Schema(text, "AVRO"),
            )
        )

    def schema_by_id(self, sid: int) -> dict[str, Any]:
        found = self._call(f"schema {sid}", self.client.get_schema, sid)
        parsed: dict[str, Any] = json.loads(found.schema_str)
        return parsed

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except SchemaRegistryError as exc:
            status = exc.http_status_code
            message = f"schema registry {self.base_url}: {what}: HTTP {status}: {exc.error_message}"
            if status >= 500 or status == 429 or status < 0:
                raise RetryableError(message) from exc
            raise ConfigError(message) from exc
        except OSError as exc:  # connection refused, DNS, TLS
            raise RetryableError(f"schema registry {self.base_url} unreachable: {exc}") from exc
        except Exception as exc:  # the library's HTTP client raises its own transport errors
            if type(exc).__module__.startswith(("httpx", "httpcore")):
                raise RetryableError(f"schema registry {self.base_url} unreachable: {exc}") from exc
            raise
