# TEMPORARY baseline shim: today's adapters behind the factory the contract tests call
from __future__ import annotations
from typing import Any, Literal
from pydantic_settings import BaseSettings, SettingsConfigDict
from services.dispatcher.adapters import HubSpotCRM, SalesforceCRM, SendGridEmail, Router

class VendorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEGFLOW_DISPATCHER_", extra="ignore", frozen=True)
    crm_kind: Literal["hubspot", "salesforce"] = "hubspot"
    hubspot_lists: dict[str, str] = {}
    hubspot_owner_id: str | None = None
    salesforce_campaigns: dict[str, str] = {}
    salesforce_owner_id: str | None = None
    sendgrid_templates: dict[str, str] = {}
    sendgrid_asm_group_id: int | None = None

def make_adapters(cfg: Any, client: Any, contacts: Any, base_url: str, sender: str) -> Router:
    crm = HubSpotCRM if cfg.crm_kind == "hubspot" else SalesforceCRM
    return Router(crm=crm(client, base_url, "tok"), email=SendGridEmail(client, base_url, "k", sender, contacts))
