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
from email import policy
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs, urlsplit

from services.dispatcher.contracts_common import (
    HS_ASSOC_DOC,
    HS_LISTS_DOC,
    HS_OBJECTS_DOC,
    HS_TASKS_DOC,
    HS_TICKETS_DOC,
    HS_UPSERT_DOC,
    RFC5322,
    SENDGRID_CATEGORIES_DOC,
    SENDGRID_DOC,
    SENDGRID_DYNAMIC_DOC,
    SF_ERRORS_DOC,
    SF_OBJECTS_DOC,
    SF_UPSERT_DOC,
    SPEC_DIR,
    Violation,
)
from services.dispatcher.contracts_crm import (
    _TEMPLATE,
    HS_ASSOCIATION_TYPES,
    HS_ENUMS,
    HS_REQUIRED,
    HS_SEGFLOW_CONTACT_PROPS,
    SF_PREFIX,
    HubSpotPortal,
    SalesforceOrg,
    check_hubspot,
    check_salesforce,
    sf_id_ok,
)
from services.dispatcher.contracts_marketo import (
    MKTO_ACTIONS,
    MKTO_LEADS_DOC,
    MKTO_LISTS_DOC,
    MKTO_TRIGGER_DOC,
    MarketoInstance,
    check_marketo,
)

__all__ = [
    "HS_ASSOCIATION_TYPES",
    "HS_ASSOC_DOC",
    "HS_ENUMS",
    "HS_LISTS_DOC",
    "HS_OBJECTS_DOC",
    "HS_REQUIRED",
    "HS_SEGFLOW_CONTACT_PROPS",
    "HS_TASKS_DOC",
    "HS_TICKETS_DOC",
    "HS_UPSERT_DOC",
    "HubSpotPortal",
    "MKTO_ACTIONS",
    "MKTO_LEADS_DOC",
    "MKTO_LISTS_DOC",
    "MKTO_TRIGGER_DOC",
    "MarketoInstance",
    "RFC5322",
    "SENDGRID_CATEGORIES_DOC",
    "SENDGRID_DOC",
    "SENDGRID_DYNAMIC_DOC",
    "SF_ERRORS_DOC",
    "SF_OBJECTS_DOC",
    "SF_PREFIX",
    "SF_UPSERT_DOC",
    "SPEC_DIR",
    "SalesforceOrg",
    "Violation",
    "check_http",
    "check_hubspot",
    "check_marketo",
    "check_salesforce",
    "check_sendgrid",
    "check_smtp",
    "sf_id_ok",
    "vendor_error",
    "vendor_of",
]


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
