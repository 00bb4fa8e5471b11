"""The Marketo REST CRM adapter and its access tokens (2-legged OAuth). Moved out of
``adapters.py`` unchanged (which re-exports them); see that module for the guarantees every
adapter keeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from services.dispatcher.core import Request
from services.dispatcher.transport import (
    _LRU,
    Ambiguity,
    CallFailed,
    HttpClient,
    Rejected,
    Sent,
    _check,
    _json,
    _request,
)


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

    def at_most_once(self, channel: str) -> bool:
        """A campaign request (tasks, escalations) is not idempotent: under ``at_most_once``
        the shell records each call as started before making it. Lead updates and list
        additions are (``updateOnly``, already a member) and are repeated after a crash."""
        return channel in ("crm_task", "support_escalation") and self.on_ambiguous == "at_most_once"

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
