"""The HubSpot and Salesforce contracts: the CRM orgs segflow expects (:class:`HubSpotPortal`,
:class:`SalesforceOrg`) and the checks of each call. Moved out of ``contracts.py`` unchanged
(which re-exports every name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from services.dispatcher.contracts_common import (
    HS_ASSOC_DOC,
    HS_LISTS_DOC,
    HS_OBJECTS_DOC,
    HS_TASKS_DOC,
    HS_UPSERT_DOC,
    SF_ERRORS_DOC,
    SF_OBJECTS_DOC,
    SF_UPSERT_DOC,
    Violation,
)

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
