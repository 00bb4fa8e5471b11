"""Checks on the Avro contract in ``schemas/``: parsing, examples, backward compatibility.

Backward compatible means a consumer on the new schema can read data written with the old
one (Avro schema resolution): added fields have defaults, changed types promote.

>>> old = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}]}
>>> new = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "long"},
...        {"name": "b", "type": "string", "default": ""}]}
>>> backward_problems(old, new)
[]
>>> backward_problems(old, {"type": "record", "name": "R",
...                         "fields": [{"name": "b", "type": "string"}]})
['R.b: added without a default']
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from fastavro.schema import load_schema, parse_schema
from fastavro.validation import validate

from segflow.runtime.serde import SCHEMAS_DIR, SchemaStore
from segflow.runtime.topics import TOPICS

PROMOTIONS = {
    "int": {"int", "long", "float", "double"},
    "long": {"long", "float", "double"},
    "float": {"float", "double"},
    "string": {"string", "bytes"},
    "bytes": {"bytes", "string"},
}
PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def _kind(t: Any) -> str:
    if isinstance(t, list):
        return "union"
    if isinstance(t, dict):
        return (
            str(t["type"])
            if t["type"] in ("record", "enum", "array", "map", "fixed")
            else _kind(t["type"])
        )
    return str(t)


def _resolves(writer: Any, reader: Any, path: str, problems: list[str]) -> bool:
    wk, rk = _kind(writer), _kind(reader)
    if wk == "union":
        ok = True
        for branch in writer:
            ok &= _resolves(branch, reader, path, problems)
        return ok
    if rk == "union":
        sub: list[str] = []
        if any(_resolves(writer, branch, path, sub) for branch in reader):
            return True
        problems.append(f"{path}: writer type {wk} matches no branch of the reader's union")
        return False
    if wk in PRIMITIVES and rk in PRIMITIVES:
        if rk in PROMOTIONS.get(wk, {wk}):
            return True
        problems.append(f"{path}: {wk} cannot be read as {rk}")
        return False
    if wk != rk:
        problems.append(f"{path}: {wk} cannot be read as {rk}")
        return False
    if wk == "record":
        _record(writer, reader, path, problems)
    elif wk == "array":
        _resolves(writer["items"], reader["items"], path + "[]", problems)
    elif wk == "map":
        _resolves(writer["values"], reader["values"], path + "{}", problems)
    elif wk == "enum":
        missing = set(writer["symbols"]) - set(reader["symbols"])
        if missing and "default" not in reader:
            problems.append(f"{path}: enum symbols removed without a default: {sorted(missing)}")
    elif wk == "fixed" and writer.get("size") != reader.get("size"):
        problems.append(f"{path}: fixed size changed")
    return True


def _record(writer: dict[str, Any], reader: dict[str, Any], path: str, problems: list[str]) -> None:
    written = {f["name"]: f for f in writer["fields"]}
    for field in reader["fields"]:
        names = [field["name"], *field.get("aliases", [])]
        source = next((written[n] for n in names if n in written), None)
        fpath = f"{path}.{field['name']}"
        if source is None:
            if "default" not in field:
                problems.append(f"{fpath}: added without a default")
            continue
        _resolves(source["type"], field["type"], fpath, problems)


def backward_problems(
    old: dict[str, Any], new: dict[str, Any], named: dict[str, Any] | None = None
) -> list[str]:
    """Why data written with ``old`` cannot be read with ``new`` (empty list: compatible).

    ``named`` resolves references to other named types (see :func:`named_types`).
    """
    problems: list[str] = []
    old_x = parse_schema(old, named_schemas=dict(named or {}), expand=True, _write_hint=False)
    new_x = parse_schema(new, named_schemas=dict(named or {}), expand=True, _write_hint=False)
    name = str(new_x.get("name", "")) if isinstance(new_x, dict) else "schema"
    _resolves(old_x, new_x, name.split(".")[-1], problems)
    return problems


def examples_dir(schemas_dir: Path = SCHEMAS_DIR) -> Path:
    return schemas_dir / "examples"


def check_all(schemas_dir: Path = SCHEMAS_DIR) -> list[str]:
    """Every problem with the contract: schemas, examples and the topic registry."""
    problems: list[str] = []
    try:
        store = SchemaStore.from_dir(schemas_dir)
    except Exception as exc:
        return [str(exc)]
    for topic in TOPICS:
        if topic.value not in store.current:
            problems.append(f"topics.yaml: {topic.key_name}: no schema {topic.value}")
    for version in store:
        example = examples_dir(schemas_dir) / f"{version.full_name}.json"
        if not example.exists():
            problems.append(f"{example}: missing example payload")
            continue
        record = example_record(version.schema, json.loads(example.read_text()))
        try:
            validate(record, version.parsed, raise_errors=True)
        except Exception as exc:
            problems.append(f"{example}: does not validate: {exc}")
    return problems


def example_record(schema: Any, value: Any) -> Any:
    """An example payload from JSON: ``bytes`` fields are written as latin-1 strings.

    >>> example_record({"type": "record", "name": "R", "fields": [
    ...     {"name": "b", "type": ["null", "bytes"]}]}, {"b": "k1"})
    {'b': b'k1'}
    """
    kind = _kind(schema)
    if value is None:
        return None
    if kind == "bytes" and isinstance(value, str):
        return value.encode("latin-1")
    if kind == "union":
        branches = [b for b in schema if _kind(b) != "null"]
        return example_record(branches[0], value) if len(branches) == 1 else value
    if kind == "record" and isinstance(value, dict):
        types = {f["name"]: f["type"] for f in schema["fields"]}
        return {k: example_record(types[k], v) if k in types else v for k, v in value.items()}
    if kind == "array" and isinstance(value, list):
        return [example_record(schema["items"], v) for v in value]
    if kind == "map" and isinstance(value, dict):
        return {k: example_record(schema["values"], v) for k, v in value.items()}
    return value


def committed_versions(path: Path) -> list[dict[str, Any]]:
    """Every committed version of one schema file, oldest first (needs a git checkout)."""
    repo = path.resolve().parents[1]
    rel = path.resolve().relative_to(repo)
    revs = subprocess.run(
        ["git", "-C", str(repo), "log", "--format=%H", "--reverse", "--", str(rel)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    versions = []
    for rev in revs:
        shown = subprocess.run(
            ["git", "-C", str(repo), "show", f"{rev}:{rel}"],
            capture_output=True,
            text=True,
            check=False,
        )
        if shown.returncode == 0:
            versions.append(json.loads(shown.stdout))
    return versions


def named_types(schemas_dir: Path = SCHEMAS_DIR) -> dict[str, Any]:
    """The named types defined by the current schema files, for resolving references."""
    named: dict[str, Any] = {}
    for path in sorted(schemas_dir.glob("*.avsc")):
        parse_schema(load_schema(str(path), _write_hint=False), named_schemas=named)
    return named
