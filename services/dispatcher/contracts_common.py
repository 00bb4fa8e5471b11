"""Shared by the vendor contracts: the documentation pages each rule comes from and
:class:`Violation`. Moved out of ``contracts.py`` unchanged (which re-exports every name).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
