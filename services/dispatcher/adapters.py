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
import smtplib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

import httpx

from services.dispatcher.core import Request
from services.dispatcher.crm import (
    HubSpotCRM,
    SalesforceCRM,
    salesforce_field,
)
from services.dispatcher.marketo import (
    MARKETO_RETRY,
    MARKETO_TOKEN_ERRORS,
    MarketoCRM,
    MarketoToken,
    TokenRefused,
    marketo_field,
)
from services.dispatcher.signing import sign
from services.dispatcher.transport import (
    AMBIGUOUS_STATUSES,
    IDEMPOTENCY_HEADER,
    Adapter,
    AiohttpClient,
    Ambiguity,
    CallFailed,
    Contacts,
    HttpClient,
    MapContacts,
    PatternContacts,
    RawHeaders,
    RawResponse,
    Rejected,
    Sent,
    _call,
    classify,
)

__all__ = [
    "AMBIGUOUS_STATUSES",
    "Adapter",
    "AiohttpClient",
    "Ambiguity",
    "CallFailed",
    "Contacts",
    "HttpClient",
    "HubSpotCRM",
    "IDEMPOTENCY_HEADER",
    "MARKETO_RETRY",
    "MARKETO_TOKEN_ERRORS",
    "MapContacts",
    "MarketoCRM",
    "MarketoToken",
    "PatternContacts",
    "RawHeaders",
    "RawResponse",
    "Rejected",
    "Router",
    "SMTPEmail",
    "SalesforceCRM",
    "SendGridEmail",
    "Sent",
    "SignedWebhook",
    "TokenRefused",
    "classify",
    "marketo_field",
    "salesforce_field",
]


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

    def at_most_once(self, channel: str) -> bool:
        """Mail send has no idempotent write (SendGrid ignores ``Idempotency-Key``): under
        ``at_most_once`` the shell records each call as started before making it."""
        return self.on_ambiguous == "at_most_once"

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

    def at_most_once(self, channel: str) -> bool:
        """A server does not de-duplicate by Message-ID: as for SendGrid."""
        return self.on_ambiguous == "at_most_once"

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

    def at_most_once(self, channel: str) -> bool:
        """Whether a call on ``channel`` must be recorded as started before it is made: the
        vendor does not de-duplicate it (SendGrid mail send, SMTP, Marketo campaign requests)
        and the channel's policy is ``at_most_once``. An adapter says so with an
        ``at_most_once(channel)`` method; without one (HubSpot and Salesforce upserts, list
        and property writes, the signed webhook, whose receivers de-duplicate by its
        ``idempotency_key``) a call is repeated with its key after a crash."""
        adapter = self.for_channel(channel)
        check = getattr(adapter, "at_most_once", None)
        return bool(check is not None and check(channel))
