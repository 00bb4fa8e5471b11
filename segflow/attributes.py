"""``segflow attributes load FILE.csv|FILE.jsonl``: customer attributes from a CRM export.

Each row becomes an ``identify`` event on ``segflow.events`` whose traits are the row's other
columns (``properties``, with ``segflow_source: crm``), keyed by the identifier column. The
identity service resolves the identifier to the customer (as for any event: a user id it has
seen, an email — hashed there, never stored raw —, an anonymous or device id), and the
attributes service folds the traits into ``segflow.attributes`` (PII traits kept out, see
services/attributes/README.md), which segment rules read as ``attr.<column>``.

The identifier column is ``--id-column`` (default: ``user_id``, else ``email``, else the first
column) and is sent as ``--id-type`` (default: the column's name when it is one of user_id,
email, anonymous_id, device_id; otherwise user_id, so an ``account_id`` column maps to the
user id the product's events carry). Rows without an identifier are reported by line and not
sent. Event time is the load time. Loading the same file again sends the same event ids.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from segflow.errors import SegflowError

ID_TYPES = ("user_id", "email", "anonymous_id", "device_id")


def rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(line, row or None, why) for each record of a CSV (header) or JSON-lines file."""
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield n, None, f"not JSON ({exc.msg})"
                continue
            if not isinstance(row, dict):
                yield n, None, "expected a JSON object per line"
                continue
            yield n, row, ""
        return
    reader = csv.DictReader(io.StringIO(text))
    for n, row in enumerate(reader, 2):
        yield n, {k.strip(): v for k, v in row.items() if k is not None}, ""


def to_events(
    path: Path, text: str, now_ms: int, id_column: str | None = None, id_type: str | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The identify events of a CRM export, and the problems (one line each).

    >>> evs, bad = to_events(Path("crm.csv"), "account_id,product_tier,zip\\nA1,enterprise,94027\\n,pro,1\\n", 5)
    >>> [(e["user_id"], e["properties"]) for e in evs], bad
    ([('A1', {'product_tier': 'enterprise', 'zip': '94027', 'segflow_source': 'crm'})], ['line 3: no account_id'])
    """  # noqa: E501
    events: list[dict[str, Any]] = []
    problems: list[str] = []
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    for n, row, why in rows(path, text):
        if row is None:
            problems.append(f"line {n}: {why}")
            continue
        col = (
            id_column
            or next((c for c in ("user_id", "email") if c in row), None)
            or next(iter(row), "")
        )
        kind = id_type or (col if col in ID_TYPES else "user_id")
        if kind not in ID_TYPES:
            raise SegflowError(f"--id-type: expected one of {', '.join(ID_TYPES)}, got {kind!r}")
        ident = row.get(col)
        if ident is None or not str(ident).strip():
            problems.append(f"line {n}: no {col}")
            continue
        props = {
            str(k): str(v)
            for k, v in row.items()
            if k != col and v is not None and str(v).strip() != ""
        }
        props["segflow_source"] = "crm"
        event: dict[str, Any] = {
            "event_id": f"crm-{digest}-{n}",
            "event_type": "identify",
            "occurred_at": now_ms,
            "user_id": None,
            "anonymous_id": None,
            "device_id": None,
            "email": None,
            "properties": props,
        }
        event[kind] = str(ident).strip()
        events.append(event)
    return events, problems


def cmd_attributes(args: argparse.Namespace) -> int:
    from segflow.produce import produce_file
    from segflow.runtime.local import settings_for

    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise SegflowError(f"cannot read {path}: {exc.strerror or exc}") from exc
    events, problems = to_events(path, text, int(time.time() * 1000), args.id_column, args.id_type)
    for p in problems:
        print(p, file=sys.stderr)
    lines = io.StringIO("".join(json.dumps(e) + "\n" for e in events))
    status = produce_file(settings_for(getattr(args, "port", 9092)), lines)
    return 1 if problems else status


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "attributes", help="load customer attributes from a CRM export (CSV or JSON lines)"
    )
    p.add_argument("action", choices=["load"])
    p.add_argument("file", help="CSV with a header, or JSON lines (.jsonl)")
    p.add_argument("--id-column", help="the identifier column (default: user_id, else email)")
    p.add_argument("--id-type", choices=ID_TYPES, help="what the identifier is (default: by name)")
    p.set_defaults(func=cmd_attributes)
