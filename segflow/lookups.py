"""``segflow lookups load NAME FILE.csv``: an enrichment lookup table (e.g. zip -> income tier).

A table is one record on the compacted ``segflow.lookups`` topic, keyed by its name: loading
a file replaces the whole table (an entry missing from the new file is removed) and gets the
next version number. Every segmenter instance follows the topic and, within its tick (0.5 s),
re-evaluates the customers whose looked-up value changed; rules read a table as
``lookup.<name>(attr.<attribute>)``. ``segflow lookups remove NAME`` deletes a table
(tombstone), ``segflow lookups show [NAME]`` prints what is loaded.

The CSV has a header; the key is the first column (or ``--key``), the value the second (or
``--value``). Keys and values are trimmed; empty keys, and a key given twice with different
values, are errors that name the line. A table is one Kafka record: it must stay under the
broker's ``message.max.bytes`` (1 MB by default, ~40,000 zip codes), which ``load`` checks.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import re
import sys
import time
from pathlib import Path
from typing import Any

from segflow.errors import SegflowError

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: The example table the demo loads: the five high-income zips the scorer had hard-coded.
DEFAULT_ZIP_INCOME = (
    Path(__file__).resolve().parents[1] / "services" / "segmenter" / "lookups" / "zip_income.csv"
)
#: Under the broker's default message.max.bytes (1,048,588) with room for the envelope.
MAX_RECORD_BYTES = 1_000_000


class LookupError_(SegflowError):  # noqa: N801 (LookupError is a builtin)
    """A lookup file or name that cannot be loaded; the message says what was expected."""


def read_csv(
    text: str, key: str | None = None, value: str | None = None
) -> tuple[str, str, dict[str, str]]:
    """``(key column, value column, entries)`` of a CSV with a header.

    >>> read_csv("zip,tier\\n94027, high\\n10001,mid\\n")
    ('zip', 'tier', {'94027': 'high', '10001': 'mid'})
    >>> read_csv("zip,tier\\n94027,high\\n94027,low\\n")
    Traceback (most recent call last):
    ...
    segflow.lookups.LookupError_: line 3: key '94027' given twice ('high', then 'low')
    """
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if not header or len(header) < 2:
        raise LookupError_("expected a CSV header with at least two columns (key,value)")
    header = [h.strip() for h in header]
    k = key or header[0]
    v = value or header[1]
    for col in (k, v):
        if col not in header:
            raise LookupError_(f"no column {col!r} in the header (columns: {', '.join(header)})")
    ki, vi = header.index(k), header.index(v)
    entries: dict[str, str] = {}
    for n, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= max(ki, vi):
            raise LookupError_(f"line {n}: expected {len(header)} columns, got {len(row)}")
        kk, vv = row[ki].strip(), row[vi].strip()
        if not kk:
            raise LookupError_(f"line {n}: empty key in column {k!r}")
        if kk in entries and entries[kk] != vv:
            raise LookupError_(f"line {n}: key {kk!r} given twice ({entries[kk]!r}, then {vv!r})")
        entries[kk] = vv
    return k, v, entries


def digest(entries: dict[str, str]) -> str:
    """sha256 of the sorted ``key=value`` lines, 16 hex digits (the same table, the same digest)."""
    body = "\n".join(f"{k}={v}" for k, v in sorted(entries.items()))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def table_record(
    name: str,
    entries: dict[str, str],
    version: int,
    now_ms: int,
    source: str | None = None,
    key_column: str = "key",
    value_column: str = "value",
) -> dict[str, Any]:
    """The LookupTable record."""
    if not NAME.match(name):
        raise LookupError_(
            f"table name {name!r}: expected letters, digits and _ (as in lookup.<name>(attr.x))"
        )
    return {
        "name": name,
        "version": version,
        "digest": digest(entries),
        "loaded_at": now_ms,
        "source": source,
        "key_column": key_column,
        "value_column": value_column,
        "entries": entries,
    }


def current(settings: Any) -> dict[str, dict[str, Any]]:
    """The tables on the topic now (name -> record)."""
    from segflow.runtime.kafka import ensure_topics
    from segflow.runtime.tables import GlobalTable
    from segflow.runtime.topics import TOPICS

    ensure_topics(settings, topics=[TOPICS.lookups])
    reader = GlobalTable(settings, TOPICS.lookups)
    try:
        reader.catch_up()
        return dict(reader.table)
    finally:
        reader.close()


def _write(settings: Any, name: str, record: dict[str, Any] | None) -> None:
    from segflow.runtime.kafka import make_producer
    from segflow.runtime.serde import Serde, encode_key
    from segflow.runtime.topics import TOPICS

    topic = TOPICS.lookups
    value = Serde.from_settings(settings).encode(topic, record) if record is not None else None
    if value is not None and len(value) > MAX_RECORD_BYTES:
        raise LookupError_(
            f"table {name!r} is {len(value):,} bytes encoded; expected at most "
            f"{MAX_RECORD_BYTES:,} (one Kafka record; split it or raise message.max.bytes)"
        )
    errors: list[str] = []
    producer = make_producer(settings)
    try:
        producer.produce(
            topic.name(settings),
            value,
            encode_key(topic, name),
            on_delivery=lambda err, _m: errors.append(str(err)) if err is not None else None,
        )
        left = producer.flush(30)
    finally:
        producer.close()
    if left or errors:
        raise LookupError_(f"the broker did not acknowledge table {name!r}: {errors or 'timeout'}")


def load(
    settings: Any,
    name: str,
    path: Path,
    key: str | None = None,
    value: str | None = None,
    now_ms: int | None = None,
) -> dict[str, Any]:
    """Load ``path`` as table ``name`` (the next version); returns the record written."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise LookupError_(f"cannot read {path}: {exc.strerror or exc}") from exc
    k, v, entries = read_csv(text, key, value)
    previous = current(settings).get(name)
    version = int(previous["version"]) + 1 if previous else 1
    record = table_record(
        name, entries, version, now_ms or int(time.time() * 1000), path.name, k, v
    )
    _write(settings, name, record)
    return record


def remove(settings: Any, name: str) -> bool:
    """Delete table ``name`` (a tombstone); False when there was none."""
    if name not in current(settings):
        return False
    _write(settings, name, None)
    return True


def _settings(args: argparse.Namespace) -> Any:
    from segflow.runtime.local import settings_for

    return settings_for(getattr(args, "port", 9092))


def cmd_lookups(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.action == "load":
        if not args.file:
            print("segflow lookups load: expected NAME FILE.csv", file=sys.stderr)
            return 2
        rec = load(settings, args.name, Path(args.file), args.key, args.value)
        print(
            f"table {rec['name']} version {rec['version']}: {len(rec['entries'])} entries "
            f"({rec['key_column']} -> {rec['value_column']}), digest {rec['digest']}"
        )
        return 0
    if args.action == "remove":
        if remove(settings, args.name):
            print(f"table {args.name} removed")
            return 0
        print(f"no table {args.name!r}", file=sys.stderr)
        return 1
    tables = current(settings)
    for name, rec in sorted(tables.items()):
        if args.name and name != args.name:
            continue
        print(
            f"{name}: version {rec['version']}, {len(rec['entries'])} entries "
            f"({rec['key_column']} -> {rec['value_column']}), from {rec.get('source')}, "
            f"digest {rec['digest']}"
        )
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "lookups", help="load, show or remove enrichment lookup tables (e.g. zip -> income tier)"
    )
    p.add_argument("action", choices=["load", "show", "remove"])
    p.add_argument("name", nargs="?", default="", help="table name, as in lookup.NAME(attr.x)")
    p.add_argument("file", nargs="?", help="CSV with a header (load)")
    p.add_argument("--key", help="key column (default: the first)")
    p.add_argument("--value", help="value column (default: the second)")
    p.set_defaults(func=cmd_lookups)
