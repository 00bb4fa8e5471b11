"""``segflow segments check FILE`` and ``segflow explain CUSTOMER``.

Wire into the main CLI with ``add_parser(subparsers)`` (both commands), or
``add_segments_parser`` / ``add_explain_parser`` one at a time; handlers are set as ``func``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from services.segmenter.dsl import DefinitionError, parse


def add_parser(subparsers: Any) -> None:
    """Add ``segments`` and ``explain`` to a CLI's subparsers."""
    add_segments_parser(subparsers)
    add_explain_parser(subparsers)


def add_segments_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "segments", help="work with segment definition files"
    )
    sub = p.add_subparsers(dest="segments_command", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="validate a definitions file; errors with line and field")
    check.add_argument("file", help="a segment definitions YAML file")
    check.set_defaults(func=cmd_check)
    return p


def add_explain_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "explain", help="show a customer's segments and, per condition, why"
    )
    p.add_argument("customer", help="customer_id")
    p.add_argument(
        "--url",
        help="ask a running segmenter's HTTP API (under `segflow up`: http://127.0.0.1:9412)"
        " instead of reading its changelog",
    )
    p.add_argument(
        "--definitions",
        type=Path,
        default=None,
        help="definitions file (default: SEGFLOW_SEGMENTER_DEFINITIONS or the default segments)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_explain)
    return p


def cmd_check(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        text = path.read_text()
    except OSError as exc:
        print(f"{path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        defs = parse(text)
    except DefinitionError as exc:
        for problem in exc.problems:
            print(f"{path}:{problem.line}: {problem.field}: {problem.message}")
        print(f"{path}: {len(exc.problems)} error(s)", file=sys.stderr)
        return 1
    print(
        f"{path}: OK, version {defs.version}, {len(defs.segments)} segments: "
        + ", ".join(s.name for s in defs.segments)
    )
    return 0


class ExplainError(Exception):
    """The state to explain from cannot be read (printed, exit status 2)."""


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        found = _from_http(args.url, args.customer) if args.url else _from_changelog(args)
    except ExplainError as exc:
        print(f"segflow explain: {exc}", file=sys.stderr)
        return 2
    if found is None:
        print(f"no segmenter state for customer {args.customer!r}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(found, indent=2, default=str))
        return 0
    print(render(found))
    return 0


def render(found: dict[str, Any]) -> str:
    """Human-readable explanation of a customer's memberships."""
    lines = [
        f"customer {found['customer_id']} (definitions {found['definition_version']}, "
        f"features as of {found['as_of']})",
        f"primary segment: {found['primary_segment'] or '-'}",
    ]
    for seg in sorted(found["segments"], key=lambda s: (not s["member"], s["segment"])):
        mark = "*" if seg["primary"] else ("+" if seg["member"] else " ")
        state = f"member since {seg['entered_at']}" if seg["member"] else "not a member"
        lines.append(f"{mark} {seg['segment']}: {state} ({seg['rule']} rule)")
        for c in seg["conditions"]:
            observed = c["observed"] if c["observed"] is not None else c.get("observed_text")
            threshold = c["threshold"] if c["threshold"] is not None else c.get("threshold_text")
            margin = "" if c["margin"] is None else f", margin {c['margin']:+g}"
            verdict = "pass" if c["passed"] else "fail"
            lines.append(
                f"    [{verdict}] {c['feature']} {c['operator']} {threshold} "
                f"(observed {observed}{margin})  at {c['path']}"
            )
    return "\n".join(lines)


def _from_http(url: str, customer: str) -> dict[str, Any] | None:
    from urllib.error import HTTPError, URLError
    from urllib.parse import quote
    from urllib.request import urlopen

    try:
        with urlopen(f"{url.rstrip('/')}/customers/{quote(customer, safe='')}", timeout=10) as r:
            result: dict[str, Any] = json.loads(r.read())
            return result
    except HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    except URLError as exc:  # nothing listening, unknown host
        raise ExplainError(
            f"cannot reach a segmenter at {url}: {exc.reason} (under `segflow up` its HTTP API"
            " is http://127.0.0.1:9412)"
        ) from exc


def _from_changelog(args: argparse.Namespace) -> dict[str, Any] | None:
    """Restore the segmenter's changelog (read only: no topic is created) and explain."""
    from confluent_kafka import KafkaException

    from segflow.runtime.kafka import make_admin
    from segflow.runtime.settings import Settings
    from services.segmenter.app import STATE_TOPIC, Segmenter, SegmenterConfig

    if os.environ.get("SEGFLOW_BOOTSTRAP_SERVERS") or os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        settings = Settings()
    else:
        settings = Settings(bootstrap_servers=f"127.0.0.1:{getattr(args, 'port', 9092)}")
    topic = STATE_TOPIC.name(settings)
    try:
        with make_admin(settings) as admin:
            existing = admin.list_topics(timeout=10).topics
    except KafkaException as exc:
        raise ExplainError(f"cannot reach Kafka at {settings.bootstrap_servers}: {exc}") from exc
    if topic not in existing:
        others = sorted(
            name[: -len(STATE_TOPIC.suffix)]
            for name in existing
            if name.endswith(STATE_TOPIC.suffix)
        )
        found = f"; segmenter state exists under: {', '.join(others[-5:])}" if others else ""
        raise ExplainError(
            f"no segmenter state under prefix {settings.topic_prefix!r} (no topic {topic}):"
            f" is SEGFLOW_TOPIC_PREFIX right? (the demo uses demo-<time>.){found}"
        )
    config = SegmenterConfig()
    if args.definitions is not None:
        config = SegmenterConfig(definitions=args.definitions)
    segmenter = Segmenter(settings, config)
    segmenter.restore(create=False)
    segmenter.follow_lookups = True  # lookup conditions explained with the loaded tables
    segmenter._follow_lookups()
    if segmenter._lookup_reader is not None:
        segmenter._lookup_reader.close()
    return segmenter.explain(args.customer)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m services.segmenter.cli segments check FILE``)."""
    parser = argparse.ArgumentParser(prog="segflow")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
