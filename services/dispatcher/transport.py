"""What every adapter shares: the HTTP client protocol (``AiohttpClient`` on aiohttp's pool, or
an ``httpx.AsyncClient``), the outcome of a call (:class:`Sent`) and its errors
(:class:`CallFailed` retryable, :class:`Rejected` permanent), the ``Contacts`` and ``Adapter``
protocols, and the request/answer helpers (idempotency header, classification of answers,
ambiguity). Moved out of ``adapters.py`` unchanged (which re-exports every public name).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx

from segflow.errors import PermanentError, RetryableError
from services.dispatcher.backoff import parse_retry_after, rate_limit_pause
from services.dispatcher.core import Request

IDEMPOTENCY_HEADER = "Idempotency-Key"


class RawHeaders:
    """Response headers as raw ``(name, value)`` byte pairs (what :func:`classify` reads)."""

    __slots__ = ("raw",)

    def __init__(self, raw: Any) -> None:
        self.raw = raw


class RawResponse:
    """The part of a response the adapters read: the status and the raw headers."""

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status_code: int, raw_headers: Any, content: bytes = b"") -> None:
        self.status_code = status_code
        self.headers = RawHeaders(raw_headers)
        self.content = content


class HttpClient(Protocol):
    """What the adapters call: an ``httpx.AsyncClient`` (tests use its ``MockTransport``) or
    :class:`AiohttpClient`. Failures raise httpx's ``TimeoutException`` / ``TransportError``."""

    async def request(
        self,
        method: str,
        url: Any,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any: ...

    async def post(
        self, url: Any, *, content: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> Any: ...

    async def aclose(self) -> None: ...


class AiohttpClient:
    """The adapters' calls straight on aiohttp's connection pool (the default transport).

    httpcore's async pool spends milliseconds of CPU per request once hundreds of requests
    wait on one pool (measured: 9 ms/request at 64 concurrent). An httpx client on an aiohttp
    transport cut that to ~1 ms of CPU per action, half of it in httpx's request building,
    cookie and URL handling. This client skips httpx: it builds the body and headers once,
    sends them with aiohttp (no cookie jar) and returns a :class:`RawResponse`. Errors map to
    httpx's exception types, so the adapters treat both clients alike.
    """

    def __init__(self, limit: int = 256, timeout: float = 5.0) -> None:
        self.limit = limit
        self.timeout = timeout
        self._session: Any = None

    def _open(self) -> Any:
        import aiohttp

        if self._session is None:  # created inside the running loop, on first use
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.limit),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def request(
        self,
        method: str,
        url: Any,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
    ) -> RawResponse:
        import aiohttp

        hdrs = dict(headers or {})
        if json is not None:
            content = _json_bytes(json)
            hdrs.setdefault("Content-Type", "application/json")
        session = self._open()
        try:
            async with session.request(
                method, str(url), headers=hdrs, data=content, allow_redirects=False
            ) as r:
                body = await r.read()
                return RawResponse(r.status, r.raw_headers, body)
        except aiohttp.ConnectionTimeoutError as exc:  # never sent: not ambiguous
            raise httpx.ConnectTimeout(str(exc) or "connect timeout") from exc
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "timeout") from exc
        except aiohttp.ClientConnectorError as exc:  # no connection: nothing was sent
            raise httpx.ConnectError(str(exc)) from exc
        except aiohttp.ClientConnectionError as exc:  # dropped after sending: ambiguous
            raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
        except aiohttp.ClientError as exc:
            raise httpx.TransportError(str(exc)) from exc

    async def post(
        self, url: Any, *, content: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> RawResponse:
        return await self.request("POST", url, content=content, headers=headers)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _json_bytes(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Sent:
    status: int | None
    endpoint: str
    pause: float | None = None  # seconds to hold the endpoint (rate-limit budget spent)


class CallFailed(RetryableError):
    """A retryable failure with what the response said."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        retry_after: float | None = None,
        pause: float | None = None,
    ) -> None:
        super().__init__(message, retry_after)
        self.status = status
        self.pause = pause


class Rejected(PermanentError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Contacts(Protocol):
    """Where to reach a customer. The identity service publishes only email hashes, so the
    email adapter needs this lookup (a contact vault) to know the recipient."""

    def email_for(self, customer_id: str) -> str | None: ...


@dataclass
class PatternContacts:
    """Addresses from a pattern such as ``{customer_id}@example.invalid`` (tests, demos)."""

    pattern: str | None = None

    def email_for(self, customer_id: str) -> str | None:
        return self.pattern.format(customer_id=customer_id) if self.pattern else None


@dataclass
class MapContacts:
    table: dict[str, str] = field(default_factory=dict)

    def email_for(self, customer_id: str) -> str | None:
        return self.table.get(customer_id)


class Adapter(Protocol):
    """Performs one action; raises ``CallFailed`` (retry) or ``Rejected`` (permanent)."""

    endpoint: str

    async def send(self, req: Request) -> Sent: ...


def classify(response: Any, endpoint: str, now: float | None = None) -> Sent:
    """Map an HTTP response to :class:`Sent` or raise the right error.

    409 counts as sent: the receiver already holds this idempotency key.
    """
    now = time.time() if now is None else now
    code = response.status_code
    # one pass over the raw headers (httpx's Headers lookups re-decode every header each time)
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers.raw}
    pause = rate_limit_pause(headers, now)
    if 200 <= code < 300 or code == 409:
        return Sent(code, endpoint, pause)
    retry_after = parse_retry_after(headers.get("retry-after"), now)
    if code == 429 or code == 408 or code >= 500:
        if code == 429 and pause is None:
            pause = retry_after if retry_after is not None else 1.0
        raise CallFailed(f"http {code}", code, retry_after, pause)
    raise Rejected(f"http {code}", code)


Ambiguity = Literal["at_most_once", "at_least_once"]
# An answer that leaves open whether the vendor acted: the request went out and then the
# connection timed out or broke, or the server failed mid-request (500, 502, 504). 503 and 429
# say the request was not accepted; a refused connection never sent it.
AMBIGUOUS_STATUSES = frozenset({500, 502, 504})


def _json(response: Any) -> Any:
    try:
        return json.loads(response.content or b"null")
    except ValueError:
        return None


async def _request(
    client: HttpClient,
    method: str,
    url: str | httpx.URL,
    key: str | None,
    body: Any,
    headers: Mapping[str, str] | None = None,
    on_ambiguous: Ambiguity = "at_least_once",
) -> Any:
    """One HTTP call; transport failures become :class:`CallFailed`, or :class:`Rejected`
    (``ambiguous:``) when the request may have taken effect and the policy is at most once."""
    hdrs = {**({IDEMPOTENCY_HEADER: key} if key else {}), **(headers or {})}
    try:
        return await client.request(method, url, json=body, headers=hdrs)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise CallFailed(f"transport: {type(exc).__name__}") from None  # never sent
    except httpx.TimeoutException as exc:
        if on_ambiguous == "at_most_once":
            raise Rejected("ambiguous: timeout after sending; at-most-once, not retried") from None
        raise CallFailed(f"timeout: {type(exc).__name__}") from None
    except httpx.TransportError as exc:
        if on_ambiguous == "at_most_once":
            raise Rejected(f"ambiguous: {type(exc).__name__}; at-most-once, not retried") from None
        raise CallFailed(f"transport: {type(exc).__name__}") from None


def _check(response: Any, endpoint: str, on_ambiguous: Ambiguity = "at_least_once") -> Sent:
    if on_ambiguous == "at_most_once" and response.status_code in AMBIGUOUS_STATUSES:
        raise Rejected(
            f"ambiguous: http {response.status_code}; at-most-once, not retried",
            response.status_code,
        )
    return classify(response, endpoint)


async def _call(
    client: HttpClient,
    endpoint: str,
    method: str,
    url: str | httpx.URL,
    key: str,
    body: Any,
    headers: Mapping[str, str] | None = None,
    on_ambiguous: Ambiguity = "at_least_once",
) -> Sent:
    response = await _request(client, method, url, key, body, headers, on_ambiguous)
    return _check(response, endpoint, on_ambiguous)


def _iso(ms: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _merge(a: Sent, b: Sent) -> Sent:
    """Two calls of one action: the last status, the longer rate-limit pause."""
    pauses = [p for p in (a.pause, b.pause) if p]
    return Sent(b.status, b.endpoint, max(pauses) if pauses else None)


class _LRU:
    """A bounded map (customer id → CRM record ids): lookups are made once per customer."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data: OrderedDict[str, tuple[str, str | None]] = OrderedDict()

    def get(self, key: str) -> tuple[str, str | None] | None:
        value = self.data.get(key)
        if value is not None:
            self.data.move_to_end(key)
        return value

    def put(self, key: str, value: tuple[str, str | None]) -> None:
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.size:
            self.data.popitem(last=False)
