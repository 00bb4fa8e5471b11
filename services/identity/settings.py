"""The identity service's own settings, ``SEGFLOW_IDENTITY_*`` (pure: no Kafka, no I/O; moved
out of :mod:`services.identity.app`, which re-exports :class:`IdentitySettings`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.identity import core


class IdentitySettings(BaseSettings):
    """Rules and loop settings, from ``SEGFLOW_IDENTITY_*`` (lists as JSON)."""

    model_config = SettingsConfigDict(env_prefix="SEGFLOW_IDENTITY_", extra="ignore", frozen=True)

    max_future_skew_s: float = 3600.0
    dedup_window_days: float = 7.0
    limit_user_id: int = Field(default=1, ge=1)
    limit_email: int = Field(default=3, ge=1)
    limit_anonymous_id: int = Field(default=100, ge=1)
    limit_device_id: int = Field(default=20, ge=1)
    link_limit_anonymous_id: int = Field(default=1, ge=1)
    link_limit_device_id: int = Field(default=1, ge=1)
    exclusive: list[str] = ["user_id"]
    blocked_values: list[str] = sorted(core.DEFAULT_BLOCKED_VALUES)
    blocked_patterns: list[str] = list(core.DEFAULT_BLOCKED_PATTERNS)
    group_id: str | None = None  # default: <prefix>identity
    transactional_id: str | None = None  # default: <prefix>identity-0
    batch_size: int = 2000
    hash_cache_size: int = 500_000
    http_port: int | None = None  # internal query endpoint (services/identity/api.py)
    #: all: one process does everything; front / writer: the split roles (issue 15), also
    #: ``python -m services.identity --role``
    role: Literal["all", "front", "writer"] = "all"
    #: an input partition read to its end with nothing new for this long is not waited for
    #: until its next event (services/identity/order.py; Kafka Streams' max.task.idle.ms)
    order_idle_ms: int = Field(default=2000, ge=0)

    def rules(self) -> core.Rules:
        return core.Rules(
            limits={
                "user_id": self.limit_user_id,
                "email": self.limit_email,
                "anonymous_id": self.limit_anonymous_id,
                "device_id": self.limit_device_id,
            },
            exclusive=frozenset(self.exclusive),
            link_limits={
                "anonymous_id": self.link_limit_anonymous_id,
                "device_id": self.link_limit_device_id,
            },
            blocked_values=frozenset(v.strip().lower() for v in self.blocked_values),
            blocked_patterns=tuple(self.blocked_patterns),
            dedup_window_ms=int(self.dedup_window_days * core.DAY_MS),
        )
