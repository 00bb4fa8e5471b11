"""A small client for a Confluent-compatible schema registry, over httpx.

Only two calls are needed: register a schema under a subject (returns its id) and fetch a
schema by id. Both are cached; credentials come from settings and are never logged.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx

from segflow.errors import ConfigError, RetryableError

if TYPE_CHECKING:
    from segflow.runtime.settings import Settings

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class RegistryClient:
    """Register and look up schemas in a Confluent-compatible registry."""

    def __init__(self, base_url: str, client: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = client or httpx.Client(timeout=10.0)
        self._ids: dict[tuple[str, str], int] = {}
        self._schemas: dict[int, dict[str, Any]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> RegistryClient:
        if not settings.schema_registry_url:
            raise ConfigError("SEGFLOW_SCHEMA_REGISTRY_URL is not set")
        auth = None
        if settings.schema_registry_user:
            password = settings.schema_registry_password
            auth = (settings.schema_registry_user, password.get_secret_value() if password else "")
        return cls(settings.schema_registry_url, httpx.Client(timeout=10.0, auth=auth))

    def register(self, subject: str, schema: dict[str, Any]) -> int:
        text = json.dumps(schema, separators=(",", ":"), sort_keys=True)
        cached = self._ids.get((subject, text))
        if cached is not None:
            return cached
        resp = self._call(
            "POST",
            f"/subjects/{subject}/versions",
            json={"schema": text, "schemaType": "AVRO"},
        )
        sid = int(resp["id"])
        self._ids[(subject, text)] = sid
        self._schemas[sid] = schema
        return sid

    def schema_by_id(self, sid: int) -> dict[str, Any]:
        cached = self._schemas.get(sid)
        if cached is None:
            resp = self._call("GET", f"/schemas/ids/{sid}")
            cached = json.loads(resp["schema"])
            self._schemas[sid] = cached
        return cached

    def _call(self, method: str, path: str, json: Any = None) -> dict[str, Any]:
        try:
            resp = self.client.request(
                method, self.base_url + path, json=json, headers={"Content-Type": CONTENT_TYPE}
            )
        except httpx.TransportError as exc:
            raise RetryableError(f"schema registry unreachable: {exc}") from exc
        if resp.status_code >= 500 or resp.status_code == 429:
            raise RetryableError(f"schema registry {method} {path}: HTTP {resp.status_code}")
        if resp.status_code >= 400:
            raise ConfigError(
                f"schema registry {method} {path}: HTTP {resp.status_code}: {resp.text[:200]}"
            )
        body: dict[str, Any] = resp.json()
        return body
