"""CRM adapters for HubSpot (CRM v3/v4) and Salesforce (REST). Moved out of ``adapters.py``
unchanged (which re-exports them); see that module for the guarantees every adapter keeps.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from services.dispatcher.core import Request
from services.dispatcher.transport import (
    _LRU,
    CallFailed,
    HttpClient,
    Rejected,
    Sent,
    _call,
    _iso,
    _json,
    _merge,
    _request,
    classify,
)


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
