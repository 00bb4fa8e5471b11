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

from collections.abc import Iterable
from pathlib import Path

from pydantic import ValidationError

from segflow import yamldoc
from segflow.durations import parse_duration
from segflow.errors import ConfigError
from services.dispatcher.playbook_model import (
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
from services.dispatcher.playbook_schema import (
    PlaybookModel,
    PolicyDocument,
    PolicyModel,
    VariantModel,
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
    "parse_duration",
    "render",
    "template_variables",
]


class PlaybookError(ConfigError):
    """A playbook or policy file is invalid; the message is ``file:line: field: problem`` of
    the first problem in the file, ``problems`` lists every problem found in its document."""

    def __init__(self, message: str, problems: list[yamldoc.Located] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


def _error(source: str, problems: list[yamldoc.Located]) -> PlaybookError:
    first = problems[0]
    return PlaybookError(
        f"{source}:{first.line}: {first.path or '(document)'}: {first.message}", problems
    )


def _playbook(m: PlaybookModel, source: str) -> Playbook:
    steps = tuple(
        Step(
            id=s.id,
            channel=s.channel,
            after_ms=s.after,
            template=s.template,
            subject=s.subject,
            body=s.body,
            list_id=s.list_id,
            properties=s.properties,
            variables=s.variables,
            no_engagement_since=s.if_.no_engagement_since if s.if_ is not None else None,
            task_priority=s.task_priority,
        )
        for s in m.steps
    )
    experiment = Experiment()
    if m.experiment is not None:
        variants = tuple(
            Variant(
                v.name,
                v.weight,
                tuple(
                    (sid, tuple((k, str(x)) for k, x in change if x is not None))
                    for sid, change in (v.steps or {}).items()
                ),
            )
            for v in m.experiment.variants or [VariantModel(name="control")]
        )
        experiment = Experiment(m.experiment.holdout, variants)
    return Playbook(
        name=m.playbook,
        segment=m.segment,
        steps=steps,
        version=m.version,
        priority=m.priority,
        triggers=m.triggers if m.triggers is not None else ("entered",),
        cancel_on=m.cancel_on if m.cancel_on is not None else ("exited", "re_engaged"),
        campaign_id=m.campaign_id or m.playbook,
        experiment=experiment,
        defaults=m.defaults,
        source=source,
    )


def _policy(m: PolicyModel) -> Policy:
    base = Policy()
    qh = m.quiet_hours
    return Policy(
        caps=tuple(
            (channel, tuple(Cap(c.max, c.per) for c in caps)) for channel, caps in m.caps.items()
        ),
        cooldowns=tuple(m.cooldowns.items()),
        quiet_start_min=qh.start if qh is not None else None,
        quiet_end_min=qh.end if qh is not None else None,
        quiet_channels=(
            qh.channels if qh is not None and qh.channels is not None else CUSTOMER_FACING
        ),
        default_timezone=m.default_timezone,
        attribution_ms=m.attribution_window,
        engagement_events=(
            frozenset(m.engagement_events) if m.engagement_events else base.engagement_events
        ),
        ledger_retention_ms=m.ledger_retention,
    )


def parse_documents(text: str, source: str = "<string>") -> tuple[list[Playbook], Policy | None]:
    """Every playbook and the policy (if any) in one YAML text (``---`` separates documents)."""
    playbooks: list[Playbook] = []
    policy: Policy | None = None
    try:
        documents = list(yamldoc.load_all(text))
    except yamldoc.YamlSyntaxError as exc:
        raise PlaybookError(f"{source}:{exc.line}: (syntax): {exc.problem}") from None
    for doc in documents:
        if doc.duplicates:  # YAML keeps the last silently; a second value is a mistake
            d = doc.duplicates[0]
            raise PlaybookError(
                f"{source}:{d.line}: {d.path}: duplicate key (first on line {d.first_line})",
                [yamldoc.Located(d.line, d.path, f"duplicate key (first on line {d.first_line})")],
            )
        if doc.data is None:
            continue
        is_policy = isinstance(doc.data, dict) and "policy" in doc.data
        if is_policy and policy is not None:
            line = doc.line("policy")
            raise _error(source, [yamldoc.Located(line, "policy", "only one policy")])
        try:
            if is_policy:
                policy = _policy(PolicyDocument.model_validate(doc.data).policy)
            else:
                playbooks.append(_playbook(PlaybookModel.model_validate(doc.data), source))
        except ValidationError as exc:
            raise _error(source, yamldoc.located(exc, doc)) from None
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
