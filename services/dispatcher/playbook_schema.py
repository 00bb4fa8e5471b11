"""The shape of a playbook file as pydantic models (pure): a document is a
:class:`PlaybookModel` or a :class:`PolicyDocument`. :mod:`services.dispatcher.playbooks`
validates the data of :mod:`segflow.yamldoc` with them, reports an error with the line and the
path of its value, and turns a valid model into the types of
:mod:`services.dispatcher.playbook_model`.

Every mapping is a :class:`segflow.yamldoc.Strict` model, so an unknown key is an error; the
checks across fields (an earlier step, a variant's step, the variables a template reads) are
made by the model that holds both and name the field they are about:

>>> from pydantic import ValidationError
>>> from segflow.yamldoc import path_of
>>> try:
...     PlaybookModel.model_validate({"playbook": "P", "segment": "S", "steps": [
...         {"id": "m", "channel": "webhook", "if": {"no_engagement_since": "later"}}]})
... except ValidationError as exc:
...     [(path_of(e["loc"]), e["msg"]) for e in exc.errors()]
[('steps[0].if.no_engagement_since', "'later' is not an earlier step")]
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Union
from zoneinfo import ZoneInfo

from pydantic import BeforeValidator, Field, field_validator, model_validator

from segflow.durations import parse_duration
from segflow.yamldoc import Strict, fail, fail_all, problem
from services.dispatcher.playbook_model import (
    _HHMM,
    BUILTIN_VARIABLES,
    CHANNELS,
    HOLDOUT,
    TRANSITIONS,
    template_variables,
)


# -- values ---------------------------------------------------------------------------------
def _duration(value: Any) -> int:
    try:
        ms = parse_duration(value)
    except ValueError as exc:
        raise problem(str(exc)) from None
    if ms < 0:
        raise problem("must not be negative")
    return ms


#: A duration as written (``48h``, ``7d``; ``0``: none) in milliseconds.
Duration = Annotated[int, BeforeValidator(_duration)]


def _text(value: Any) -> str | None:
    if isinstance(value, dict | list):
        raise problem(f"expected text (got {type(value).__name__})")
    return None if value is None else str(value)


#: A scalar read as text (``list_id: 42`` is ``"42"``); a mapping or a list is an error.
Text = Annotated[Union[str, None], BeforeValidator(_text)]  # noqa: UP007


def _str_map(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise problem("expected a mapping of names to strings")
    return tuple((str(k), str(v)) for k, v in value.items())


#: ``{name: text}`` as ``((name, text), ...)`` in file order.
StrMap = Annotated[tuple[tuple[str, str], ...], BeforeValidator(_str_map)]


def _required_text(message: str) -> BeforeValidator:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise problem(message)
        return value

    return BeforeValidator(check)


def _step_id(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        raise problem("required: letters, digits, _ . -")
    return value


def _channel(value: Any) -> str:
    if value not in CHANNELS:
        raise problem(f"must be one of {', '.join(CHANNELS)}")
    return str(value)


def _transitions(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or any(t not in TRANSITIONS for t in value):
        raise problem(f"a list of {', '.join(TRANSITIONS)}")
    return tuple(value)


Transitions = Annotated[Union[tuple[str, ...], None], BeforeValidator(_transitions)]  # noqa: UP007


def _integer(message: str) -> BeforeValidator:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise problem(message)
        return value

    return BeforeValidator(check)


def _number(message: str, ok: Any) -> BeforeValidator:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
            raise problem(message)
        return float(value)

    return BeforeValidator(check)


# -- playbooks ------------------------------------------------------------------------------
class StepCondition(Strict):
    shape = "expected a mapping such as {no_engagement_since: step_id}"

    no_engagement_since: Text = None


class StepModel(Strict):
    shape = "a step is a mapping with id and channel"
    required_at_key = True
    required = {"id": "required: letters, digits, _ . -", "channel": "required: a channel"}

    id: Annotated[str, BeforeValidator(_step_id)]
    channel: Annotated[str, BeforeValidator(_channel)]
    after: Duration = 0
    template: Text = None
    subject: Text = None
    body: Text = None
    list_id: Text = None
    properties: StrMap = ()
    variables: StrMap = ()
    if_: Union[StepCondition, None] = Field(None, alias="if")  # noqa: UP007
    task_priority: Annotated[str, BeforeValidator(_text)] = "HIGH"

    @model_validator(mode="after")
    def _channel_needs(self) -> StepModel:
        if self.channel == "crm_list" and not self.list_id:
            raise fail(("list_id",), "required for channel crm_list")
        if self.channel == "crm_property" and not self.properties:
            raise fail(("properties",), "required for channel crm_property")
        if self.channel in ("email", "smtp") and not (self.template or self.subject):
            raise fail(("template",), "an email step needs a template or a subject")
        return self


class VariantStep(Strict):
    """What a variant changes in one step."""

    template: Text = None
    subject: Text = None
    body: Text = None


class VariantModel(Strict):
    shape = "a variant needs a name"
    required = {"name": "a variant needs a name"}
    required_at_key = False

    name: Annotated[str, _required_text("a variant needs a name")]
    weight: Annotated[float, _number("a positive number", lambda w: w > 0)] = 1.0
    steps: Union[dict[str, VariantStep], None] = None  # noqa: UP007

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name == HOLDOUT:
            raise problem(f"{name!r} is reserved or duplicated")
        return name


class ExperimentModel(Strict):
    shape = "expected a mapping with holdout and variants"
    expected = {"variants": "expected a list"}

    holdout: Annotated[float, _number("a fraction in [0, 1)", lambda h: 0 <= h < 1)] = 0.0
    variants: Union[list[VariantModel], None] = None  # noqa: UP007

    @model_validator(mode="after")
    def _names_once(self) -> ExperimentModel:
        seen: set[str] = set()
        for i, v in enumerate(self.variants or []):
            if v.name in seen:
                raise fail(("variants", i, "name"), f"{v.name!r} is reserved or duplicated")
            seen.add(v.name)
        return self


class PlaybookModel(Strict):
    shape = "a document is a mapping with 'playbook:' or 'policy:'"
    required_at_key = True
    required = {
        "playbook": "the playbook's name is required",
        "segment": "the segment this playbook reacts to is required",
        "steps": "at least one step is required",
    }
    expected = {"steps": "at least one step is required"}

    playbook: Annotated[str, _required_text("the playbook's name is required")]
    segment: Annotated[str, _required_text("the segment this playbook reacts to is required")]
    description: Any = None
    version: Annotated[str, BeforeValidator(str)] = "1"
    priority: Annotated[int, _integer("an integer (higher wins)")] = 0
    triggers: Transitions = None
    cancel_on: Transitions = None
    campaign_id: Text = None
    experiment: Union[ExperimentModel, None] = None  # noqa: UP007
    defaults: StrMap = ()
    steps: Annotated[list[StepModel], Field(min_length=1)]

    @model_validator(mode="after")
    def _references(self) -> PlaybookModel:
        """Step ids are unique, a condition names an earlier step, a variant names a step of
        this playbook, and every template's variables always have a value."""
        earlier: list[str] = []
        for i, step in enumerate(self.steps):
            if step.id in earlier:
                raise fail(("steps", i, "id"), f"duplicate step id {step.id!r}", step.id)
            since = step.if_.no_engagement_since if step.if_ is not None else None
            if since is not None and since not in earlier:
                raise fail(
                    ("steps", i, "if", "no_engagement_since"),
                    f"{since!r} is not an earlier step",
                    since,
                )
            earlier.append(step.id)
        variants = (self.experiment.variants or []) if self.experiment is not None else []
        for j, variant in enumerate(variants):
            for sid in variant.steps or {}:
                if sid not in earlier:
                    at = ("experiment", "variants", j, "steps", sid)
                    raise fail(at, "not a step of this playbook", sid)
        errors = self._undefined_variables()
        if errors:
            raise fail_all(errors)
        return self

    def _undefined_variables(self) -> list[tuple[tuple[str | int, ...], str, Any]]:
        """Every template parses and every variable it reads always has a value: a default, a
        built-in (segment, playbook, variant) or, for subject, body and properties, one of the
        step's own ``variables``. Customer attributes and features override defaults when
        present, but a template may not depend on them being there."""
        base = {k for k, _ in self.defaults} | BUILTIN_VARIABLES
        own = {s.id: base | {k for k, _ in s.variables} for s in self.steps}
        fields: list[tuple[tuple[str | int, ...], str, set[str]]] = []
        for i, step in enumerate(self.steps):
            for name, value in (("subject", step.subject), ("body", step.body)):
                if value is not None:
                    fields.append((("steps", i, name), value, own[step.id]))
            fields += [(("steps", i, "properties", k), v, own[step.id]) for k, v in step.properties]
            fields += [(("steps", i, "variables", k), v, base) for k, v in step.variables]
        variants = (self.experiment.variants or []) if self.experiment is not None else []
        for j, variant in enumerate(variants):
            for sid, change in (variant.steps or {}).items():
                for name in ("subject", "body"):
                    value = getattr(change, name)
                    if value is not None:
                        where = ("experiment", "variants", j, "steps", sid, name)
                        fields.append((where, value, own[sid]))
        errors: list[tuple[tuple[str | int, ...], str, Any]] = []
        for at, value, allowed in fields:
            try:
                used = template_variables(value)
            except ValueError as exc:
                errors.append((at, str(exc), value))
                continue
            missing = sorted(used - allowed)
            if missing:
                errors.append(
                    (
                        at,
                        f"{', '.join(missing)} may be undefined: give a value under defaults "
                        f"(known: {', '.join(sorted(allowed))})",
                        value,
                    )
                )
        return errors


# -- the policy -----------------------------------------------------------------------------
class CapModel(Strict):
    shape = "a cap is {max: N, per: 24h}"
    required_at_key = True
    required = {"max": "a positive integer", "per": "required: a duration such as 24h"}

    max: Annotated[int, _integer("a positive integer")]
    per: Duration

    @field_validator("max")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise problem("a positive integer")
        return value


class QuietHours(Strict):
    shape = "expected {start: '21:00', end: '08:00'}"
    required_at_key = True
    required = {"start": "a local time HH:MM", "end": "a local time HH:MM"}

    start: int  # minutes after local midnight
    end: int
    channels: Union[frozenset[str], None] = None  # noqa: UP007

    @field_validator("start", "end", mode="before")
    @classmethod
    def _minutes(cls, value: Any) -> int:
        m = _HHMM.match(str(value))
        if not m:
            raise problem("a local time HH:MM")
        return int(m.group(1)) * 60 + int(m.group(2))

    @field_validator("channels", mode="before")
    @classmethod
    def _channels(cls, value: Any) -> Any:
        if value is not None and (
            not isinstance(value, list) or any(c not in CHANNELS for c in value)
        ):
            raise problem("a list of channels")
        return value


def _by_channel(value: Any) -> Any:
    """A mapping keyed by channel: an unknown channel is an error at its key."""
    if isinstance(value, dict):
        for channel in value:
            if channel not in CHANNELS:
                raise fail((channel,), f"unknown channel (one of {', '.join(CHANNELS)})")
    return value


def _caps(value: Any) -> Any:
    if isinstance(value, dict):
        for channel, rules in _by_channel(value).items():
            if not isinstance(rules, list):
                raise fail((channel,), "a list of {max: N, per: 24h}", rules)
    return {} if value is None else value


class PolicyModel(Strict):
    """Caps and cooldowns per customer and channel, quiet hours, windows."""

    expected = {"engagement_events": "a list of event types"}

    caps: Annotated[dict[str, list[CapModel]], BeforeValidator(_caps)] = {}
    cooldowns: Annotated[
        dict[str, Duration], BeforeValidator(lambda v: {} if v is None else _by_channel(v))
    ] = {}
    quiet_hours: Union[QuietHours, None] = None  # noqa: UP007
    default_timezone: Annotated[str, BeforeValidator(str)] = "UTC"
    attribution_window: Duration = 7 * 86_400_000
    engagement_events: Union[list[str], None] = None  # noqa: UP007
    ledger_retention: Duration = 30 * 86_400_000

    @field_validator("default_timezone")
    @classmethod
    def _zone(cls, tz: str) -> str:
        try:
            ZoneInfo(tz)
        except Exception:
            raise problem(f"unknown time zone {tz!r}") from None
        return tz


class PolicyDocument(Strict):
    """A ``policy:`` document: nothing else beside it."""

    policy: PolicyModel


for _model in (StepModel, PlaybookModel, ExperimentModel, PolicyModel, PolicyDocument):
    _model.model_rebuild()
