"""``segflow replay``: recorded history through new segment or playbook versions (what-if).

    segflow replay --segments NEW.yaml                   # from the broker's recorded topics
    segflow replay --playbooks my-atrisk.yaml --json
    segflow replay --from history.jsonl --segments NEW.yaml
    segflow replay --save history.jsonl --segments NEW.yaml   # keep the history for later

The current versions are what the services run: ``SEGFLOW_SEGMENTER_DEFINITIONS`` (or the
default segments) and ``SEGFLOW_DISPATCHER_PLAYBOOKS`` (or the default playbooks), unless
``--current-segments`` / ``--current-playbooks`` say otherwise. ``--playbooks`` with files
replaces the playbooks of the same name (and the policy, if a file has one) and adds the
others; with a folder it replaces the whole set. Nothing is sent: no API client is built.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from segflow.errors import ConfigError
from segflow.replay import core
from segflow.replay.source import read_jsonl, read_topics, write_jsonl
from segflow.runtime.topics import TOPICS
from services.dispatcher.playbook_settings import PlaybookSettings
from services.dispatcher.playbooks import Book, PlaybookError, load_book
from services.dispatcher.playbooks import parse_documents as parse_playbooks
from services.segmenter.dsl import DefinitionError, Definitions, parse
from services.segmenter.settings import SegmenterConfig

#: The variables behind the current versions, read through the services' own (pure) settings
#: modules: no dispatcher I/O module (httpx, adapters) is imported by a replay.
SEGMENTS_ENV = "SEGFLOW_SEGMENTER_DEFINITIONS"
PLAYBOOKS_ENV = "SEGFLOW_DISPATCHER_PLAYBOOKS"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "replay",
        help="replay recorded history through new segment or playbook versions (what-if); "
        "sends nothing",
        description=(__doc__ or "").replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--segments",
        type=Path,
        metavar="NEW.yaml",
        help="new segment definitions to compare with the current ones",
    )
    p.add_argument(
        "--playbooks",
        metavar="PATH[,PATH]",
        help="new playbook files (replace same-named playbooks) or a folder (replaces them all)",
    )
    p.add_argument(
        "--current-segments",
        type=Path,
        metavar="FILE",
        help=f"the current definitions (default: ${SEGMENTS_ENV} or the defaults)",
    )
    p.add_argument(
        "--current-playbooks",
        metavar="PATH[,PATH]",
        help=f"the current playbooks (default: ${PLAYBOOKS_ENV} or the defaults)",
    )
    p.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="FILE.jsonl",
        help="read history from a JSON-lines file instead of the broker",
    )
    p.add_argument(
        "--prefix",
        help="topic prefix on the broker (default: SEGFLOW_TOPIC_PREFIX "
        "or 'segflow.'; a demo's is printed when it starts)",
    )
    p.add_argument(
        "--no-events",
        action="store_true",
        help="leave out identified events (outcomes, unsubscribes, engagement)",
    )
    p.add_argument(
        "--save",
        type=Path,
        metavar="FILE.jsonl",
        help="also write the history read to a JSON-lines file (for --from)",
    )
    p.add_argument(
        "--threshold-refresh",
        type=float,
        default=None,
        metavar="HOURS",
        help="the pNN tables' grid, in HOURS of each partition's event time (default: the "
        "segmenter's SEGFLOW_SEGMENTER_PERCENTILE_REFRESH, 1 h)",
    )
    p.add_argument(
        "--show",
        type=int,
        default=10,
        metavar="N",
        help="customers listed per difference (default 10; --json lists them all)",
    )
    p.add_argument("--json", action="store_true", help="print the difference as JSON")
    p.set_defaults(func=cmd_replay)
    return p


def cmd_replay(args: argparse.Namespace) -> int:
    if args.segments is None and args.playbooks is None:
        print(
            "segflow replay: give --segments NEW.yaml and/or --playbooks NEW.yaml", file=sys.stderr
        )
        return 2
    try:
        old_defs = _definitions(
            args.current_segments or _service_setting(SegmenterConfig).definitions
        )
        new_defs = _definitions(args.segments) if args.segments is not None else old_defs
        old_book = _book(args.current_playbooks or _service_setting(PlaybookSettings).playbooks)
        new_book = _new_book(old_book, args.playbooks) if args.playbooks else old_book
    except _Invalid as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return 1
    for problem in core.unknown_segments(new_book, new_defs):
        print(
            f"warning: playbook {problem} is not a defined segment: it never starts",
            file=sys.stderr,
        )
    items = _history(args)
    if args.save is not None:
        with args.save.open("w", encoding="utf-8") as out:
            n = write_jsonl(core.ordered(items), out)
        print(f"history: {n:,} records written to {args.save}", file=sys.stderr)
    hours = args.threshold_refresh
    if hours is None:
        try:
            hours = _service_setting(SegmenterConfig).percentile_refresh / 3600
        except _Invalid as exc:
            for line in exc.lines:
                print(line, file=sys.stderr)
            return 1
    refresh = int(hours * core.HOUR)
    history = core.ordered(items)
    parts = TOPICS.scores.partitions  # one percentile table per scores partition, as live
    old = core.replay(history, old_defs, old_book, refresh, partitions=parts)
    same_defs = new_defs is old_defs
    new = core.replay(
        history,
        new_defs,
        new_book,
        refresh,
        segmenter=old.segmenter if same_defs else None,
        partitions=parts,
    )
    diff = core.compare(old, new, show=None if args.json else args.show)
    if args.json:
        print(json.dumps(diff, indent=2, sort_keys=False))
    else:
        print(render(diff))
    return 0


S = TypeVar("S", SegmenterConfig, PlaybookSettings)


class _Invalid(Exception):
    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


def _service_setting(cls: type[S]) -> S:
    """The service's settings from the environment, as the service itself reads them; an
    invalid variable → which one and why."""
    try:
        return cls()
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        raise _Invalid(
            [
                f"{prefix}{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
                for e in exc.errors()
            ]
            + ["invalid settings; nothing replayed"]
        ) from None


def _definitions(path: Path) -> Definitions:
    """Parse a definitions file; invalid → every problem with line and field (as
    ``segflow segments check`` prints them)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise _Invalid([f"{path}: {exc.strerror or exc}"]) from None
    try:
        return parse(text)
    except DefinitionError as exc:
        raise _Invalid(
            [f"{path}:{p.line}: {p.field}: {p.message}" for p in exc.problems]
            + [f"{path}: {len(exc.problems)} error(s); nothing replayed"]
        ) from None


def _paths(spec: str) -> list[Path]:
    paths = [Path(p) for p in spec.split(",") if p]
    for p in paths:
        if not p.exists():
            raise _Invalid([f"{p}: no such file or folder"])
    return paths


def _book(spec: str) -> Book:
    try:
        return load_book(_paths(spec))
    except PlaybookError as exc:
        raise _Invalid([str(exc), "invalid playbooks; nothing replayed"]) from None


def _new_book(current: Book, spec: str) -> Book:
    paths = _paths(spec)
    if any(p.is_dir() for p in paths):
        return _book(spec)
    extra = _book(spec)
    try:
        has_policy = any(parse_playbooks(p.read_text(), str(p))[1] is not None for p in paths)
    except PlaybookError as exc:  # pragma: no cover - load_book above parsed them already
        raise _Invalid([str(exc)]) from None
    return core.overlay(current, extra, has_policy)


def _history(args: argparse.Namespace) -> list[core.Item]:
    kinds = [core.SCORE, core.MERGE] + ([] if args.no_events else [core.EVENT])
    if args.source is not None:
        items = read_jsonl(args.source)
        return [i for i in items if i.kind in kinds]
    from segflow.runtime.local import settings_for

    settings = settings_for(args.port)
    if args.prefix:
        settings = settings.model_copy(update={"topic_prefix": args.prefix})
    try:
        return read_topics(settings, kinds)
    except ConfigError:
        raise
    except Exception as exc:  # the broker is down or unreachable
        raise ConfigError(f"reading history from {settings.bootstrap_servers}: {exc}") from None


# -- the report -------------------------------------------------------------------------------
def render(diff: dict[str, Any]) -> str:
    """The difference as text (the ``--json`` output is the same data)."""
    h = diff["history"]
    d, pb = diff["definitions"], diff["playbooks"]
    lines = [
        f"replayed {h['scores']:,} scores, {h['merges']:,} merges, {h['events']:,} events "
        f"(nothing sent)",
        (
            f"segments: {d['old']} -> {d['new']}" + _changed(d)
            if d["old"] != d["new"]
            else f"segments: unchanged ({d['old']})"
        ),
        "playbooks:"
        + (_changed(pb) or " unchanged")
        + ("; contact policy changed" if pb["policy_changed"] else ""),
    ]
    t = diff["totals"]
    lines.append(f"segment changes {_num(t['segment_changes'])}; actions sent {_num(t['sent'])}")
    if diff["identical"]:
        lines.append("no difference: every segment and every action stays the same")
        return "\n".join(lines)
    if diff["segments"]:
        lines.append("")
        lines.append(f"{'segment':28} {'entries':>16} {'exits':>16} {'final size':>16}")
        for name, row in diff["segments"].items():
            lines.append(
                f"{name[:28]:28} {_num(row['entries']):>16} {_num(row['exits']):>16} "
                f"{_num(row['final_size']):>16}"
            )
            shift = row["first_entry"]
            if shift["earlier"] or shift["later"]:
                lines.append(
                    f"    first entry: {shift['earlier']:,} customers earlier, "
                    f"{shift['later']:,} later (median {shift['median_shift_hours']:+g} h)"
                )
            for key, label in (
                ("would_enter", "would enter"),
                ("would_not_enter", "would no longer enter"),
                ("members_gained", "members at the end, gained"),
                ("members_lost", "members at the end, lost"),
                ("entered_more_often", "entered more often"),
                ("entered_less_often", "entered less often"),
            ):
                if row[key]:
                    lines.append(f"    {label}: {_ids(row, key)}")
    if diff["actions"]:
        lines.append("")
        lines.append(f"{'playbook':28} {'channel':20} {'outcome':26} {'old → new':>16}")
        for a in diff["actions"]:
            lines.append(
                f"{a['playbook'][:28]:28} {a['channel']:20} {a['outcome'][:26]:26} {_num(a):>16}"
            )
    for name, row in diff["contacts"].items():
        lines.append(f"{name}: customers contacted {_num(row['customers'])}")
        for key, label in (
            ("newly_contacted", "newly contacted"),
            ("no_longer_contacted", "no longer contacted"),
        ):
            if row[key]:
                lines.append(f"    {label}: {_ids(row, key)}")
    return "\n".join(lines)


def _changed(d: dict[str, Any]) -> str:
    parts = [f"{k} {', '.join(d[k])}" for k in ("added", "removed", "changed") if d[k]]
    return (" (" + "; ".join(parts) + ")") if parts else ""


def _num(p: dict[str, int]) -> str:
    return f"{p['old']:,} → {p['new']:,} ({p['delta']:+,})"


def _ids(row: dict[str, Any], key: str) -> str:
    shown = row[key]
    total = row.get(f"{key}_count", len(shown))
    more = f" … and {total - len(shown):,} more" if total > len(shown) else ""
    return ", ".join(shown) + more
