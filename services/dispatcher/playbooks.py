"""Playbooks and the dispatch policy, from YAML, validated with file, line and field.

A playbook maps a segment's transitions to a sequence of steps::

    playbook: AtRisk-60d
    segment: AtRisk-60d
    priority: 100
    campaign_id: atrisk-60d
    experiment: {holdout: 0.1, variants: [{name: A}, {name: B, steps: {email: {subject: Hi}}}]}
    steps:
      - {id: email, channel: email, after: 0h, template: t-1, subject: "We miss you"}
      - {id: task, channel: crm_task, after: 48h, if: {no_engagement_since: email}}

A file may also hold a ``policy:`` document (caps, cooldowns, quiet hours); see
:class:`Policy`. Every error names the file, the line and the field:

>>> parse_documents("playbook: X\\nsegment: S\\nsteps: []\\n", "x.yaml")
Traceback (most recent call last):
...
services.dispatcher.playbooks.PlaybookError: x.yaml:3: steps: at least one step is required
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from segflow import yamldoc
from segflow.durations import parse_duration
from segflow.errors import ConfigError
from services.dispatcher.playbook_model import (
    _HHMM,
    BUILTIN_VARIABLES,
    CHANNELS,
    CUSTOMER_FACING,
    EMAIL_CHANNELS,
    HOLDOUT,
    SYNC_CHANNELS,
    TRANSITIONS,
    Book,
    Cap,
    Experiment,
    Playbook,
    Policy,
    RenderError,
    Step,
    Variant,
    render,
    template_variables,
)

__all__ = [
    "BUILTIN_VARIABLES",
    "Book",
    "CHANNELS",
    "CUSTOMER_FACING",
    "Cap",
    "DEFAULT_DIR",
    "EMAIL_CHANNELS",
    "Experiment",
    "HOLDOUT",
    "Playbook",
    "PlaybookError",
    "Policy",
    "RenderError",
    "SYNC_CHANNELS",
    "Step",
    "TRANSITIONS",
    "Variant",
    "load_book",
    "parse_documents",
    "render",
    "template_variables",
]


class PlaybookError(ConfigError):
    """A playbook or policy file is invalid; the message is ``file:line: field: problem``."""


# -- parsing with line numbers ---------------------------------------------------------------
class _Doc:
    """A document of a playbook file (:mod:`segflow.yamldoc`): plain data, the line of every
    path, and errors that name both."""

    def __init__(self, document: yamldoc.Document, source: str) -> None:
        self.source = source
        self.document = document
        self.data = document.data
        if document.duplicates:  # YAML keeps the last silently; a second value is a mistake
            d = document.duplicates[0]
            raise PlaybookError(
                f"{source}:{d.line}: {d.path}: duplicate key (first on line {d.first_line})"
            )

    def error(self, path: str, message: str) -> PlaybookError:
        return PlaybookError(f"{self.source}:{self.document.line(path)}: {path}: {message}")


_STEP_KEYS = {
    "id",
    "channel",
    "after",
    "template",
    "subject",
    "body",
    "list_id",
    "properties",
    "variables",
    "if",
    "task_priority",
}
_PLAYBOOK_KEYS = {
    "playbook",
    "segment",
    "description",
    "version",
    "priority",
    "triggers",
    "cancel_on",
    "campaign_id",
    "experiment",
    "defaults",
    "steps",
}
_POLICY_KEYS = {
    "caps",
    "cooldowns",
    "quiet_hours",
    "default_timezone",
    "attribution_window",
    "engagement_events",
    "ledger_retention",
}


def _str_map(doc: _Doc, value: Any, path: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise doc.error(path, "expected a mapping of names to strings")
    return tuple((str(k), str(v)) for k, v in value.items())


def _duration(doc: _Doc, value: Any, path: str) -> int:
    try:
        ms = parse_duration(value)
    except ValueError as exc:
        raise doc.error(path, str(exc)) from None
    if ms < 0:
        raise doc.error(path, "must not be negative")
    return ms


def _unknown(doc: _Doc, data: dict[str, Any], allowed: set[str], path: str) -> None:
    for key in data:
        if key not in allowed:
            sub = f"{path}.{key}" if path else key
            raise doc.error(sub, f"unknown field (expected one of {', '.join(sorted(allowed))})")


def _parse_step(doc: _Doc, raw: Any, path: str, earlier: list[str]) -> Step:
    if not isinstance(raw, dict):
        raise doc.error(path, "a step is a mapping with id and channel")
    _unknown(doc, raw, _STEP_KEYS, path)
    sid = raw.get("id")
    if not isinstance(sid, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", sid):
        raise doc.error(f"{path}.id", "required: letters, digits, _ . -")
    if sid in earlier:
        raise doc.error(f"{path}.id", f"duplicate step id {sid!r}")
    channel = raw.get("channel")
    if channel not in CHANNELS:
        raise doc.error(f"{path}.channel", f"must be one of {', '.join(CHANNELS)}")
    cond = raw.get("if") or {}
    if not isinstance(cond, dict):
        raise doc.error(f"{path}.if", "expected a mapping such as {no_engagement_since: step_id}")
    _unknown(doc, cond, {"no_engagement_since"}, f"{path}.if")
    since = cond.get("no_engagement_since")
    if since is not None and since not in earlier:
        raise doc.error(f"{path}.if.no_engagement_since", f"{since!r} is not an earlier step")
    if channel == "crm_list" and not raw.get("list_id"):
        raise doc.error(f"{path}.list_id", "required for channel crm_list")
    if channel == "crm_property" and not raw.get("properties"):
        raise doc.error(f"{path}.properties", "required for channel crm_property")
    if channel in ("email", "smtp") and not (raw.get("template") or raw.get("subject")):
        raise doc.error(f"{path}.template", "an email step needs a template or a subject")
    return Step(
        id=sid,
        channel=channel,
        after_ms=_duration(doc, raw.get("after", 0), f"{path}.after"),
        template=None if raw.get("template") is None else str(raw["template"]),
        subject=None if raw.get("subject") is None else str(raw["subject"]),
        body=None if raw.get("body") is None else str(raw["body"]),
        list_id=None if raw.get("list_id") is None else str(raw["list_id"]),
        properties=_str_map(doc, raw.get("properties"), f"{path}.properties"),
        variables=_str_map(doc, raw.get("variables"), f"{path}.variables"),
        no_engagement_since=since,
        task_priority=str(raw.get("task_priority", "HIGH")),
    )


def _parse_experiment(doc: _Doc, raw: Any, steps: tuple[Step, ...]) -> Experiment:
    if raw is None:
        return Experiment()
    if not isinstance(raw, dict):
        raise doc.error("experiment", "expected a mapping with holdout and variants")
    _unknown(doc, raw, {"holdout", "variants"}, "experiment")
    holdout = raw.get("holdout", 0.0)
    if isinstance(holdout, bool) or not isinstance(holdout, int | float) or not 0 <= holdout < 1:
        raise doc.error("experiment.holdout", "a fraction in [0, 1)")
    variants_raw = raw.get("variants") or [{"name": "control"}]
    if not isinstance(variants_raw, list):
        raise doc.error("experiment.variants", "expected a list")
    variants: list[Variant] = []
    step_ids = {s.id for s in steps}
    for i, v in enumerate(variants_raw):
        path = f"experiment.variants[{i}]"
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            raise doc.error(path, "a variant needs a name")
        _unknown(doc, v, {"name", "weight", "steps"}, path)
        if v["name"] == HOLDOUT or any(v["name"] == o.name for o in variants):
            raise doc.error(f"{path}.name", f"{v['name']!r} is reserved or duplicated")
        weight = v.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
            raise doc.error(f"{path}.weight", "a positive number")
        overrides = []
        for sid, fields in (v.get("steps") or {}).items():
            if sid not in step_ids:
                raise doc.error(f"{path}.steps.{sid}", "not a step of this playbook")
            if not isinstance(fields, dict):
                raise doc.error(f"{path}.steps.{sid}", "expected a mapping")
            _unknown(doc, fields, {"template", "subject", "body"}, f"{path}.steps.{sid}")
            overrides.append((sid, tuple((str(k), str(x)) for k, x in fields.items())))
        variants.append(Variant(v["name"], float(weight), tuple(overrides)))
    return Experiment(float(holdout), tuple(variants))


def _transitions(doc: _Doc, raw: Any, path: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if raw is None:
        return default
    if not isinstance(raw, list) or any(t not in TRANSITIONS for t in raw):
        raise doc.error(path, f"a list of {', '.join(TRANSITIONS)}")
    return tuple(raw)


def _check_templates(
    doc: _Doc, steps: list[Step], experiment: Experiment, defaults: set[str]
) -> None:
    """Every template parses and every variable it reads always has a value: a default, a
    built-in (segment, playbook, variant) or, for subject, body and properties, one of the
    step's own ``variables``. Customer attributes and features override defaults when
    present, but a template may not depend on them being there."""
    base = defaults | BUILTIN_VARIABLES
    by_id = {s.id: (i, s) for i, s in enumerate(steps)}
    fields: list[tuple[str, str, set[str]]] = []
    for i, step in enumerate(steps):
        own = base | {k for k, _ in step.variables}
        for name, value in (("subject", step.subject), ("body", step.body)):
            if value is not None:
                fields.append((f"steps[{i}].{name}", value, own))
        fields += [(f"steps[{i}].properties.{k}", v, own) for k, v in step.properties]
        fields += [(f"steps[{i}].variables.{k}", v, base) for k, v in step.variables]
    for j, variant in enumerate(experiment.variants):
        for sid, overrides in variant.overrides:
            i, step = by_id[sid]
            own = base | {k for k, _ in step.variables}
            for name, value in overrides:
                if name in ("subject", "body"):
                    fields.append((f"experiment.variants[{j}].steps.{sid}.{name}", value, own))
    for path, value, allowed in fields:
        try:
            used = template_variables(value)
        except ValueError as exc:
            raise doc.error(path, str(exc)) from None
        missing = sorted(used - allowed)
        if missing:
            raise doc.error(
                path,
                f"{', '.join(missing)} may be undefined: give a value under defaults (known: "
                f"{', '.join(sorted(allowed))})",
            )


def _parse_playbook(doc: _Doc, raw: dict[str, Any]) -> Playbook:
    _unknown(doc, raw, _PLAYBOOK_KEYS, "")
    name = raw.get("playbook")
    if not isinstance(name, str) or not name:
        raise doc.error("playbook", "the playbook's name is required")
    segment = raw.get("segment")
    if not isinstance(segment, str) or not segment:
        raise doc.error("segment", "the segment this playbook reacts to is required")
    steps_raw = raw.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise doc.error("steps", "at least one step is required")
    steps: list[Step] = []
    for i, s in enumerate(steps_raw):
        steps.append(_parse_step(doc, s, f"steps[{i}]", [x.id for x in steps]))
    priority = raw.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise doc.error("priority", "an integer (higher wins)")
    defaults = _str_map(doc, raw.get("defaults"), "defaults")
    experiment = _parse_experiment(doc, raw.get("experiment"), tuple(steps))
    _check_templates(doc, steps, experiment, {k for k, _ in defaults})
    return Playbook(
        name=name,
        segment=segment,
        steps=tuple(steps),
        version=str(raw.get("version", "1")),
        priority=priority,
        triggers=_transitions(doc, raw.get("triggers"), "triggers", ("entered",)),
        cancel_on=_transitions(doc, raw.get("cancel_on"), "cancel_on", ("exited", "re_engaged")),
        campaign_id=str(raw.get("campaign_id") or name),
        experiment=experiment,
        defaults=defaults,
        source=doc.source,
    )


def _parse_policy(doc: _Doc, raw: Any) -> Policy:
    if not isinstance(raw, dict):
        raise doc.error("policy", "expected a mapping")
    _unknown(doc, raw, _POLICY_KEYS, "policy")
    caps: list[tuple[str, tuple[Cap, ...]]] = []
    for channel, rules in (raw.get("caps") or {}).items():
        path = f"policy.caps.{channel}"
        if channel not in CHANNELS:
            raise doc.error(path, f"unknown channel (one of {', '.join(CHANNELS)})")
        if not isinstance(rules, list):
            raise doc.error(path, "a list of {max: N, per: 24h}")
        out = []
        for i, r in enumerate(rules):
            if not isinstance(r, dict) or not isinstance(r.get("max"), int) or r["max"] < 1:
                raise doc.error(f"{path}[{i}].max", "a positive integer")
            out.append(Cap(r["max"], _duration(doc, r.get("per"), f"{path}[{i}].per")))
        caps.append((channel, tuple(out)))
    cooldowns: list[tuple[str, int]] = []
    for channel, d in (raw.get("cooldowns") or {}).items():
        if channel not in CHANNELS:
            raise doc.error(f"policy.cooldowns.{channel}", "unknown channel")
        cooldowns.append((channel, _duration(doc, d, f"policy.cooldowns.{channel}")))
    quiet_start = quiet_end = None
    quiet_channels = CUSTOMER_FACING
    qh = raw.get("quiet_hours")
    if qh is not None:
        if not isinstance(qh, dict):
            raise doc.error("policy.quiet_hours", "expected {start: '21:00', end: '08:00'}")
        _unknown(doc, qh, {"start", "end", "channels"}, "policy.quiet_hours")
        parsed = []
        for k in ("start", "end"):
            m = _HHMM.match(str(qh.get(k, "")))
            if not m:
                raise doc.error(f"policy.quiet_hours.{k}", "a local time HH:MM")
            parsed.append(int(m.group(1)) * 60 + int(m.group(2)))
        quiet_start, quiet_end = parsed
        chans = qh.get("channels")
        if chans is not None:
            if not isinstance(chans, list) or any(c not in CHANNELS for c in chans):
                raise doc.error("policy.quiet_hours.channels", "a list of channels")
            quiet_channels = frozenset(chans)
    tz = str(raw.get("default_timezone", "UTC"))
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(tz)
    except Exception:
        raise doc.error("policy.default_timezone", f"unknown time zone {tz!r}") from None
    engagement = raw.get("engagement_events")
    if engagement is not None and not isinstance(engagement, list):
        raise doc.error("policy.engagement_events", "a list of event types")
    base = Policy()
    return Policy(
        caps=tuple(caps),
        cooldowns=tuple(cooldowns),
        quiet_start_min=quiet_start,
        quiet_end_min=quiet_end,
        quiet_channels=quiet_channels,
        default_timezone=tz,
        attribution_ms=_duration(
            doc, raw.get("attribution_window", "7d"), "policy.attribution_window"
        ),
        engagement_events=frozenset(engagement) if engagement else base.engagement_events,
        ledger_retention_ms=_duration(
            doc, raw.get("ledger_retention", "30d"), "policy.ledger_retention"
        ),
    )


def parse_documents(text: str, source: str = "<string>") -> tuple[list[Playbook], Policy | None]:
    """Every playbook and the policy (if any) in one YAML text (``---`` separates documents)."""
    playbooks: list[Playbook] = []
    policy: Policy | None = None
    try:
        documents = list(yamldoc.load_all(text))
    except yamldoc.YamlSyntaxError as exc:
        raise PlaybookError(f"{source}:{exc.line}: (syntax): {exc.problem}") from None
    for document in documents:
        if document.data is None:
            continue
        doc = _Doc(document, source)
        if not isinstance(doc.data, dict):
            raise doc.error("", "a document is a mapping with 'playbook:' or 'policy:'")
        if "policy" in doc.data:
            if policy is not None:
                raise doc.error("policy", "only one policy")
            _unknown(doc, doc.data, {"policy"}, "")
            policy = _parse_policy(doc, doc.data["policy"])
        else:
            playbooks.append(_parse_playbook(doc, doc.data))
    return playbooks, policy


def load_book(paths: Iterable[Path]) -> Book:
    """Load every ``*.yaml`` in ``paths`` (files or folders) into one :class:`Book`."""
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(p.glob("*.yaml")) if p.is_dir() else [p])
    playbooks: list[Playbook] = []
    policy: Policy | None = None
    for f in files:
        found, pol = parse_documents(f.read_text(), str(f))
        for pb in found:
            if any(pb.name == o.name for o in playbooks):
                raise PlaybookError(f"{f}:1: playbook: duplicate playbook name {pb.name!r}")
            playbooks.append(pb)
        if pol is not None:
            if policy is not None:
                raise PlaybookError(f"{f}:1: policy: a second policy document")
            policy = pol
    return Book(tuple(playbooks), policy or Policy())


DEFAULT_DIR = Path(__file__).resolve().parent / "playbooks"
