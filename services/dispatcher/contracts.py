"""What the real vendors accept: one request at a time, checked against their published contracts.

The contract tests (``tests/contract``) and :mod:`segflow.receiver` call the same functions, so
the demo and the end-to-end test exercise what production will.

* **SendGrid v3 mail send**: the request body is validated with ``jsonschema`` against the
  extract of SendGrid's OpenAPI shipped in ``vendor_specs/`` (MIT), plus the documented rules
  the schema cannot express (dynamic templates ignore the message ``subject``, category limits).
* **HubSpot CRM v3/v4** and **Salesforce REST** publish no spec that may be copied here: the rules
  segflow relies on are written as code, each with the documentation page it comes from.
* **Marketo** (Adobe's REST API guide): Sync Leads, Get Leads by Filter Type, Add to List and
  Request Campaign, as code.
* **SMTP**: the message is parsed with the standard library's RFC 5322 parser and checked for the
  fields RFC 5322 §3.6 requires.

Beyond what the vendor validates, a few rules are segflow's own (``Violation.vendor_rejects`` is
False): a request the vendor would accept but that does nothing useful (a task about nobody, a
list add of ids HubSpot silently skips, an experiment whose subject a dynamic template
overrides). The receiver rejects those too, on purpose: they are the silent failures the demo
must surface.

Each check returns a list of :class:`Violation`; an empty list means the vendor accepts it.
:func:`vendor_error` turns violations into the status and body that vendor answers with.

The CRM "org" (which properties, fields, picklist values and external ids exist) is described by
:class:`HubSpotPortal` and :class:`SalesforceOrg`; their defaults are what the dispatcher
README's setup section asks an administrator to create.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

SPEC_DIR = Path(__file__).with_name("vendor_specs")

SENDGRID_DOC = "https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send"
SENDGRID_DYNAMIC_DOC = "https://www.twilio.com/docs/sendgrid/ui/sending-email/how-to-send-an-email-with-dynamic-templates"
SENDGRID_CATEGORIES_DOC = (
    "https://www.twilio.com/docs/sendgrid/for-developers/sending-email/categories"
)
HS_OBJECTS_DOC = (
    "https://developers.hubspot.com/docs/api-reference/latest/crm/objects/objects/guide"
)
HS_UPSERT_DOC = "https://developers.hubspot.com/docs/api-reference/latest/crm/activities/tasks/batch/upsert-tasks"
HS_TASKS_DOC = "https://developers.hubspot.com/docs/api-reference/latest/crm/activities/tasks/guide"
HS_TICKETS_DOC = (
    "https://developers.hubspot.com/docs/api-reference/latest/crm/objects/tickets/guide"
)
HS_ASSOC_DOC = "https://developers.hubspot.com/docs/api-reference/latest/crm/associations/associations-v4/guide"
HS_LISTS_DOC = (
    "https://developers.hubspot.com/docs/api-reference/2026-03/crm/lists/memberships/add-to-list"
)
SF_UPSERT_DOC = "https://developer.salesforce.com/docs/platform/api-rest/guide/resources-sobject-upsert-patch.md"
SF_ERRORS_DOC = (
    "https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/errorcodes.htm"
)
SF_OBJECTS_DOC = (
    "https://developer.salesforce.com/docs/atlas.en-us.object_reference.meta/object_reference/"
)
RFC5322 = "https://www.rfc-editor.org/rfc/rfc5322#section-3.6"


@dataclass(frozen=True)
class Violation:
    vendor: str  # sendgrid | hubspot | salesforce | smtp
    code: str  # the vendor's error code (INVALID_FIELD, PROPERTY_DOESNT_EXIST, ...)
    message: str
    field: str = ""
    doc: str = ""
    vendor_rejects: bool = True  # False: the vendor accepts it, but it does nothing useful

    def __str__(self) -> str:
        return f"{self.vendor} {self.code} {self.field}: {self.message}"


# -- the CRM orgs segflow expects ------------------------------------------------------------
HS_SEGFLOW_CONTACT_PROPS = frozenset(
    {
        "segflow_customer_id",  # unique
        "segflow_lifecycle",
        "segflow_risk",
        "segflow_status",
        "segflow_support_risk",
        "segflow_segment",
        "custom_segment",  # the primary segment, for email templates (seed 000 §4.1)
    }
)


@dataclass(frozen=True)
class HubSpotPortal:
    """Properties that exist in the portal (HubSpot answers 400 PROPERTY_DOESNT_EXIST for any
    other) and which of them hold unique values (usable as ``idProperty``)."""

    properties: dict[str, frozenset[str]] = field(
        default_factory=lambda: {
            "contacts": frozenset(
                {"email", "firstname", "lastname", "hubspot_owner_id", "lifecyclestage"}
            )
            | HS_SEGFLOW_CONTACT_PROPS,
            "tasks": frozenset(
                {
                    "hs_timestamp",
                    "hs_task_subject",
                    "hs_task_body",
                    "hs_task_status",
                    "hs_task_priority",
                    "hs_task_type",
                    "hubspot_owner_id",
                    "segflow_idempotency_key",
                    "segflow_customer_id",
                }
            ),
            "tickets": frozenset(
                {
                    "subject",
                    "content",
                    "hs_pipeline",
                    "hs_pipeline_stage",
                    "hs_ticket_priority",
                    "hubspot_owner_id",
                    "segflow_idempotency_key",
                    "segflow_customer_id",
                }
            ),
        }
    )
    unique: dict[str, frozenset[str]] = field(
        default_factory=lambda: {
            "contacts": frozenset({"email", "segflow_customer_id"}),
            "tasks": frozenset({"segflow_idempotency_key"}),
            "tickets": frozenset({"segflow_idempotency_key"}),
        }
    )


# HubSpot-defined association type ids (associations v4 guide, "association type id values")
HS_ASSOCIATION_TYPES = {("tasks", "contacts"): 204, ("tickets", "contacts"): 16}
HS_ENUMS = {  # the default options of HubSpot's own enumeration properties
    ("tasks", "hs_task_priority"): frozenset({"NONE", "LOW", "MEDIUM", "HIGH"}),
    ("tasks", "hs_task_status"): frozenset(
        {"NOT_STARTED", "IN_PROGRESS", "WAITING", "COMPLETED", "DEFERRED"}
    ),
    ("tasks", "hs_task_type"): frozenset({"CALL", "EMAIL", "TODO"}),
    ("tickets", "hs_ticket_priority"): frozenset({"LOW", "MEDIUM", "HIGH", "URGENT"}),
}
HS_REQUIRED = {  # required on create (tasks guide: hs_timestamp; tickets guide: three)
    "tasks": ("hs_timestamp",),
    "tickets": ("subject", "hs_pipeline", "hs_pipeline_stage"),
}


@dataclass(frozen=True)
class SalesforceOrg:
    """Fields per sObject (anything else is 400 INVALID_FIELD), external-id fields, fields
    required on create, and the restricted picklists' values (the org's defaults)."""

    fields: dict[str, frozenset[str]] = field(
        default_factory=lambda: {
            "Contact": frozenset(
                {
                    "Id",
                    "FirstName",
                    "LastName",
                    "Email",
                    "OwnerId",
                    "Segflow_Customer_Id__c",
                    "Segflow_Lifecycle__c",
                    "Segflow_Risk__c",
                    "Segflow_Status__c",
                    "Segflow_Support_Risk__c",
                    "Segflow_Segment__c",
                    "Custom_Segment__c",
                }
            ),
            "Task": frozenset(
                {
                    "Id",
                    "Subject",
                    "Description",
                    "Priority",
                    "Status",
                    "WhoId",
                    "WhatId",
                    "OwnerId",
                    "ActivityDate",
                    "Segflow_Idempotency_Key__c",
                    "Segflow_Customer_Id__c",
                }
            ),
            "Case": frozenset(
                {
                    "Id",
                    "Subject",
                    "Description",
                    "Priority",
                    "Origin",
                    "Status",
                    "ContactId",
                    "OwnerId",
                    "Segflow_Idempotency_Key__c",
                    "Segflow_Customer_Id__c",
                }
            ),
            # seed 000 §3.4: the custom object segflow keeps per customer and segment
            "CustomerRiskSegment__c": frozenset(
                {
                    "Id",
                    "Name",
                    "Contact__c",
                    "Segment_Name__c",
                    "In_Segment__c",
                    "Created_On__c",
                    "Last_Triggered__c",
                    "Churn_Score__c",
                    "Engagement_Decay__c",
                    "Last_Purchase_Date__c",
                    "Segflow_Key__c",
                    "Segflow_Customer_Id__c",
                }
            ),
            "CampaignMember": frozenset(
                {
                    "Id",
                    "CampaignId",
                    "ContactId",
                    "LeadId",
                    "Status",
                    "Segflow_Idempotency_Key__c",
                    "Segflow_Customer_Id__c",
                }
            ),
        }
    )
    external_ids: dict[str, frozenset[str]] = field(
        default_factory=lambda: {
            "Contact": frozenset({"Segflow_Customer_Id__c"}),
            "Task": frozenset({"Segflow_Idempotency_Key__c"}),
            "Case": frozenset({"Segflow_Idempotency_Key__c"}),
            "CampaignMember": frozenset({"Segflow_Idempotency_Key__c"}),
            "CustomerRiskSegment__c": frozenset({"Segflow_Key__c"}),
        }
    )
    required_on_create: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "Contact": ("LastName",),
            "Task": (),
            "Case": (),
            "CampaignMember": ("CampaignId",),
            "CustomerRiskSegment__c": ("Contact__c", "Segment_Name__c"),
        }
    )
    # field types the REST API checks (JSON_PARSER_ERROR / INVALID_TYPE_ON_FIELD_IN_RECORD)
    types: dict[tuple[str, str], str] = field(
        default_factory=lambda: {
            ("CustomerRiskSegment__c", "In_Segment__c"): "boolean",
            ("CustomerRiskSegment__c", "Created_On__c"): "date",
            ("CustomerRiskSegment__c", "Last_Purchase_Date__c"): "date",
            ("CustomerRiskSegment__c", "Last_Triggered__c"): "datetime",
            ("CustomerRiskSegment__c", "Churn_Score__c"): "number",
            ("CustomerRiskSegment__c", "Engagement_Decay__c"): "number",
            ("Task", "ActivityDate"): "date",
        }
    )
    picklists: dict[tuple[str, str], frozenset[str]] = field(
        default_factory=lambda: {
            ("Task", "Priority"): frozenset({"High", "Normal", "Low"}),
            ("Task", "Status"): frozenset(
                {"Not Started", "In Progress", "Completed", "Waiting on someone else", "Deferred"}
            ),
            ("Case", "Priority"): frozenset({"High", "Medium", "Low"}),
            ("Case", "Origin"): frozenset({"Phone", "Email", "Web"}),
            ("Case", "Status"): frozenset({"New", "Working", "Escalated", "Closed"}),
            ("CampaignMember", "Status"): frozenset({"Sent", "Responded"}),
        }
    )


# Salesforce record-id key prefixes (Object Reference: the first three characters of an Id)
SF_PREFIX = {"Contact": "003", "Lead": "00Q", "Campaign": "701", "User": "005", "Account": "001"}
_SF_ID = re.compile(r"^[a-zA-Z0-9]{15}([a-zA-Z0-9]{3})?$")
_DIGITS = re.compile(r"^[0-9]+$")
_TEMPLATE = re.compile(r"^d-[0-9a-f]{32}$")


_TYPE_OK = {
    "boolean": lambda v: isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "date": lambda v: isinstance(v, str) and bool(re.match(r"^\d{4}-\d{2}-\d{2}$", v)),
    "datetime": lambda v: (
        isinstance(v, str)
        and bool(re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{4})$", v))
    ),
}


def sf_id_ok(value: Any, *kinds: str) -> bool:
    return (
        isinstance(value, str)
        and bool(_SF_ID.match(value))
        and any(value.startswith(SF_PREFIX[k]) for k in kinds)
    )


# -- SendGrid --------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _sendgrid_validator() -> Any:
    import jsonschema

    doc = json.loads((SPEC_DIR / "sendgrid-mail-send.json").read_text())
    schema = dict(doc)
    schema["$ref"] = "#/components/requestBodies/PostMailSend/content/application~1json/schema"
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def check_sendgrid(body: Any) -> list[Violation]:
    """``POST /v3/mail/send``: SendGrid's schema, then the documented rules it cannot express."""
    out: list[Violation] = []
    for err in _sendgrid_validator().iter_errors(body):
        where = ".".join(str(p) for p in err.absolute_path) or "(root)"
        out.append(Violation("sendgrid", "invalid", err.message[:300], where, SENDGRID_DOC))
    if not isinstance(body, dict) or out:
        return out
    pers = [p for p in body.get("personalizations", []) if isinstance(p, dict)]
    template = body.get("template_id")
    if isinstance(template, str) and template.startswith("d-"):
        if not _TEMPLATE.match(template):
            out.append(
                Violation(
                    "sendgrid",
                    "invalid",
                    "a dynamic template id is d- followed by 32 hex digits",
                    "template_id",
                    SENDGRID_DYNAMIC_DOC,
                )
            )
        # a dynamic template's own subject line wins over the message's subject
        if "subject" in body or any("subject" in p for p in pers):
            out.append(
                Violation(
                    "sendgrid",
                    "ignored",
                    "with a dynamic template the template's subject overrides `subject`:"
                    " send it in personalizations[].dynamic_template_data",
                    "subject",
                    SENDGRID_DYNAMIC_DOC,
                    vendor_rejects=False,
                )
            )
        if any("subject" not in (p.get("dynamic_template_data") or {}) for p in pers):
            out.append(
                Violation(
                    "sendgrid",
                    "segflow",
                    "segflow's templates take their subject from dynamic_template_data.subject",
                    "personalizations.dynamic_template_data.subject",
                    SENDGRID_DYNAMIC_DOC,
                    vendor_rejects=False,
                )
            )
    for p in pers:
        for k, v in (p.get("custom_args") or {}).items():
            if not isinstance(v, str):
                out.append(
                    Violation(
                        "sendgrid",
                        "invalid",
                        "custom_args values must be strings",
                        f"personalizations.custom_args.{k}",
                        SENDGRID_DOC,
                    )
                )
    cats = body.get("categories") or []
    if len(cats) > 10 or any(not c.isascii() or len(c) > 255 for c in cats):
        out.append(
            Violation(
                "sendgrid",
                "invalid",
                "at most 10 ASCII categories of at most 255 characters",
                "categories",
                SENDGRID_CATEGORIES_DOC,
            )
        )
    campaign = next(
        (p.get("custom_args", {}).get("campaign_id") for p in pers if p.get("custom_args")), None
    )
    # categories are account-wide: a bare variant name ("A") mixes every campaign's variant A
    if cats and any(c != "segflow" and not (campaign and c.startswith(campaign)) for c in cats):
        out.append(
            Violation(
                "sendgrid",
                "segflow",
                "categories are account-wide: each must be 'segflow' or start with the campaign id",
                "categories",
                SENDGRID_CATEGORIES_DOC,
                vendor_rejects=False,
            )
        )
    if not isinstance(body.get("asm"), dict):
        out.append(
            Violation(
                "sendgrid",
                "segflow",
                "no asm.group_id: unsubscribes at SendGrid would never reach segflow",
                "asm.group_id",
                SENDGRID_DOC,
                vendor_rejects=False,
            )
        )
    return out


# -- HubSpot ---------------------------------------------------------------------------------
def _hs(
    code: str, message: str, where: str = "", doc: str = HS_OBJECTS_DOC, **kw: Any
) -> Violation:
    return Violation("hubspot", code, message, where, doc, **kw)


def _hs_properties(
    portal: HubSpotPortal, obj: str, props: Any, create: bool, where: str
) -> list[Violation]:
    if not isinstance(props, dict):
        return [_hs("VALIDATION_ERROR", "properties must be an object", where)]
    out = []
    known = portal.properties.get(obj, frozenset())
    for name, value in props.items():
        if name not in known:
            out.append(
                _hs("PROPERTY_DOESNT_EXIST", f'Property "{name}" does not exist', f"{where}.{name}")
            )
        elif not isinstance(value, str):
            out.append(_hs("INVALID_OPTION", "property values are strings", f"{where}.{name}"))
        elif (obj, name) in HS_ENUMS and value not in HS_ENUMS[(obj, name)]:
            out.append(
                _hs(
                    "INVALID_OPTION",
                    f'"{value}" is not a valid option for {name}',
                    f"{where}.{name}",
                )
            )
        elif name == "hubspot_owner_id" and not _DIGITS.match(value):
            out.append(_hs("INVALID_OWNER_ID", f"{value!r} is not an owner id", f"{where}.{name}"))
    if create:
        for name in HS_REQUIRED.get(obj, ()):
            if not props.get(name):
                out.append(
                    _hs("VALIDATION_ERROR", f"{name} is required", f"{where}.{name}", HS_TASKS_DOC)
                )
        if obj in ("tasks", "tickets") and not props.get("hubspot_owner_id"):
            out.append(
                _hs(
                    "segflow",
                    f"a {obj[:-1]} with no owner is worked by nobody",
                    f"{where}.hubspot_owner_id",
                    HS_TASKS_DOC,
                    vendor_rejects=False,
                )
            )
    return out


def check_hubspot(
    method: str, path: str, query: dict[str, str], body: Any, portal: HubSpotPortal | None = None
) -> list[Violation]:
    portal = portal or HubSpotPortal()
    parts = [unquote(p) for p in path.strip("/").split("/")]
    # GET/PATCH /crm/v3/objects/contacts/{id}[?idProperty=]
    if parts[:4] == ["crm", "v3", "objects", "contacts"] and len(parts) == 5:
        out = []
        id_prop = query.get("idProperty")
        if id_prop is not None and id_prop not in portal.unique["contacts"]:
            out.append(_hs("VALIDATION_ERROR", f"{id_prop} is not a unique property", "idProperty"))
        if id_prop is None and not _DIGITS.match(parts[4]):
            out.append(_hs("VALIDATION_ERROR", "a record id is numeric", "contactId"))
        if method == "PATCH":
            props = body.get("properties") if isinstance(body, dict) else None
            out += _hs_properties(portal, "contacts", props, False, "properties")
        elif method != "GET":
            out.append(_hs("METHOD_NOT_ALLOWED", f"{method} {path}"))
        return out
    # POST /crm/v3/objects/{tasks|tickets}[/batch/upsert]
    if parts[:3] == ["crm", "v3", "objects"] and len(parts) >= 4 and parts[3] in HS_REQUIRED:
        obj = parts[3]
        if method != "POST":
            return [_hs("METHOD_NOT_ALLOWED", f"{method} {path}")]
        if parts[4:] == ["batch", "upsert"]:
            inputs = body.get("inputs") if isinstance(body, dict) else None
            if not isinstance(inputs, list) or not inputs:
                return [
                    _hs("VALIDATION_ERROR", "inputs: a non-empty array", "inputs", HS_UPSERT_DOC)
                ]
            out = []
            for i, item in enumerate(inputs):
                if not isinstance(item, dict):
                    out.append(_hs("VALIDATION_ERROR", "an input is an object", f"inputs.{i}"))
                    continue
                if item.get("idProperty") not in portal.unique.get(obj, frozenset()):
                    out.append(
                        _hs(
                            "VALIDATION_ERROR",
                            f"idProperty {item.get('idProperty')!r} is not a unique property",
                            f"inputs.{i}.idProperty",
                            HS_UPSERT_DOC,
                        )
                    )
                if not isinstance(item.get("id"), str) or not item["id"]:
                    out.append(_hs("VALIDATION_ERROR", "id is required", f"inputs.{i}.id"))
                out += _hs_properties(
                    portal, obj, item.get("properties"), True, f"inputs.{i}.properties"
                )
            return out
        if parts[4:]:
            return [_hs("NOT_FOUND", f"no such path {path}")]
        out = _hs_properties(
            portal,
            obj,
            body.get("properties") if isinstance(body, dict) else None,
            True,
            "properties",
        )
        assoc = body.get("associations") if isinstance(body, dict) else None
        want = HS_ASSOCIATION_TYPES[(obj, "contacts")]
        linked = [
            a
            for a in assoc or []
            if isinstance(a, dict)
            and _DIGITS.match(str((a.get("to") or {}).get("id", "")))
            and any(t.get("associationTypeId") == want for t in a.get("types") or [])
        ]
        if not linked:
            out.append(
                _hs(
                    "segflow",
                    f"a {obj[:-1]} must be associated with its contact (associationTypeId {want})",
                    "associations",
                    HS_ASSOC_DOC,
                    vendor_rejects=False,
                )
            )
        return out
    # PUT /crm/v4/objects/{from}/{id}/associations/default/{to}/{toId}
    if (
        parts[:3] == ["crm", "v4", "objects"]
        and len(parts) == 9
        and parts[5:7]
        == [
            "associations",
            "default",
        ]
    ):
        out = []
        if method != "PUT":
            out.append(_hs("METHOD_NOT_ALLOWED", f"{method} {path}", doc=HS_ASSOC_DOC))
        if (parts[3], parts[7]) not in HS_ASSOCIATION_TYPES:
            out.append(_hs("VALIDATION_ERROR", f"no default association {parts[3]} -> {parts[7]}"))
        for p in (parts[4], parts[8]):
            if not _DIGITS.match(p):
                out.append(
                    _hs("VALIDATION_ERROR", f"{p!r} is not a record id", "objectId", HS_ASSOC_DOC)
                )
        return out
    # PUT /crm/v3/lists/{listId}/memberships/add
    if parts[:3] == ["crm", "v3", "lists"] and parts[4:] == ["memberships", "add"]:
        out = []
        if method != "PUT":
            out.append(_hs("METHOD_NOT_ALLOWED", f"{method} {path}", doc=HS_LISTS_DOC))
        if not _DIGITS.match(parts[3]):
            out.append(
                _hs(
                    "VALIDATION_ERROR",
                    "listId is the list's numeric ILS id",
                    "listId",
                    HS_LISTS_DOC,
                )
            )
        if not isinstance(body, list) or not body:
            out.append(
                _hs("VALIDATION_ERROR", "the body is an array of record ids", "", HS_LISTS_DOC)
            )
        elif any(not isinstance(x, str) or not _DIGITS.match(x) for x in body):
            # HubSpot answers 200 and lists them in recordIdsMissing: nobody was added
            out.append(
                _hs(
                    "segflow",
                    "record ids are HubSpot's numeric ids; others are skipped (recordIdsMissing)",
                    "",
                    HS_LISTS_DOC,
                    vendor_rejects=False,
                )
            )
        return out
    return [_hs("NOT_FOUND", f"segflow does not use {method} {path}")]


# -- Salesforce ------------------------------------------------------------------------------
def _sf(code: str, message: str, where: str = "", doc: str = SF_ERRORS_DOC, **kw: Any) -> Violation:
    return Violation("salesforce", code, message, where, doc, **kw)


def _sf_fields(org: SalesforceOrg, obj: str, body: Any, create: bool) -> list[Violation]:
    if not isinstance(body, dict):
        return [_sf("JSON_PARSER_ERROR", "the body is a JSON object of fields")]
    out = []
    known = org.fields[obj]
    for name, value in body.items():
        if name not in known:
            out.append(
                _sf("INVALID_FIELD", f"No such column '{name}' on sobject of type {obj}", name)
            )
        elif (obj, name) in org.picklists and value not in org.picklists[(obj, name)]:
            out.append(
                _sf(
                    "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                    f"bad value for restricted picklist field: {value}",
                    name,
                )
            )
    for name, value in body.items():
        kind = org.types.get((obj, name))
        if kind is not None and not _TYPE_OK[kind](value):
            out.append(
                _sf(
                    "INVALID_TYPE_ON_FIELD_IN_RECORD",
                    f"{name}: value not of required type: {value!r} (a {kind})",
                    name,
                )
            )
    for name, kinds in (
        ("Contact__c", ("Contact",)),
        ("WhoId", ("Contact", "Lead")),
        ("ContactId", ("Contact",)),
        ("LeadId", ("Lead",)),
        ("CampaignId", ("Campaign",)),
        ("OwnerId", ("User",)),
    ):
        if name in body and not sf_id_ok(body[name], *kinds):
            out.append(
                _sf("MALFORMED_ID", f"{name}: id value of incorrect type: {body[name]}", name)
            )
    if create:
        for name in org.required_on_create.get(obj, ()):
            if not body.get(name):
                out.append(
                    _sf("REQUIRED_FIELD_MISSING", f"Required fields are missing: [{name}]", name)
                )
        if obj == "CampaignMember" and not (body.get("ContactId") or body.get("LeadId")):
            out.append(
                _sf(
                    "REQUIRED_FIELD_MISSING",
                    "Required fields are missing: [ContactId, LeadId]",
                    "ContactId",
                )
            )
        related = {"Task": "WhoId", "Case": "ContactId"}.get(obj)
        if related and not body.get(related):
            out.append(
                _sf(
                    "segflow",
                    f"a {obj} with no {related} is about nobody",
                    related,
                    SF_OBJECTS_DOC,
                    vendor_rejects=False,
                )
            )
    return out


def check_salesforce(
    method: str, path: str, query: dict[str, str], body: Any, org: SalesforceOrg | None = None
) -> list[Violation]:
    org = org or SalesforceOrg()
    m = re.match(r"^/services/data/v(\d+)\.(\d)/sobjects/(.*)$", path)
    if not m:
        return [_sf("NOT_FOUND", f"The requested resource does not exist: {path}")]
    version = int(m.group(1))
    parts = [unquote(p) for p in m.group(3).strip("/").split("/")]
    obj = parts[0]
    if obj not in org.fields:
        return [_sf("NOT_FOUND", f"The requested resource does not exist: sObject type '{obj}'")]
    if len(parts) == 1:  # POST /sobjects/{obj}: create
        if method != "POST":
            return [_sf("METHOD_NOT_ALLOWED", f"HTTP Method '{method}' not allowed")]
        return _sf_fields(org, obj, body, True)
    if len(parts) != 3:
        return [_sf("NOT_FOUND", f"The requested resource does not exist: {path}")]
    ext = parts[1]
    if ext not in org.external_ids.get(obj, frozenset()):
        return [
            _sf(
                "NOT_FOUND",
                f"Provided external ID field does not exist or is not accessible: {ext}",
                ext,
                SF_UPSERT_DOC,
            )
        ]
    if method == "GET":
        fields = [f for f in query.get("fields", "").split(",") if f]
        return [
            _sf("INVALID_FIELD", f"No such column '{f}' on sobject of type {obj}", f)
            for f in fields
            if f not in org.fields[obj]
        ]
    if method != "PATCH":
        return [_sf("METHOD_NOT_ALLOWED", f"HTTP Method '{method}' not allowed")]
    update_only = query.get("updateOnly") == "true"
    out = []
    if update_only and version < 61:
        out.append(_sf("INVALID_QUERY_PARAMETER", "updateOnly needs API version 61.0 or later"))
    if isinstance(body, dict) and (ext in body or "Id" in body):
        out.append(
            _sf(
                "INVALID_FIELD",
                "Do not specify Id or the external ID field in the request body",
                ext,
                SF_UPSERT_DOC,
            )
        )
    # an upsert that matches nothing creates the record: the create-required fields apply
    return out + _sf_fields(org, obj, body, not update_only)


# -- Marketo ---------------------------------------------------------------------------------
MKTO_LEADS_DOC = (
    "https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/lead-database/leads"
)
MKTO_LISTS_DOC = (
    "https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/assets/static-lists"
)
MKTO_TRIGGER_DOC = (
    "https://experienceleague.adobe.com/en/docs/marketo-developer/marketo/rest/"
    "lead-database/smart-campaigns"
)
MKTO_ACTIONS = frozenset({"createOnly", "updateOnly", "createOrUpdate", "createDuplicate"})
_MY_TOKEN = re.compile(r"^\{\{my\.[^{}]+\}\}$")


@dataclass(frozen=True)
class MarketoInstance:
    """Lead fields by REST name (the Describe Leads call's source of truth) and the fields
    that can be a ``lookupField`` / ``filterType`` (searchable, unique for segflow's id)."""

    fields: frozenset[str] = frozenset(
        {
            "id",
            "email",
            "firstName",
            "lastName",
            "segflowCustomerId",
            "segflowLifecycle",
            "segflowRisk",
            "segflowStatus",
            "segflowSupportRisk",
            "segflowSegment",
            "customSegment",
        }
    )
    lookup: frozenset[str] = frozenset({"id", "email", "segflowCustomerId"})


def _mk(code: str, message: str, where: str = "", doc: str = MKTO_LEADS_DOC) -> Violation:
    return Violation("marketo", code, message, where, doc)


def _mk_ids(items: Any, where: str, limit: int) -> list[Violation]:
    if not isinstance(items, list) or not items or len(items) > limit:
        return [_mk("1003", f"{where}: 1 to {limit} leads", where)]
    if any(not isinstance(i, dict) or not isinstance(i.get("id"), int) for i in items):
        return [_mk("1003", f"{where}: each lead is {{'id': <int lead id>}}", where)]
    return []


def check_marketo(
    method: str, path: str, query: dict[str, str], body: Any, inst: MarketoInstance | None = None
) -> list[Violation]:
    inst = inst or MarketoInstance()
    if path == "/rest/v1/leads.json" and method == "GET":  # Get Leads by Filter Type
        out = []
        if query.get("filterType") not in inst.lookup:
            out.append(_mk("1003", f"filterType {query.get('filterType')!r} is not searchable"))
        if not query.get("filterValues"):
            out.append(_mk("1003", "filterValues is required"))
        out += [
            _mk("1006", f"Field '{f}' not found", f)
            for f in query.get("fields", "").split(",")
            if f and f not in inst.fields
        ]
        return out
    if path == "/rest/v1/leads.json" and method == "POST":  # Sync Leads
        if not isinstance(body, dict):
            return [_mk("609", "Invalid JSON")]
        out = []
        if body.get("action", "createOrUpdate") not in MKTO_ACTIONS:
            out.append(_mk("1003", f"action must be one of {sorted(MKTO_ACTIONS)}", "action"))
        lookup = body.get("lookupField", "email")
        if lookup not in inst.lookup:
            out.append(_mk("1003", f"lookupField {lookup!r} is not a lookup field", "lookupField"))
        leads = body.get("input")
        if not isinstance(leads, list) or not 1 <= len(leads) <= 300:
            return out + [_mk("1003", "input: 1 to 300 leads", "input")]
        for i, lead in enumerate(leads):
            if not isinstance(lead, dict) or lookup not in lead:
                out.append(_mk("1003", f"input.{i}: the lookup field {lookup} is missing"))
                continue
            out += [
                _mk("1006", f"Field '{f}' not found", f"input.{i}.{f}")
                for f in lead
                if f not in inst.fields
            ]
        return out
    m = re.match(r"^/rest/v1/lists/([^/]+)/leads\.json$", path)
    if m and method == "POST":  # Add to List
        out = [] if m.group(1).isdigit() else [_mk("1013", "Static list not found", "listId")]
        items = body.get("input") if isinstance(body, dict) else None
        return out + _mk_ids(items, "input", 300)
    m = re.match(r"^/rest/v1/campaigns/([^/]+)/trigger\.json$", path)
    if m and method == "POST":  # Request Campaign
        out = [] if m.group(1).isdigit() else [_mk("1013", "Campaign not found", "campaignId")]
        inp = body.get("input") if isinstance(body, dict) else None
        if not isinstance(inp, dict):
            return out + [_mk("1003", "input: {leads, tokens}", "input", MKTO_TRIGGER_DOC)]
        out += _mk_ids(inp.get("leads"), "input.leads", 100)
        for t in inp.get("tokens") or []:
            if not isinstance(t, dict) or not _MY_TOKEN.match(str(t.get("name", ""))):
                out.append(
                    _mk(
                        "1003",
                        "a token is {name: '{{my.Name}}', value}",
                        "tokens",
                        MKTO_TRIGGER_DOC,
                    )
                )
        return out
    return [_mk("610", f"Requested resource not found: {method} {path}")]


# -- SMTP ------------------------------------------------------------------------------------
_MSG_ID = re.compile(r"^<[^<>@\s]+@([A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+)>$")


def check_smtp(raw: bytes) -> list[Violation]:
    """RFC 5322 §3.6: exactly one Date and one From; a Message-ID is ``<left@domain>``."""
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    out: list[Violation] = []
    for name in ("Date", "From"):
        n = len(msg.get_all(name) or [])
        if n != 1:
            out.append(
                Violation("smtp", "554", f"{name} must appear once (found {n})", name, RFC5322)
            )
    if msg["Date"]:
        try:
            parsedate_to_datetime(str(msg["Date"]))
        except (TypeError, ValueError):
            out.append(
                Violation("smtp", "554", "Date is not an RFC 5322 date-time", "Date", RFC5322)
            )
    mid = msg.get_all("Message-ID") or []
    if len(mid) > 1:
        out.append(
            Violation("smtp", "554", "Message-ID appears more than once", "Message-ID", RFC5322)
        )
    if mid and not _MSG_ID.match(str(mid[0]).strip()):
        out.append(
            Violation(
                "smtp",
                "554",
                f"Message-ID {str(mid[0])!r} is not <id@domain> with a fully qualified domain",
                "Message-ID",
                RFC5322,
            )
        )
    for line in raw.split(b"\r\n" if b"\r\n" in raw else b"\n"):
        if len(line) > 998:
            out.append(Violation("smtp", "554", "a line longer than 998 characters", "", RFC5322))
            break
    return out


# -- dispatch by path and the vendors' error answers -----------------------------------------
def vendor_of(path: str) -> str | None:
    if path.startswith("/v3/mail/send"):
        return "sendgrid"
    if path.startswith("/crm/"):
        return "hubspot"
    if path.startswith("/services/data/"):
        return "salesforce"
    if path.startswith("/rest/v1/"):
        return "marketo"
    return None


def check_http(
    method: str,
    url: str,
    body: Any,
    portal: HubSpotPortal | None = None,
    org: SalesforceOrg | None = None,
) -> list[Violation]:
    """Every contract violation of one HTTP request (``url`` may be a full URL or a path)."""
    split = urlsplit(url)
    path = split.path
    query = {k: v[-1] for k, v in parse_qs(split.query).items()}
    vendor = vendor_of(path)
    if vendor == "sendgrid":
        if method != "POST":
            return [Violation("sendgrid", "invalid", f"{method} not allowed", "", SENDGRID_DOC)]
        return check_sendgrid(body)
    if vendor == "hubspot":
        return check_hubspot(method, path, query, body, portal)
    if vendor == "salesforce":
        return check_salesforce(method, path, query, body, org)
    if vendor == "marketo":
        return check_marketo(method, path, query, body)
    return []


def vendor_error(violations: list[Violation]) -> tuple[int, Any]:
    """The status and body the vendor answers a request with these violations."""
    v = violations[0]
    if v.vendor == "salesforce":
        status = 404 if v.code == "NOT_FOUND" else 405 if v.code == "METHOD_NOT_ALLOWED" else 400
        return status, [
            {"message": x.message, "errorCode": x.code, "fields": [x.field] if x.field else []}
            for x in violations
        ]
    if v.vendor == "hubspot":
        status = 404 if v.code == "NOT_FOUND" else 405 if v.code == "METHOD_NOT_ALLOWED" else 400
        return status, {
            "status": "error",
            "message": "; ".join(x.message for x in violations),
            "correlationId": "segflow-receiver",
            "category": "VALIDATION_ERROR" if status == 400 else "OBJECT_NOT_FOUND",
            "errors": [
                {"message": x.message, "code": x.code, "context": {"propertyName": [x.field]}}
                for x in violations
            ],
        }
    if v.vendor == "marketo":  # Marketo answers 200 and reports errors in the body
        return 200, {
            "requestId": "segflow#receiver",
            "success": False,
            "errors": [{"code": x.code, "message": x.message} for x in violations],
        }
    if v.vendor == "sendgrid":
        return 400, {
            "errors": [
                {"message": x.message, "field": x.field or None, "help": x.doc} for x in violations
            ]
        }
    return 554, "; ".join(x.message for x in violations)
