"""The dispatcher's settings (``SEGFLOW_DISPATCHER_*``), the asyncio loop its calls run on and
the adapters built from the settings. Moved out of ``app.py`` unchanged (which re-exports them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

import httpx
from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from services.dispatcher.adapters import (
    AiohttpClient,
    Contacts,
    HttpClient,
    PatternContacts,
    Router,
    SignedWebhook,
    SMTPEmail,
)
from services.dispatcher.playbook_settings import PlaybookSettings
from services.dispatcher.playbooks import Book
from services.dispatcher.vendors import (
    VendorSettings,
    check_routes,
    crm_adapter,
    email_adapter,
    with_local_stand_ins,
)

T = TypeVar("T")


class DispatcherSettings(VendorSettings, PlaybookSettings):
    """``SEGFLOW_DISPATCHER_*`` settings; every endpoint defaults to 127.0.0.1 (vendor ids and
    delivery policies: :class:`~services.dispatcher.vendors.VendorSettings`)."""

    model_config = SettingsConfigDict(env_prefix="SEGFLOW_DISPATCHER_", extra="ignore", frozen=True)

    # playbooks (files or folders, comma-separated): from PlaybookSettings
    clock: Literal["wall", "event"] = "wall"
    #: ``clock: event`` (services/dispatcher/README.md, Input order): how long (ms) a
    #: partition's identified events must have been read to their end with nothing new before
    #: a change stops waiting for them; and its segment changes, before its waiting events
    #: (and timers) stop waiting for them.
    order_idle_ms: int = 45000
    changes_idle_ms: int = 600000
    group_id: str = "segflow-dispatcher"
    transactional_id: str | None = None
    crm_kind: Literal["hubspot", "salesforce", "marketo"] = "hubspot"
    crm_base_url: str = "http://127.0.0.1:8725"
    crm_token: SecretStr | None = None
    email_base_url: str = "http://127.0.0.1:8725"
    email_api_key: SecretStr | None = None
    email_from: str = "retention@example.invalid"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 8025
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    webhook_url: str = "http://127.0.0.1:8725/webhook"
    webhook_secret: SecretStr = SecretStr("segflow-local-webhook-secret")
    contact_pattern: str | None = None  # e.g. "{customer_id}@example.invalid" (demo only)
    http_timeout: float = 5.0
    http_transport: Literal["aiohttp", "httpx"] = "aiohttp"  # aiohttp directly, or httpx's pool
    concurrency: int = 256
    max_batch: int = 2000
    promote_batch: int = 5000
    backoff_base: float = 0.5
    backoff_cap: float = 300.0
    max_attempts: int = 200
    breaker_threshold: int = 5
    breaker_cooldown: float = 30.0
    tick_interval: float = 0.2
    batch_size: int = 2000
    api_port: int | None = None
    cache_size: int = 200_000  # decoded customers kept in memory
    playbook_reload_interval: float = 2.0  # seconds between mtime polls of the playbook files
    pre_commit_delay: float = 0.0  # fault injection for tests (widens the open transaction)


class AsyncRunner:
    """One asyncio loop in a background thread; the synchronous loop submits batches to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, daemon=True, name="dispatcher-io"
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the I/O loop without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def build_router(
    cfg: DispatcherSettings,
    runner: AsyncRunner,
    contacts: Contacts | None = None,
    playbooks: Book | None = None,
) -> tuple[Router, HttpClient]:
    """Adapters for every channel on one shared connection pool (aiohttp's by default).

    With ``playbooks``, refuses to start when a routed step has no vendor id or a routed real
    endpoint no credentials (:func:`~services.dispatcher.vendors.check_routes`)."""
    if playbooks is not None:
        cfg = with_local_stand_ins(cfg, cfg, playbooks)  # type: ignore[assignment]
        check_routes(cfg, playbooks)

    async def make() -> HttpClient:
        if cfg.http_transport == "aiohttp":
            return AiohttpClient(cfg.concurrency, cfg.http_timeout)
        limits = httpx.Limits(
            max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency
        )
        return httpx.AsyncClient(timeout=cfg.http_timeout, limits=limits)

    client = runner.run(make())
    book = contacts if contacts is not None else PatternContacts(cfg.contact_pattern)

    def secret(value: SecretStr | None) -> str | None:
        return value.get_secret_value() if value is not None else None

    router = Router(
        crm=crm_adapter(cfg, client, cfg.crm_kind, cfg.crm_base_url, secret(cfg.crm_token)),
        email=email_adapter(
            cfg, client, cfg.email_base_url, secret(cfg.email_api_key), cfg.email_from, book
        ),
        smtp=SMTPEmail(
            cfg.smtp_host,
            cfg.smtp_port,
            cfg.email_from,
            book,
            cfg.smtp_user,
            secret(cfg.smtp_password),
            cfg.http_timeout,
            cfg.smtp_starttls,
            on_ambiguous=cfg.smtp_on_ambiguous,
        ),
        webhook=SignedWebhook(
            client, cfg.webhook_url, cfg.webhook_secret.get_secret_value().encode()
        ),
    )
    return router, client
