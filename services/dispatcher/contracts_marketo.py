"""The Marketo contract (Adobe's REST API guide): Sync Leads, Get Leads by Filter Type, Add to
List and Request Campaign, as code. Moved out of ``contracts.py`` unchanged (which re-exports
every name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from services.dispatcher.contracts_common import (
    Violation,
)

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
