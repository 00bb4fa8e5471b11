"""The collector's HTTP server: Segment's tracking API in front of ``segflow.events``.

Endpoints (``POST``, JSON, optionally ``Content-Encoding: gzip``)::

    /v1/identify /v1/track /v1/page /v1/screen /v1/alias /v1/group   one call
    /v1/batch  (and /v1/import)                                      {"batch": [calls]}
    /v2/events  /v2/bulkevents   mParticle's server-to-server API: one batch, or a list
                                 (segflow.collector.mparticle; the API key is the write key,
                                 the secret is not checked; 202 once Kafka acknowledged)
    GET /metrics   Prometheus        GET /health   200 while Kafka takes writes

Authentication is the write key, as Segment's SDKs send it: HTTP basic with the key as user
name and an empty password (``Authorization: Basic base64("KEY:")``), or ``writeKey`` in the
body. Answers:

* ``200 {"success": true}`` only after Kafka acknowledged every event of the request;
* ``400`` with ``errors: [{index, messageId, error}]`` naming each message that was refused
  and what was expected (the request's valid messages were written and acknowledged: the
  answer says how many); also for a body that is not JSON, or not gzip when it says so;
* ``401`` unknown or missing write key; ``413`` body over the limit (compressed or not);
  ``429`` over the write key's messages-per-second budget, with ``Retry-After``;
* ``503`` with ``Retry-After`` when Kafka did not acknowledge: nothing of the request is
  visible to ``read_committed`` readers, so the SDK's retry neither loses nor doubles events.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import math
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import CancelledError, Future
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from segflow.collector import core, mparticle
from segflow.collector.writer import KafkaUnavailable, KafkaWriter
from segflow.errors import ConfigError, InvalidRecord
from segflow.events import EVENT_TYPES as _KNOWN
from segflow.runtime.kafka import ensure_topics, wait_for_broker
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS
from segflow.sim.identities import event_key

log = logging.getLogger("segflow.collector")

REQUESTS = Counter(
    "segflow_collector_requests_total",
    "HTTP requests by source, call and status",
    ["source", "call", "status"],
)
MESSAGES = Counter(
    "segflow_collector_messages_total",
    "Messages by source and outcome (accepted, rejected, unavailable, rate_limited)",
    ["source", "outcome"],
)
EVENT_TYPES = Counter(
    "segflow_collector_events_total",
    "Accepted events by segflow event type (known or other)",
    ["event_type"],
)
REQUEST_SECONDS = Histogram(
    "segflow_collector_request_seconds",
    "Request handling time, Kafka acknowledgement included",
    ["call"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


class Writer(Protocol):
    """Where accepted records go (:class:`KafkaWriter`; tests may pass a double)."""

    @property
    def healthy(self) -> bool: ...

    def start(self) -> None: ...

    def submit(self, records: list[tuple[bytes, bytes]]) -> Future[None]: ...

    def stop(self) -> None: ...


CALLS = ("identify", "track", "page", "screen", "alias", "group", "batch")


class CollectorSettings(BaseSettings):
    """``SEGFLOW_COLLECTOR_*``. ``write_keys``: ``source=KEY,other=KEY2`` (or bare keys)."""

    model_config = SettingsConfigDict(env_prefix="SEGFLOW_COLLECTOR_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = 8088
    write_keys: SecretStr | None = None
    #: Track event name -> event type, on top of Segment's spec'd names (JSON object).
    event_map: dict[str, str] = Field(default_factory=dict)
    max_body_bytes: int = Field(default=500 * 1024, ge=1024)  # Segment's batch limit
    max_call_bytes: int = Field(default=32 * 1024, ge=256)  # Segment's per-call limit
    rate_per_key: float = Field(default=20_000.0, gt=0)  # messages/s per write key
    burst_per_key: float = Field(default=40_000.0, gt=0)
    skew_tolerance_ms: int = Field(default=1000, ge=0)
    max_future_s: float = 3600.0
    commit_timeout_s: float = Field(default=10.0, gt=0)
    request_timeout_s: float = Field(default=20.0, gt=0)
    transactional_id: str | None = None  # default <prefix>collector-<port>

    @field_validator("event_map", mode="before")
    @classmethod
    def _json(cls, value: Any) -> Any:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else {}
        return value

    def keys(self) -> dict[str, str]:
        """write key -> source name (the name, never the key, labels metrics)."""
        if self.write_keys is None:
            return {}
        out: dict[str, str] = {}
        items = [p.strip() for p in self.write_keys.get_secret_value().split(",") if p.strip()]
        for i, item in enumerate(items):
            name, sep, key = item.partition("=")
            if not sep:
                name, key = f"source{i}" if len(items) > 1 else "default", item
            if not key.strip():
                raise ConfigError(f"SEGFLOW_COLLECTOR_WRITE_KEYS: source {name!r} has no key")
            out[key.strip()] = name.strip()
        return out

    def mapping(self) -> core.MappingConfig:
        return core.MappingConfig(
            events=core.EventMap(self.event_map),
            skew_tolerance_ms=self.skew_tolerance_ms,
            max_future_ms=int(self.max_future_s * 1000),
        )


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    headers = {}
    if "retry_after" in extra:
        headers["Retry-After"] = str(extra.pop("retry_after"))
    return web.json_response(
        {"code": code, "message": message, **extra}, status=status, headers=headers
    )


class Collector:
    """The aiohttp application plus its Kafka writer."""

    def __init__(
        self, settings: Settings, config: CollectorSettings, writer: Writer | None = None
    ) -> None:
        self.settings = settings
        self.config = config
        self.keys = config.keys()
        if not self.keys:
            raise ConfigError(
                "the collector needs at least one write key: set SEGFLOW_COLLECTOR_WRITE_KEYS "
                "(e.g. web=KEY1,backend=KEY2) or pass --write-key"
            )
        self.mapping = config.mapping()
        self.serde = Serde.from_settings(settings)
        self.buckets = {
            key: core.TokenBucket(config.rate_per_key, config.burst_per_key) for key in self.keys
        }
        self.writer: Writer = writer or KafkaWriter(
            settings,
            TOPICS.events.name(settings),
            config.transactional_id or f"{settings.topic_prefix}collector-{config.port}",
            commit_timeout=config.commit_timeout_s,
        )

    # -- lifecycle ------------------------------------------------------------------------
    def start_writer(self) -> None:
        if isinstance(self.writer, KafkaWriter):
            wait_for_broker(self.settings)  # a BrokerError naming the address, not a traceback
            ensure_topics(self.settings, topics=[TOPICS.events])
        self.writer.start()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes + 1)
        for call in CALLS:
            app.router.add_post(f"/v1/{call}", self._handler(call))
        app.router.add_post("/v1/import", self._handler("batch"))
        app.router.add_post("/v2/events", self._handler("mparticle"))
        app.router.add_post("/v2/bulkevents", self._handler("mparticle_bulk"))
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        return app

    def runner(self) -> web.AppRunner:
        # Bodies are decompressed here, under the size limit (a gzip bomb stays a 413).
        return web.AppRunner(self.app(), access_log=None, auto_decompress=False)

    # -- handlers -------------------------------------------------------------------------
    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, _request: web.Request) -> web.Response:
        ok = self.writer.healthy
        return web.json_response(
            {"kafka": "ok" if ok else "unavailable"}, status=200 if ok else 503
        )

    def _handler(self, call: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            started = time.perf_counter()
            source = "unknown"
            try:
                response, source = await self._handle(call, request)
            except web.HTTPRequestEntityTooLarge:
                response = _error(
                    413,
                    "payload_too_large",
                    f"the body is over {self.config.max_body_bytes} bytes; "
                    "expected at most that (send smaller batches)",
                )
            REQUESTS.labels(source, call, str(response.status)).inc()
            REQUEST_SECONDS.labels(call).observe(time.perf_counter() - started)
            return response

        return handle

    def _auth(self, request: web.Request, body: Any) -> tuple[str, str] | None:
        """The write key and its source name, or None."""
        header = request.headers.get("Authorization", "")
        key: str | None = None
        if header[:6].lower() == "basic ":
            try:
                user = base64.b64decode(header[6:].strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
            key = user.partition(":")[0]
        elif isinstance(body, dict) and isinstance(body.get("writeKey"), str):
            key = body["writeKey"]
        if not key:
            return None
        for known, source in self.keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                return known, source
        return None

    async def _body(self, request: web.Request, limit: int) -> bytes | web.Response:
        raw = await request.read()
        encoding = request.headers.get("Content-Encoding", "identity").lower().strip()
        if encoding in ("gzip", "x-gzip"):
            inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            try:
                data = inflater.decompress(raw, limit + 1)
            except zlib.error:
                return _error(
                    400, "invalid_gzip", "Content-Encoding says gzip but the body is not gzip data"
                )
            if len(data) > limit or inflater.unconsumed_tail:
                return _error(
                    413,
                    "payload_too_large",
                    f"the decompressed body is over {limit} bytes; expected at most that",
                )
            return data
        if encoding not in ("identity", ""):
            return _error(
                415, "unsupported_encoding", f"Content-Encoding {encoding!r}; expected gzip or none"
            )
        if len(raw) > limit:
            return _error(
                413, "payload_too_large", f"the body is over {limit} bytes; expected at most that"
            )
        return raw

    async def _handle(self, call: str, request: web.Request) -> tuple[web.Response, str]:
        limit = (
            self.config.max_body_bytes
            if call in ("batch", "mparticle", "mparticle_bulk")
            else self.config.max_call_bytes
        )
        data = await self._body(request, limit)
        if isinstance(data, web.Response):
            return data, "unknown"
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(
                400,
                "invalid_json",
                f"the body is not JSON ({exc}); expected a JSON "
                'object (a Segment call, or {"batch": [calls]} for /v1/batch)',
            ), "unknown"
        auth = self._auth(request, body)
        if auth is None:
            return _error(
                401,
                "unauthorized",
                "expected a configured write key: HTTP basic auth with the key as "
                "user name and an empty password, or writeKey in the body",
            ), "unknown"
        key, source = auth
        received_at = int(time.time() * 1000)
        try:
            if call.startswith("mparticle"):
                events, rejected = mparticle.map_batches(
                    body, call == "mparticle_bulk", received_at, self.mapping
                )
            else:
                events, rejected = core.map_request(body, call, received_at, self.mapping)
        except core.MessageError as exc:
            MESSAGES.labels(source, "rejected").inc()
            return _error(400, "invalid_request", str(exc)), source

        if events:
            bucket = self.buckets[key]
            now = time.monotonic()
            if not bucket.take(len(events), now):
                wait = bucket.wait_for(len(events), now)
                MESSAGES.labels(source, "rate_limited").inc(len(events))
                if math.isinf(wait):
                    return _error(
                        429,
                        "rate_limited",
                        f"{len(events)} messages exceed this write key's burst of "
                        f"{bucket.burst:.0f}; expected smaller batches",
                        retry_after=1,
                    ), source
                return _error(
                    429,
                    "rate_limited",
                    f"over {bucket.rate:.0f} messages/s for this write key; "
                    f"retry after {wait:.1f}s",
                    retry_after=max(1, math.ceil(wait)),
                ), source

        records: list[tuple[bytes, bytes]] = []
        for i, event in enumerate(events):
            try:
                records.append((event_key(event).encode(), self.serde.encode(TOPICS.events, event)))
            except InvalidRecord as exc:  # the mapping guards against this; never silent
                rejected.append(core.Rejected(i, event["event_id"], exc.detail))
        if records:
            error = await self._write(records)
            if error is not None:
                MESSAGES.labels(source, "unavailable").inc(len(records))
                return _error(
                    503,
                    "kafka_unavailable",
                    f"{error}; nothing of this request was written, retry it",
                ), source
            MESSAGES.labels(source, "accepted").inc(len(records))
            for event in events:
                kind = event["event_type"]
                EVENT_TYPES.labels(kind if kind in _KNOWN else "other").inc()
        if rejected:
            MESSAGES.labels(source, "rejected").inc(len(rejected))
            return _error(
                400,
                "invalid_messages",
                f"{len(rejected)} of {len(rejected) + len(records)} messages rejected "
                f"(the other {len(records)} were accepted): "
                + "; ".join(f"#{r.index} ({r.message_id}): {r.error}" for r in rejected[:3]),
                accepted=len(records),
                errors=[r.to_json() for r in rejected],
            ), source
        status = 202 if call.startswith("mparticle") else 200  # as each vendor answers
        return web.json_response({"success": True}, status=status), source

    async def _write(self, records: list[tuple[bytes, bytes]]) -> str | None:
        """Hand the records to the writer; None once Kafka acknowledged them, else why not."""
        future = self.writer.submit(records)
        wrapped = asyncio.wrap_future(future)
        try:
            await asyncio.wait_for(asyncio.shield(wrapped), self.config.request_timeout_s)
            return None
        except TimeoutError:
            if future.cancel():
                return "Kafka did not take the events in time"
            try:  # already in a transaction: its outcome decides the answer
                await wrapped
                return None
            except (KafkaUnavailable, CancelledError) as exc:
                return str(exc)
        except KafkaUnavailable as exc:
            return str(exc)


async def serve(collector: Collector, stop: asyncio.Event, ready: Callable[[int], None]) -> None:
    """Run until ``stop`` is set; ``ready(port)`` once listening."""
    runner = collector.runner()
    await runner.setup()
    site = web.TCPSite(runner, collector.config.host, collector.config.port, backlog=1024)
    await site.start()
    port = runner.addresses[0][1]
    ready(port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run(settings: Settings, config: CollectorSettings) -> int:
    """Serve until SIGINT/SIGTERM (``segflow collect`` and ``python -m segflow.collector``)."""
    import signal

    collector = Collector(settings, config)
    collector.start_writer()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(port: int) -> None:
            print(
                f"collector listening on http://{config.host}:{port}/v1 "
                f"({len(collector.keys)} write key(s); sources "
                f"{', '.join(sorted(set(collector.keys.values())))}); metrics /metrics; "
                f"events to {TOPICS.events.name(settings)}",
                flush=True,
            )

        await serve(collector, stop, ready)

    try:
        asyncio.run(main())
    finally:
        collector.writer.stop()
    return 0


class Background:
    """The collector served from a thread of its own (tests, benchmarks, the demo):
    ``with Background(Collector(settings, config)) as bg:`` then post to ``bg.url``."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="collector-http", daemon=True)
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.collector.config.host}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()

            def ready(port: int) -> None:
                self.port = port
                self._ready.set()

            await serve(self.collector, self._stop, ready)

        self._loop.run_until_complete(main())

    def __enter__(self) -> Background:
        self.collector.start_writer()
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the collector did not start listening within 30 s")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)
        self.collector.writer.stop()
