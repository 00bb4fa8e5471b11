"""The playbooks' and the policy's data types, pure: channels, :class:`Step`, :class:`Variant`,
:class:`Experiment`, :class:`Playbook`, :class:`Policy`, the :class:`Book` the dispatcher runs,
and template rendering (sandboxed Jinja, strict). Moved out of ``playbooks.py`` unchanged
(which parses them from YAML and re-exports every name).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateError, meta
from jinja2.sandbox import SandboxedEnvironment

CHANNELS = (
    "email",
    "smtp",
    "crm_property",
    "crm_task",
    "crm_list",
    "support_escalation",
    "webhook",
    "crm_segment",  # Salesforce CustomerRiskSegment__c record (playbooks/salesforce/)
)
#: Channels that reach the customer directly (quiet hours, unsubscribe, do-not-contact).
CUSTOMER_FACING = frozenset({"email", "smtp", "webhook"})
EMAIL_CHANNELS = frozenset({"email", "smtp"})
#: Data syncs to the CRM: they never compete under playbook priority.
SYNC_CHANNELS = frozenset({"crm_property", "crm_list", "crm_segment"})
TRANSITIONS = ("entered", "exited", "re_engaged", "deprecated", "reactivated", "primary_changed")
HOLDOUT = "holdout"

_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")
#: Variables every template may use: the action's segment, playbook and variant.
BUILTIN_VARIABLES = frozenset({"segment", "playbook", "variant"})
# Sandboxed (a template cannot reach Python internals) and strict (an undefined variable is an
# error, never an empty string in a customer's subject line). Not autoescaped: the output is
# a subject, a plain-text body or a CRM field, not HTML.
_TEMPLATES = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


class RenderError(ValueError):
    """A template could not be rendered (the action fails; nothing is sent)."""


@lru_cache(maxsize=4096)
def _compiled(template: str) -> Any:
    return _TEMPLATES.from_string(template)


def template_variables(template: str) -> set[str]:
    """The variables a template reads; raises ``ValueError`` if it is not a valid template.

    >>> sorted(template_variables("Hi {{first_name}}, try {{ product_recommended }}"))
    ['first_name', 'product_recommended']
    """
    try:
        return set(meta.find_undeclared_variables(_TEMPLATES.parse(template)))
    except TemplateError as exc:
        raise ValueError(f"not a valid template ({exc})") from exc


def render(template: str, variables: Mapping[str, str]) -> str:
    """Render ``{{name}}`` placeholders; an unknown name raises :class:`RenderError`.

    >>> render("Hi {{first_name}}", {"first_name": "Ada"})
    'Hi Ada'
    >>> render("Hi {{first_name}}", {})
    Traceback (most recent call last):
    ...
    services.dispatcher.playbook_model.RenderError: 'first_name' is undefined
    """
    try:
        return str(_compiled(template).render(**variables))
    except TemplateError as exc:
        raise RenderError(str(exc)) from exc


@dataclass(frozen=True)
class Step:
    id: str
    channel: str
    after_ms: int = 0
    template: str | None = None
    subject: str | None = None
    body: str | None = None
    list_id: str | None = None
    properties: tuple[tuple[str, str], ...] = ()
    variables: tuple[tuple[str, str], ...] = ()
    no_engagement_since: str | None = None  # step id: skip if the customer engaged since it
    task_priority: str = "HIGH"


@dataclass(frozen=True)
class Variant:
    name: str
    weight: float = 1.0
    overrides: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()  # step id → fields

    def apply(self, step: Step) -> Step:
        """The step with this variant's overrides (template, subject, body) applied."""
        for step_id, fields in self.overrides:
            if step_id == step.id:
                changes: dict[str, Any] = {}
                for k, v in fields:
                    if k == "variables":
                        continue
                    changes[k] = v
                return _replace(step, changes)
        return step


def _replace(step: Step, changes: dict[str, Any]) -> Step:
    from dataclasses import replace

    return replace(step, **changes)


@dataclass(frozen=True)
class Experiment:
    holdout: float = 0.0
    variants: tuple[Variant, ...] = (Variant("control"),)


@dataclass(frozen=True)
class Playbook:
    name: str
    segment: str
    steps: tuple[Step, ...]
    version: str = "1"
    priority: int = 0
    triggers: tuple[str, ...] = ("entered",)
    cancel_on: tuple[str, ...] = ("exited", "re_engaged")
    campaign_id: str | None = None
    experiment: Experiment = Experiment()
    defaults: tuple[tuple[str, str], ...] = ()
    source: str = ""

    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def variant(self, name: str) -> Variant | None:
        for v in self.experiment.variants:
            if v.name == name:
                return v
        return None


@dataclass(frozen=True)
class Cap:
    max: int
    per_ms: int


@dataclass(frozen=True)
class Policy:
    """Caps and cooldowns per customer and channel (across playbooks), quiet hours, windows."""

    caps: tuple[tuple[str, tuple[Cap, ...]], ...] = ()
    cooldowns: tuple[tuple[str, int], ...] = ()
    quiet_start_min: int | None = None  # minutes after local midnight
    quiet_end_min: int | None = None
    quiet_channels: frozenset[str] = CUSTOMER_FACING
    default_timezone: str = "UTC"
    attribution_ms: int = 7 * 86_400_000
    engagement_events: frozenset[str] = frozenset(
        {"email_open", "email_click", "login", "session_start", "feature_use", "purchase"}
    )
    ledger_retention_ms: int = 30 * 86_400_000

    # Derived once per (immutable) policy: these are read for every decision.
    @cached_property
    def _caps(self) -> dict[str, tuple[Cap, ...]]:
        return dict(self.caps)

    @cached_property
    def _cooldowns(self) -> dict[str, int]:
        return dict(self.cooldowns)

    def caps_for(self, channel: str) -> tuple[Cap, ...]:
        return self._caps.get(channel, ())

    def cooldown_for(self, channel: str) -> int:
        return self._cooldowns.get(channel, 0)

    @cached_property
    def history_ms(self) -> int:
        """How far back the send history must reach to check every cap and cooldown."""
        spans = [c.per_ms for _, caps in self.caps for c in caps] + [v for _, v in self.cooldowns]
        return max(spans, default=0)


@dataclass(frozen=True)
class Book:
    """Every playbook and the policy, as loaded."""

    playbooks: tuple[Playbook, ...]
    policy: Policy = field(default_factory=Policy)

    def for_segment(self, segment: str) -> list[Playbook]:
        return [p for p in self.playbooks if p.segment == segment]

    def get(self, name: str) -> Playbook | None:
        for p in self.playbooks:
            if p.name == name:
                return p
        return None

    @cached_property
    def template_traits(self) -> frozenset[str]:
        """Every variable the playbooks' templates read: the customer attributes
        (segflow.attributes, issue 19) the dispatcher keeps for rendering."""
        names: set[str] = set()
        for pb in self.playbooks:
            for step in pb.steps:
                texts = [step.subject, step.body, *(v for _, v in step.properties)]
                texts += [v for _, v in step.variables]
                for variant in pb.experiment.variants:
                    texts += [v for _, fields in variant.overrides for _, v in fields]
                for text in texts:
                    if text:
                        names |= template_variables(text)
        return frozenset(names)
