"""HTTP and SMTP adapters behind Protocols: CRM (HubSpot CRM v3/v4, Salesforce REST or
Marketo REST), email (SendGrid v3 mail send), SMTP and a signed webhook.

Every adapter turns a :class:`~services.dispatcher.core.Request` into one call and either
returns a :class:`Sent` or raises under segflow's error root::

    SegflowError
     ├── RetryableError   429, 408, 5xx, timeouts, connection errors (``retry_after`` if sent)
     └── PermanentError   any other 4xx, no contact address, unsupported channel

Each call carries the action's idempotency key (``Idempotency-Key`` header; SendGrid also
in ``personalizations[].custom_args`` and as a mail header; SMTP as the ``Message-ID``). The
real vendors ignore that header, so exactly-once at the vendor comes from the write itself:
Salesforce upserts by the external id ``Segflow_Idempotency_Key__c``, HubSpot upserts by the
unique property ``segflow_idempotency_key``; list memberships, associations and property
updates are idempotent by nature. Email (SendGrid, SMTP) has no idempotent write: on an
ambiguous failure (the request went out, the answer did not come back) the per-channel policy
decides, at most once by default (``Rejected("ambiguous: ...")``, never a second email).
Every request follows the vendor contracts in :mod:`services.dispatcher.contracts`.
Rate-limit headers come back on :class:`Sent` and on the errors so the shell can hold the
endpoint.
"""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any, Literal, Protocol
from urllib.parse import quote

import httpx

from segflow.errors import PermanentError, RetryableError
from services.dispatcher.backoff import parse_retry_after, rate_limit_pause
from services.dispatcher.core import Request
from services.dispatcher.signing import sign

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


class HubSpotCRM:
    """HubSpot CRM v3/v4 (see ``contracts.py`` for the documentation each call follows).

    * property sync: ``PATCH /crm/v3/objects/contacts/{customer}?idProperty=segflow_customer_id``
      (a unique property; ``custom_segment`` carries the segment for email templates);
    * task / ticket: ``POST /crm/v3/objects/{tasks|tickets}/batch/upsert`` by the unique
      ``segflow_idempotency_key`` property (a retry updates the one record it created), owned
      by the contact's owner (or ``owner_id``), then
      ``PUT /crm/v4/objects/{tasks|tickets}/{id}/associations/default/contacts/{contact}``;
    * list membership: ``PUT /crm/v3/lists/{ILS id}/memberships/add`` with the contact's
      HubSpot record id, found by ``GET .../contacts/{customer}?idProperty=segflow_customer_id``
      and cached.
    """

    endpoint = "crm"
    ID_PROPERTY = "segflow_customer_id"
    KEY_PROPERTY = "segflow_idempotency_key"

    def __init__(
        self,
        client: HttpClient,
        base_url: str,
        token: str | None,
        *,
        lists: Mapping[str, str] | None = None,
        owner_id: str | None = None,
        ticket_pipeline: str = "0",
        ticket_stage: str = "1",
        cache_size: int = 100_000,
    ) -> None:
        self.client = client
        self.base = base_url.rstrip("/")
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.lists = dict(lists or {})
        self.owner_id = owner_id
        self.ticket_pipeline, self.ticket_stage = ticket_pipeline, ticket_stage
        self.contacts = _LRU(cache_size)

    async def contact(self, customer_id: str) -> tuple[str, str | None]:
        """(HubSpot record id, owner id) of the customer's contact, looked up once."""
        hit = self.contacts.get(customer_id)
        if hit is not None:
            return hit
        url = (
            f"{self.base}/crm/v3/objects/contacts/{quote(customer_id, safe='')}"
            f"?idProperty={self.ID_PROPERTY}&properties=hubspot_owner_id"
        )
        response = await _request(self.client, "GET", url, None, None, self.auth)
        if response.status_code == 404:
            raise Rejected("no_crm_contact: no HubSpot contact has this segflow_customer_id", 404)
        classify(response, self.endpoint)
        record = _json(response) or {}
        if not str(record.get("id", "")).isdigit():
            raise CallFailed("crm lookup: the answer carries no record id")
        owner = (record.get("properties") or {}).get("hubspot_owner_id") or None
        found = (str(record["id"]), owner)
        self.contacts.put(customer_id, found)
        return found

    async def _upsert_associated(self, obj: str, req: Request, properties: dict[str, str]) -> Sent:
        contact, owner = await self.contact(req.customer_id)
        owner = owner or self.owner_id
        if owner:
            properties["hubspot_owner_id"] = owner
        body = {
            "inputs": [
                {
                    "idProperty": self.KEY_PROPERTY,
                    "id": req.key,
                    "properties": {**properties, self.ID_PROPERTY: req.customer_id},
                }
            ]
        }
        url = f"{self.base}/crm/v3/objects/{obj}/batch/upsert"
        response = await _request(self.client, "POST", url, req.key, body, self.auth)
        first = classify(response, self.endpoint)
        results = (_json(response) or {}).get("results") or []
        record = str(results[0].get("id", "")) if results else ""
        if not record.isdigit():
            raise CallFailed(f"crm upsert: the answer carries no {obj} id")
        # associating is idempotent by itself (PUT of one pair): no idempotency key needed
        url = f"{self.base}/crm/v4/objects/{obj}/{record}/associations/default/contacts/{contact}"
        response = await _request(self.client, "PUT", url, None, None, self.auth)
        return _merge(first, classify(response, self.endpoint))

    async def send(self, req: Request) -> Sent:
        b, ch = self.base, req.channel
        if ch == "crm_property":
            url = (
                f"{b}/crm/v3/objects/contacts/{quote(req.customer_id, safe='')}"
                f"?idProperty={self.ID_PROPERTY}"
            )
            props = {**req.properties, "custom_segment": req.segment}
            return await _call(
                self.client, self.endpoint, "PATCH", url, req.key, {"properties": props}, self.auth
            )
        if ch == "crm_task":
            return await self._upsert_associated(
                "tasks",
                req,
                {
                    "hs_task_subject": req.subject or f"{req.playbook}: {req.step}",
                    "hs_task_body": req.body or "",
                    "hs_task_priority": req.task_priority,
                    "hs_task_status": "NOT_STARTED",
                    "hs_timestamp": _iso(time.time() * 1000),
                },
            )
        if ch == "support_escalation":
            return await self._upsert_associated(
                "tickets",
                req,
                {
                    "subject": req.subject or f"Escalation: {req.segment}",
                    "content": req.body or "",
                    "hs_ticket_priority": req.task_priority,
                    "hs_pipeline": self.ticket_pipeline,
                    "hs_pipeline_stage": self.ticket_stage,
                },
            )
        if ch == "crm_list":
            ils = self.lists.get(req.list_id or "")
            if not ils:
                raise Rejected(f"config: no HubSpot ILS list id for list {req.list_id!r}")
            contact, _ = await self.contact(req.customer_id)
            url = f"{b}/crm/v3/lists/{ils}/memberships/add"
            response = await _request(self.client, "PUT", url, req.key, [contact], self.auth)
            sent = classify(response, self.endpoint)
            answer = _json(response)
            # HubSpot answers 200 for ids it does not know and adds nobody: not sent
            if isinstance(answer, dict) and contact in (answer.get("recordIdsMissing") or []):
                self.contacts.data.pop(req.customer_id, None)  # stale (merged or deleted)
                raise Rejected(f"not_added: HubSpot has no record {contact} (recordIdsMissing)")
            return sent
        raise Rejected(f"channel {ch} is not a CRM channel")


def _number(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def salesforce_field(name: str) -> str:
    """A playbook property name as a Salesforce custom field's API name.

    >>> salesforce_field("segflow_lifecycle"), salesforce_field("Custom_Segment__c")
    ('Segflow_Lifecycle__c', 'Custom_Segment__c')
    """
    if name.endswith("__c"):
        return name
    return "_".join(p[:1].upper() + p[1:] for p in name.split("_") if p) + "__c"


class SalesforceCRM:
    """Salesforce REST (see ``contracts.py`` for the documentation each call follows).

    Every write is an upsert by an external-id field, so a retry after a lost answer updates
    the record the first try created:

    * property sync: ``PATCH /sobjects/Contact/Segflow_Customer_Id__c/{customer}?updateOnly=true``
      (custom fields with ``__c``; ``updateOnly`` never creates a Contact without LastName);
    * Task / Case / CampaignMember: ``PATCH /sobjects/{obj}/Segflow_Idempotency_Key__c/{key}``
      related to the Contact (``WhoId`` / ``ContactId``, found by
      ``GET /sobjects/Contact/Segflow_Customer_Id__c/{customer}`` and cached), picklist values
      and the Campaign record ids from configuration.
    """

    endpoint = "crm"
    CUSTOMER_FIELD = "Segflow_Customer_Id__c"
    KEY_FIELD = "Segflow_Idempotency_Key__c"

    def __init__(
        self,
        client: HttpClient,
        base_url: str,
        token: str | None,
        version: str = "v62.0",
        *,
        campaigns: Mapping[str, str] | None = None,
        owner_id: str | None = None,
        task_priority: Mapping[str, str] | None = None,
        case_priority: Mapping[str, str] | None = None,
        task_status: str = "Not Started",
        case_status: str = "New",
        case_origin: str = "Web",
        member_status: str | None = None,
        cache_size: int = 100_000,
    ) -> None:
        self.client = client
        self.base = f"{base_url.rstrip('/')}/services/data/{version}/sobjects"
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.campaigns = dict(campaigns or {})
        self.owner_id = owner_id
        self.task_priority = dict(
            task_priority or {"HIGH": "High", "MEDIUM": "Normal", "LOW": "Low"}
        )
        self.case_priority = dict(
            case_priority or {"HIGH": "High", "MEDIUM": "Medium", "LOW": "Low"}
        )
        self.task_status, self.case_status, self.case_origin = task_status, case_status, case_origin
        self.member_status = member_status
        self.contacts = _LRU(cache_size)

    async def contact(self, customer_id: str) -> tuple[str, str | None]:
        """(Contact Id, OwnerId) by the external id, looked up once."""
        hit = self.contacts.get(customer_id)
        if hit is not None:
            return hit
        url = (
            f"{self.base}/Contact/{self.CUSTOMER_FIELD}/{quote(customer_id, safe='')}"
            "?fields=Id,OwnerId"
        )
        response = await _request(self.client, "GET", url, None, None, self.auth)
        if response.status_code == 404:
            raise Rejected("no_crm_contact: no Contact has this Segflow_Customer_Id__c", 404)
        classify(response, self.endpoint)
        record = _json(response) or {}
        if not record.get("Id"):
            raise CallFailed("crm lookup: the answer carries no Contact Id")
        found = (str(record["Id"]), record.get("OwnerId") or None)
        self.contacts.put(customer_id, found)
        return found

    async def _upsert(self, obj: str, req: Request, body: dict[str, Any]) -> Sent:
        url = f"{self.base}/{obj}/{self.KEY_FIELD}/{quote(req.key, safe='')}"
        response = await _request(self.client, "PATCH", url, req.key, body, self.auth)
        if obj == "CampaignMember" and response.status_code == 400:
            codes = {e.get("errorCode") for e in _json(response) or [] if isinstance(e, dict)}
            if "DUPLICATE_VALUE" in codes:  # already a member of the campaign: done
                return Sent(response.status_code, self.endpoint)
        return classify(response, self.endpoint)

    async def _risk_segment(self, req: Request, contact: str) -> Sent:
        """Upsert the customer's ``CustomerRiskSegment__c`` record for this segment (seed 000
        §3.4) by ``Segflow_Key__c`` = customer and segment: one record per customer and
        segment, updated on every entry and exit (the step's ``in_segment`` property)."""
        entered = req.properties.get("in_segment", "true") == "true"
        now = time.time()
        body: dict[str, Any] = {
            "Contact__c": contact,
            "Segment_Name__c": req.segment[:80],
            "In_Segment__c": entered,
            "Last_Triggered__c": time.strftime("%Y-%m-%dT%H:%M:%S.000+0000", time.gmtime(now)),
            self.CUSTOMER_FIELD: req.customer_id,
        }
        if entered:
            body["Created_On__c"] = time.strftime("%Y-%m-%d", time.gmtime(now))
        v = req.variables
        churn = _number(v.get("churn_probability"))
        if churn is not None:
            body["Churn_Score__c"] = round(churn, 4)
        decay = _number(
            v.get("activity_14d_vs_prior42_log_ratio") or v.get("activity_14d_vs_prior28_change")
        )
        if decay is not None:
            body["Engagement_Decay__c"] = round(decay, 4)
        days = _number(v.get("days_since_purchase"))
        if days is not None and days >= 0:
            body["Last_Purchase_Date__c"] = time.strftime(
                "%Y-%m-%d", time.gmtime(now - days * 86400)
            )
        slug = re.sub(r"[^A-Za-z0-9]+", "-", req.segment).strip("-")
        key = quote(f"{req.customer_id}__{slug}", safe="")
        url = f"{self.base}/CustomerRiskSegment__c/Segflow_Key__c/{key}"
        return await _call(self.client, self.endpoint, "PATCH", url, req.key, body, self.auth)

    async def send(self, req: Request) -> Sent:
        ch = req.channel
        if ch == "crm_property":
            url = (
                f"{self.base}/Contact/{self.CUSTOMER_FIELD}/{quote(req.customer_id, safe='')}"
                "?updateOnly=true"
            )
            body = {salesforce_field(k): v for k, v in req.properties.items()}
            body["Custom_Segment__c"] = req.segment
            return await _call(self.client, self.endpoint, "PATCH", url, req.key, body, self.auth)
        if ch not in ("crm_task", "support_escalation", "crm_list", "crm_segment"):
            raise Rejected(f"channel {ch} is not a CRM channel")
        contact, owner = await self.contact(req.customer_id)
        if ch == "crm_segment":
            return await self._risk_segment(req, contact)
        tag = {self.CUSTOMER_FIELD: req.customer_id}
        if ch == "crm_task":
            body = {
                "Subject": req.subject or f"{req.playbook}: {req.step}",
                "Description": req.body or "",
                "Priority": self.task_priority.get(req.task_priority, req.task_priority),
                "Status": self.task_status,
                "WhoId": contact,
                "ActivityDate": time.strftime("%Y-%m-%d", time.gmtime()),
                **tag,
            }
            task_owner = owner or self.owner_id
            if task_owner:
                body["OwnerId"] = task_owner
            return await self._upsert("Task", req, body)
        if ch == "support_escalation":
            body = {
                "Subject": req.subject or f"Escalation: {req.segment}",
                "Description": req.body or "",
                "Priority": self.case_priority.get(req.task_priority, req.task_priority),
                "Origin": self.case_origin,
                "Status": self.case_status,
                "ContactId": contact,
                **tag,
            }
            return await self._upsert("Case", req, body)
        campaign = self.campaigns.get(req.list_id or "")
        if not campaign:
            raise Rejected(f"config: no Salesforce Campaign id for list {req.list_id!r}")
        body = {"CampaignId": campaign, "ContactId": contact, **tag}
        if self.member_status:
            body["Status"] = self.member_status
        return await self._upsert("CampaignMember", req, body)


def marketo_field(name: str) -> str:
    """A playbook property name as a Marketo lead field's REST name.

    >>> marketo_field("segflow_lifecycle"), marketo_field("customSegment")
    ('segflowLifecycle', 'customSegment')
    """
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


# Marketo answers HTTP 200 and reports errors in the body: these codes are worth a retry
# (rate and concurrency limits, timeouts, expired or invalid access token, system errors)
MARKETO_RETRY = frozenset({"502", "601", "602", "604", "606", "607", "608", "611", "615", "713"})
#: "Access token invalid" and "Access token expired": get a new token and send again.
MARKETO_TOKEN_ERRORS = frozenset({"601", "602"})


class TokenRefused(CallFailed):
    """Marketo refused the access token (601/602): retried with a new one."""


class MarketoToken:
    """Marketo access tokens from its identity endpoint (2-legged OAuth 2.0, client
    credentials): ``GET <identity URL>/oauth/token?grant_type=client_credentials&client_id=
    ...&client_secret=...`` answers ``access_token`` and ``expires_in`` (seconds; a new token
    lives 3,600). Marketo's documentation (REST API, Authentication) asks clients to keep the
    expiry and get a new token before it, and to handle 601 (invalid) and 602 (expired) by
    getting a new one: :meth:`get` refreshes ``margin`` seconds before the expiry,
    :meth:`invalidate` after a 601/602. Concurrent calls share one refresh."""

    def __init__(
        self,
        client: HttpClient,
        identity_url: str,
        client_id: str,
        client_secret: str,
        *,
        margin: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.url = f"{identity_url.rstrip('/')}/oauth/token"
        self.client_id = client_id
        self._secret = client_secret
        self.margin = margin
        self.clock = clock
        self._token: str | None = None
        self._expires = 0.0
        self._lock: asyncio.Lock | None = None
        self.refreshes = 0

    def __repr__(self) -> str:  # never the secret or the token
        return f"MarketoToken({self.url}, client_id={self.client_id})"

    def invalidate(self, token: str | None) -> None:
        """Marketo refused ``token`` (601/602): the next :meth:`get` fetches a new one."""
        if token is not None and token == self._token:
            self._token = None

    async def get(self) -> str:
        if self._token is not None and self.clock() < self._expires - self.margin:
            return self._token
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._token is not None and self.clock() < self._expires - self.margin:
                return self._token  # another call refreshed it meanwhile
            url = httpx.URL(
                self.url,
                params={
                    "grant_type": "client_credentials",
                    "client_id": self.client_id,
                    "client_secret": self._secret,
                },
            )
            started = self.clock()
            response = await _request(self.client, "GET", url, None, None)
            answer = _json(response)
            if response.status_code != 200 or not isinstance(answer, dict):
                # 401 invalid client: the credentials are wrong (never echo the answer, which
                # may repeat them); 5xx: the identity service is down, try later
                if response.status_code >= 500 or response.status_code == 429:
                    raise CallFailed(f"marketo identity http {response.status_code}")
                raise Rejected(
                    f"marketo identity http {response.status_code}: check "
                    "SEGFLOW_DISPATCHER_MARKETO_CLIENT_ID and _CLIENT_SECRET",
                    response.status_code,
                )
            token = answer.get("access_token")
            if not isinstance(token, str) or not token:
                raise CallFailed("marketo identity: no access_token in the answer")
            self._token = token
            self._expires = started + float(answer.get("expires_in") or 0)
            self.refreshes += 1
            return token


class MarketoCRM:
    """Marketo REST (see ``contracts.py`` for the documentation each call follows).

    * property sync: ``POST /rest/v1/leads.json`` with ``action: updateOnly`` and
      ``lookupField: segflowCustomerId`` (the Marketo lookup field: a retry updates the same
      lead, a missing lead is never created);
    * list membership: ``POST /rest/v1/lists/{id}/leads.json`` with the lead id, found by
      ``GET /rest/v1/leads.json?filterType=segflowCustomerId`` and cached (idempotent);
    * task / escalation: ``POST /rest/v1/campaigns/{id}/trigger.json`` runs the configured
      smart campaign for the lead, with ``{{my.segflowSubject}}`` and ``{{my.segflowBody}}``
      tokens. A campaign request is not idempotent: ``on_ambiguous`` decides, as for email.
    """

    endpoint = "crm"
    LOOKUP = "segflowCustomerId"

    def __init__(
        self,
        client: HttpClient,
        base_url: str,
        token: str | None,
        *,
        lists: Mapping[str, str] | None = None,
        campaigns: Mapping[str, str] | None = None,
        on_ambiguous: Ambiguity = "at_most_once",
        cache_size: int = 100_000,
        token_source: MarketoToken | None = None,
    ) -> None:
        self.client = client
        self.base = f"{base_url.rstrip('/')}/rest/v1"
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.tokens = token_source  # refreshed access tokens (else the static ``token``)
        self.lists = dict(lists or {})
        self.campaigns = dict(campaigns or {})
        self.on_ambiguous = on_ambiguous
        self.leads = _LRU(cache_size)

    async def _send(
        self, method: str, url: str | httpx.URL, key: str | None, body: Any, on_ambiguous: Ambiguity
    ) -> tuple[Sent, dict[str, Any]]:
        """One call with the current access token; on 601/602 (token invalid or expired: the
        request was refused, nothing applied) once more with a new token."""
        for attempt in (0, 1):
            token = await self.tokens.get() if self.tokens is not None else None
            auth = {"Authorization": f"Bearer {token}"} if token else self.auth
            response = await _request(self.client, method, url, key, body, auth, on_ambiguous)
            try:
                return self._answer(response, on_ambiguous)
            except TokenRefused:
                if self.tokens is None or attempt:
                    raise
                self.tokens.invalidate(token)
        raise AssertionError("unreachable")

    def _answer(self, response: Any, on_ambiguous: Ambiguity) -> tuple[Sent, dict[str, Any]]:
        sent = _check(response, self.endpoint, on_ambiguous)
        answer = _json(response)
        answer = answer if isinstance(answer, dict) else {}
        if answer.get("success") is False:
            errors = [e for e in answer.get("errors") or [] if isinstance(e, dict)]
            codes = sorted({str(e.get("code")) for e in errors})
            detail = f"marketo {','.join(codes)}: " + "; ".join(
                str(e.get("message", ""))[:80] for e in errors
            )
            if set(codes) & MARKETO_TOKEN_ERRORS:
                raise TokenRefused(detail, response.status_code)
            if set(codes) & MARKETO_RETRY:
                raise CallFailed(detail, response.status_code, pause=1.0)
            raise Rejected(detail, response.status_code)
        return sent, answer

    async def lead(self, customer_id: str) -> str:
        hit = self.leads.get(customer_id)
        if hit is not None:
            return hit[0]
        url = httpx.URL(
            f"{self.base}/leads.json",
            params={"filterType": self.LOOKUP, "filterValues": customer_id, "fields": "id"},
        )
        _, answer = await self._send("GET", url, None, None, "at_least_once")
        found = [r for r in answer.get("result") or [] if isinstance(r, dict) and "id" in r]
        if not found:
            raise Rejected("no_crm_contact: no Marketo lead has this segflowCustomerId")
        lead = str(found[0]["id"])
        self.leads.put(customer_id, (lead, None))
        return lead

    @staticmethod
    def _record(answer: dict[str, Any], ok: tuple[str, ...]) -> None:
        """Marketo reports each record's outcome in ``result[]`` (skipped with reasons)."""
        for r in answer.get("result") or []:
            if isinstance(r, dict) and r.get("status") not in ok:
                reasons = "; ".join(
                    f"{x.get('code')} {x.get('message', '')}"[:80] for x in r.get("reasons") or []
                )
                raise Rejected(f"not_applied: marketo {r.get('status')}: {reasons}")

    async def send(self, req: Request) -> Sent:
        ch = req.channel
        if ch == "crm_property":
            fields = {marketo_field(k): v for k, v in req.properties.items()}
            body = {
                "action": "updateOnly",
                "lookupField": self.LOOKUP,
                "input": [{self.LOOKUP: req.customer_id, **fields, "customSegment": req.segment}],
            }
            sent, answer = await self._send(
                "POST", f"{self.base}/leads.json", req.key, body, "at_least_once"
            )
            self._record(answer, ("updated",))
            return sent
        if ch == "crm_list":
            list_id = self.lists.get(req.list_id or "")
            if not list_id:
                raise Rejected(f"config: no Marketo static list id for list {req.list_id!r}")
            lead = await self.lead(req.customer_id)
            url = f"{self.base}/lists/{list_id}/leads.json"
            body = {"input": [{"id": int(lead)}]}
            sent, answer = await self._send("POST", url, req.key, body, "at_least_once")
            self._record(answer, ("added", "skipped"))  # skipped: already a member
            return sent
        if ch in ("crm_task", "support_escalation"):
            campaign = self.campaigns.get(ch)
            if not campaign:
                raise Rejected(f"config: no Marketo smart campaign id for {ch}")
            lead = await self.lead(req.customer_id)
            trigger: dict[str, Any] = {
                "input": {
                    "leads": [{"id": int(lead)}],
                    "tokens": [
                        {"name": "{{my.segflowSubject}}", "value": req.subject or req.step},
                        {"name": "{{my.segflowBody}}", "value": req.body or ""},
                        {"name": "{{my.segflowKey}}", "value": req.key},
                    ],
                }
            }
            url = f"{self.base}/campaigns/{campaign}/trigger.json"
            return (await self._send("POST", url, req.key, trigger, self.on_ambiguous))[0]
        raise Rejected(f"channel {ch} is not a CRM channel")


class SendGridEmail:
    """SendGrid v3 mail send with a dynamic template and its template data.

    The subject travels in ``dynamic_template_data.subject`` (a dynamic template's own subject
    line overrides the message subject, so the template's subject must be ``{{subject}}``);
    segflow's tracking ids go in ``personalizations[].custom_args``; ``asm.group_id`` links
    unsubscribes to the configured group; categories are prefixed with the campaign id
    (categories are account-wide). Mail send has no idempotent write: on an ambiguous failure
    ``on_ambiguous`` decides (``at_most_once``, the default, records the action failed with
    reason ``ambiguous`` instead of risking a second email).
    """

    endpoint = "email"

    def __init__(
        self,
        client: HttpClient,
        base_url: str,
        api_key: str | None,
        sender: str,
        contacts: Contacts,
        *,
        templates: Mapping[str, str] | None = None,
        asm_group_id: int | None = None,
        on_ambiguous: Ambiguity = "at_most_once",
    ) -> None:
        self.client = client
        self.url = f"{base_url.rstrip('/')}/v3/mail/send"
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.sender = sender
        self.contacts = contacts
        self.templates = dict(templates or {})
        self.asm_group_id = asm_group_id
        self.on_ambiguous = on_ambiguous

    def body(self, req: Request, to: str) -> dict[str, Any]:
        args: dict[str, str] = {
            "idempotency_key": req.key,
            "campaign_id": req.campaign_id,
            "variant": req.variant,
            "customer_id": req.customer_id,
            "playbook": req.playbook,
            "step": req.step,
        }
        template = self.templates.get(req.template or "", req.template)
        data = {k: str(v) for k, v in req.variables.items()}
        if req.subject:
            data["subject"] = req.subject
        person: dict[str, Any] = {
            "to": [{"email": to}],
            "dynamic_template_data": data,
            "custom_args": args,
        }
        campaign = req.campaign_id[:200]
        body: dict[str, Any] = {
            "personalizations": [person],
            "from": {"email": self.sender},
            "headers": {IDEMPOTENCY_HEADER: req.key},
            "categories": ["segflow", campaign, f"{campaign}:{req.variant[:50]}"],
        }
        if self.asm_group_id is not None:
            body["asm"] = {"group_id": self.asm_group_id}
        if template:
            body["template_id"] = template
        if not (template and template.startswith("d-")):
            if req.subject:
                body["subject"] = req.subject
            if req.body or not template:
                body["content"] = [{"type": "text/plain", "value": req.body or req.subject or ""}]
        return body

    async def send(self, req: Request) -> Sent:
        to = self.contacts.email_for(req.customer_id)
        if not to:
            raise Rejected("no_contact: no email address known for the customer")
        return await _call(
            self.client,
            self.endpoint,
            "POST",
            self.url,
            req.key,
            self.body(req, to),
            self.auth,
            self.on_ambiguous,
        )


class SMTPEmail:
    """Plain SMTP in a worker thread; the idempotency key is the ``Message-ID``'s left side.

    RFC 5322 §3.6: a ``Date`` and a ``Message-ID`` whose right side is a domain (the sender's,
    or ``message_id_domain``). SMTP has no idempotent write either: a failure after the message
    data went out (timeout, dropped connection) is ambiguous, and ``on_ambiguous`` decides.
    """

    endpoint = "smtp"

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        contacts: Contacts,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,
        starttls: bool = False,
        *,
        message_id_domain: str | None = None,
        on_ambiguous: Ambiguity = "at_most_once",
    ) -> None:
        self.host, self.port, self.sender = host, port, sender
        self.contacts = contacts
        self.user, self.password = user, password
        self.timeout = timeout
        self.starttls = starttls
        self.domain = message_id_domain or sender.rpartition("@")[2] or "segflow.invalid"
        self.on_ambiguous = on_ambiguous

    def message(self, req: Request, to: str) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.sender
        msg["To"] = to
        msg["Date"] = formatdate(usegmt=True)
        msg["Subject"] = req.subject or req.template or req.playbook
        msg["Message-ID"] = f"<{req.key}@{self.domain}>"
        msg[IDEMPOTENCY_HEADER] = req.key
        msg["X-Segflow-Campaign"] = req.campaign_id
        msg["X-Segflow-Variant"] = req.variant
        msg.set_content(req.body or json.dumps(dict(req.variables), sort_keys=True))
        return msg

    def _send_sync(self, req: Request, to: str) -> Sent:
        msg = self.message(req, to)
        sending = False
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                if self.starttls:
                    smtp.starttls()
                if self.user and self.password:
                    smtp.login(self.user, self.password)
                sending = True
                smtp.send_message(msg)
        except smtplib.SMTPResponseException as exc:
            if 400 <= exc.smtp_code < 500:
                raise CallFailed(f"smtp {exc.smtp_code}", exc.smtp_code) from None
            raise Rejected(f"smtp {exc.smtp_code}", exc.smtp_code) from None
        except (smtplib.SMTPException, OSError) as exc:
            if sending and self.on_ambiguous == "at_most_once":
                raise Rejected(
                    f"ambiguous: smtp {type(exc).__name__} while sending; at-most-once, not retried"
                ) from None
            raise CallFailed(f"smtp: {type(exc).__name__}") from None
        return Sent(250, self.endpoint)

    async def send(self, req: Request) -> Sent:
        to = self.contacts.email_for(req.customer_id)
        if not to:
            raise Rejected("no_contact: no email address known for the customer")
        return await asyncio.get_running_loop().run_in_executor(None, self._send_sync, req, to)


class SignedWebhook:
    """A JSON POST signed with HMAC-SHA256 (see :mod:`services.dispatcher.signing`)."""

    endpoint = "webhook"

    def __init__(self, client: HttpClient, url: str, secret: bytes) -> None:
        self.client = client
        self.url = url
        self.secret = secret

    async def send(self, req: Request) -> Sent:
        payload = {
            "idempotency_key": req.key,
            "customer_id": req.customer_id,
            "channel": req.channel,
            "playbook": req.playbook,
            "step": req.step,
            "segment": req.segment,
            "variant": req.variant,
            "campaign_id": req.campaign_id,
            "template": req.template,
            "subject": req.subject,
            "body": req.body,
            "variables": dict(req.variables),
        }
        body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        headers = {
            IDEMPOTENCY_HEADER: req.key,
            "Content-Type": "application/json",
            **sign(self.secret, body, int(time.time())),
        }
        try:
            response = await self.client.post(self.url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise CallFailed(f"timeout: {type(exc).__name__}") from None
        except httpx.TransportError as exc:
            raise CallFailed(f"transport: {type(exc).__name__}") from None
        return classify(response, self.endpoint)


@dataclass
class Router:
    """Channel → adapter."""

    crm: Adapter | None = None
    email: Adapter | None = None
    smtp: Adapter | None = None
    webhook: Adapter | None = None

    def for_channel(self, channel: str) -> Adapter | None:
        if channel in ("crm_property", "crm_task", "crm_list", "support_escalation", "crm_segment"):
            return self.crm
        return {"email": self.email, "smtp": self.smtp, "webhook": self.webhook}.get(channel)
