"""Vendor ids and policies (``SEGFLOW_DISPATCHER_*``), checked at start, and the adapters built
from them.

Playbooks name lists and templates by segflow names (``list_id: loyal-customers``,
``template: d-atrisk-reengage``); the vendors want their own record ids. The maps below turn
one into the other, and :func:`check_routes` refuses to start when a routed step has no vendor
id, or a routed real endpoint has no credentials, naming the setting to set.

Endpoints on 127.0.0.1/localhost are segflow's local receiver (demo, tests, benches): for those
a missing vendor id gets a stand-in of the right shape (:func:`with_local_stand_ins`), so a
local run needs no vendor account. A real endpoint never gets a stand-in.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from segflow.errors import ConfigError
from services.dispatcher.adapters import (
    Contacts,
    HttpClient,
    HubSpotCRM,
    MarketoCRM,
    MarketoToken,
    Router,
    SalesforceCRM,
    SendGridEmail,
)
from services.dispatcher.playbooks import Book

log = logging.getLogger("segflow.dispatcher")
ENV = "SEGFLOW_DISPATCHER_"
Ambiguity = Literal["at_most_once", "at_least_once"]
_TEMPLATE = re.compile(r"^d-[0-9a-f]{32}$")
_SF_USER = re.compile(r"^005[a-zA-Z0-9]{12}([a-zA-Z0-9]{3})?$")
_SF_CAMPAIGN = re.compile(r"^701[a-zA-Z0-9]{12}([a-zA-Z0-9]{3})?$")


class VendorSettings(BaseSettings):
    """Vendor record ids (JSON maps in the environment) and per-channel delivery policies."""

    model_config = SettingsConfigDict(env_prefix=ENV, extra="ignore", frozen=True)

    # HubSpot: playbook list name -> ILS list id (MANUAL or SNAPSHOT list); the owner of tasks
    # and tickets when the contact has none; the ticket pipeline and its first stage
    hubspot_lists: dict[str, str] = {}
    hubspot_owner_id: str | None = None
    hubspot_ticket_pipeline: str = "0"
    hubspot_ticket_stage: str = "1"
    # Salesforce: playbook list name -> Campaign record id (701...); picklist values of the org
    salesforce_campaigns: dict[str, str] = {}
    salesforce_owner_id: str | None = None
    salesforce_api_version: str = "v62.0"  # updateOnly on upserts needs v61.0 or later
    salesforce_task_priority: dict[str, str] = {"HIGH": "High", "MEDIUM": "Normal", "LOW": "Low"}
    salesforce_case_priority: dict[str, str] = {"HIGH": "High", "MEDIUM": "Medium", "LOW": "Low"}
    salesforce_task_status: str = "Not Started"
    salesforce_case_status: str = "New"
    salesforce_case_origin: str = "Web"
    salesforce_campaign_member_status: str | None = None  # the campaign's default when unset
    # Marketo: playbook list name -> static list id; channel (crm_task, support_escalation)
    # -> smart campaign id (a "Campaign is Requested" trigger, source Web Service API)
    marketo_lists: dict[str, str] = {}
    marketo_campaigns: dict[str, str] = {}
    marketo_on_ambiguous: Ambiguity = "at_most_once"
    # Marketo access tokens (1 hour) from the identity endpoint, refreshed before expiry and on
    # 601/602; the identity URL defaults to <CRM_BASE_URL>/identity (Admin > Web Services)
    marketo_client_id: str | None = None
    marketo_client_secret: SecretStr | None = None
    marketo_identity_url: str | None = None
    # SendGrid: playbook template name -> dynamic template id (d- + 32 hex); unsubscribe group
    sendgrid_templates: dict[str, str] = {}
    sendgrid_asm_group_id: int | None = None
    # what an ambiguous failure (request sent, answer lost) means, per non-idempotent channel
    email_on_ambiguous: Ambiguity = "at_most_once"
    smtp_on_ambiguous: Ambiguity = "at_most_once"


def is_local(url_or_host: str) -> bool:
    host = urlsplit(url_or_host).hostname if "//" in url_or_host else url_or_host
    return host in ("127.0.0.1", "localhost", "::1")


def routed(book: Book) -> dict[str, set[str]]:
    """Channel -> playbook names that send on it."""
    out: dict[str, set[str]] = {}
    for pb in book.playbooks:
        for step in pb.steps:
            out.setdefault(step.channel, set()).add(pb.name)
    return out


def list_names(book: Book) -> set[str]:
    return {s.list_id for p in book.playbooks for s in p.steps if s.list_id}


def template_names(book: Book) -> set[str]:
    names = {s.template for p in book.playbooks for s in p.steps if s.template}
    for pb in book.playbooks:
        for v in pb.experiment.variants:
            for _, fields in v.overrides:
                t = dict(fields).get("template")
                if t:
                    names.add(t)
    return names


def _digest(name: str, n: int) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:n]


def with_local_stand_ins(v: VendorSettings, cfg: Any, book: Book) -> VendorSettings:
    """Fill missing vendor ids with stand-ins of the vendor's shape, for endpoints on this
    machine only (segflow's receiver); real endpoints keep what was configured."""
    update: dict[str, Any] = {}
    if is_local(cfg.crm_base_url):
        lists = list_names(book)
        update["hubspot_lists"] = {
            **{n: str(int(_digest(n, 8), 16) % 10**9) for n in lists},
            **v.hubspot_lists,
        }
        update["salesforce_campaigns"] = {
            **{n: "701" + str(int(_digest(n, 12), 16))[:12].rjust(12, "0") + "AAA" for n in lists},
            **v.salesforce_campaigns,
        }
        update["hubspot_owner_id"] = v.hubspot_owner_id or "1"
        update["marketo_lists"] = {
            **{n: str(int(_digest(n, 6), 16)) for n in lists},
            **v.marketo_lists,
        }
        update["marketo_campaigns"] = {
            "crm_task": "1001",
            "support_escalation": "1002",
            **v.marketo_campaigns,
        }
    if is_local(cfg.email_base_url):
        update["sendgrid_templates"] = {
            **{t: "d-" + _digest(t, 32) for t in template_names(book) if not _TEMPLATE.match(t)},
            **v.sendgrid_templates,
        }
        if v.sendgrid_asm_group_id is None:
            update["sendgrid_asm_group_id"] = 1
    return v.model_copy(update=update) if update else v


def check_routes(cfg: Any, book: Book) -> None:
    """Refuse to start when a routed step lacks a vendor id or a routed real endpoint lacks
    credentials; the message names each setting to set."""
    used = routed(book)
    problems: list[str] = []

    def need(setting: str, why: str) -> None:
        problems.append(f"{ENV}{setting.upper()}: {why}")

    crm_channels = {
        "crm_property",
        "crm_task",
        "crm_list",
        "support_escalation",
        "crm_segment",
    } & used.keys()
    if crm_channels:
        marketo_auth = cfg.crm_kind == "marketo" and (
            cfg.marketo_client_id and cfg.marketo_client_secret is not None
        )
        if not is_local(cfg.crm_base_url) and cfg.crm_token is None and not marketo_auth:
            where = f"the CRM at {cfg.crm_base_url} is routed ({sorted(crm_channels)})"
            if cfg.crm_kind == "marketo":
                need("marketo_client_id", f"{where}: set MARKETO_CLIENT_ID and _CLIENT_SECRET")
            else:
                need("crm_token", where)
        for name in sorted(list_names(book)):
            if cfg.crm_kind == "hubspot":
                ils = cfg.hubspot_lists.get(name)
                if not (ils and ils.isdigit()):
                    need("hubspot_lists", f"list {name!r} needs its numeric ILS list id")
            elif cfg.crm_kind == "marketo":
                mid = cfg.marketo_lists.get(name)
                if not (mid and mid.isdigit()):
                    need("marketo_lists", f"list {name!r} needs its static list id")
            else:
                cid = cfg.salesforce_campaigns.get(name)
                if not (cid and _SF_CAMPAIGN.match(cid)):
                    need("salesforce_campaigns", f"list {name!r} needs a Campaign id (701...)")
        if (
            cfg.crm_kind == "hubspot"
            and {"crm_task", "support_escalation"} & used.keys()
            and not (cfg.hubspot_owner_id or "").isdigit()
        ):
            need("hubspot_owner_id", "tasks and tickets need an owner when the contact has none")
        if "crm_segment" in used and cfg.crm_kind != "salesforce":
            need("crm_kind", "crm_segment steps write Salesforce's CustomerRiskSegment__c")
        for ch in sorted({"crm_task", "support_escalation"} & used.keys()):
            if cfg.crm_kind == "marketo" and not cfg.marketo_campaigns.get(ch, "").isdigit():
                need("marketo_campaigns", f"{ch} needs the id of the smart campaign to request")
        owner = cfg.salesforce_owner_id
        if cfg.crm_kind == "salesforce" and owner is not None and not _SF_USER.match(owner):
            need("salesforce_owner_id", "a User id (005...)")
    if "email" in used:
        if not is_local(cfg.email_base_url) and cfg.email_api_key is None:
            need("email_api_key", f"email at {cfg.email_base_url} is routed")
        for name in sorted(template_names(book)):
            tid = cfg.sendgrid_templates.get(name, name)
            if not _TEMPLATE.match(tid):
                need(
                    "sendgrid_templates",
                    f"template {name!r} needs a dynamic template id d-<32 hex>",
                )
        if cfg.sendgrid_asm_group_id is None:
            need("sendgrid_asm_group_id", "the unsubscribe group that SendGrid's unsubscribes join")
    smtp_auth = cfg.smtp_user and cfg.smtp_password is not None
    if "smtp" in used and not is_local(cfg.smtp_host) and not smtp_auth:
        need("smtp_user", f"SMTP at {cfg.smtp_host} is routed: set SMTP_USER and SMTP_PASSWORD")
    public = cfg.webhook_secret.get_secret_value() == "segflow-local-webhook-secret"
    if "webhook" in used and not is_local(cfg.webhook_url) and public:
        need("webhook_secret", f"the webhook {cfg.webhook_url} would be signed with the default")
    if problems:
        raise ConfigError("dispatcher cannot start:\n  " + "\n  ".join(problems))


def crm_adapter(
    v: VendorSettings, client: HttpClient, kind: str, base_url: str, token: str | None
) -> HubSpotCRM | SalesforceCRM | MarketoCRM:
    if kind == "marketo":
        tokens = None
        if v.marketo_client_id and v.marketo_client_secret is not None:
            tokens = MarketoToken(
                client,
                v.marketo_identity_url or f"{base_url.rstrip('/')}/identity",
                v.marketo_client_id,
                v.marketo_client_secret.get_secret_value(),
            )
        return MarketoCRM(
            client,
            base_url,
            token,
            lists=v.marketo_lists,
            campaigns=v.marketo_campaigns,
            on_ambiguous=v.marketo_on_ambiguous,
            token_source=tokens,
        )
    if kind == "hubspot":
        return HubSpotCRM(
            client,
            base_url,
            token,
            lists=v.hubspot_lists,
            owner_id=v.hubspot_owner_id,
            ticket_pipeline=v.hubspot_ticket_pipeline,
            ticket_stage=v.hubspot_ticket_stage,
        )
    return SalesforceCRM(
        client,
        base_url,
        token,
        v.salesforce_api_version,
        campaigns=v.salesforce_campaigns,
        owner_id=v.salesforce_owner_id,
        task_priority=v.salesforce_task_priority,
        case_priority=v.salesforce_case_priority,
        task_status=v.salesforce_task_status,
        case_status=v.salesforce_case_status,
        case_origin=v.salesforce_case_origin,
        member_status=v.salesforce_campaign_member_status,
    )


def email_adapter(
    v: VendorSettings,
    client: HttpClient,
    base_url: str,
    api_key: str | None,
    sender: str,
    contacts: Contacts,
) -> SendGridEmail:
    return SendGridEmail(
        client,
        base_url,
        api_key,
        sender,
        contacts,
        templates=v.sendgrid_templates,
        asm_group_id=v.sendgrid_asm_group_id,
        on_ambiguous=v.email_on_ambiguous,
    )


def make_adapters(
    v: VendorSettings,
    client: HttpClient,
    contacts: Contacts,
    *,
    crm_kind: str,
    base_url: str,
    sender: str,
    token: str | None = "token",
) -> Router:
    """CRM and email adapters on one base URL (tests and tools)."""
    return Router(
        crm=crm_adapter(v, client, crm_kind, base_url, token),
        email=email_adapter(v, client, base_url, token, sender, contacts),
    )
