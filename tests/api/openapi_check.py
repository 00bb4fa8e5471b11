"""A small validator for the OpenAPI 3.0 schema subset ``segflow/api/openapi.yaml`` uses.

Unknown keywords raise (a constraint the validator silently ignored would make the contract
test pass for the wrong reason).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SPEC_PATH = Path(__file__).resolve().parents[2] / "segflow" / "api" / "openapi.yaml"
ANNOTATIONS = frozenset({"description", "default", "example", "format", "title"})
CHECKED = frozenset(
    {
        "$ref",
        "type",
        "nullable",
        "enum",
        "required",
        "properties",
        "additionalProperties",
        "items",
        "minimum",
        "maximum",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "allOf",
    }
)
TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
    "number": (int, float),
}


def load_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
    return spec


def resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow ``$ref`` (local references only) until a concrete node."""
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), f"only local refs are supported: {ref}"
        target: Any = spec
        for part in ref[2:].split("/"):
            target = target[part]
        node = target
    return node


def validate(
    spec: dict[str, Any], schema: dict[str, Any], value: Any, path: str = "$"
) -> list[str]:
    """Every way ``value`` breaks ``schema`` (empty when it conforms)."""
    schema = resolve(spec, schema)
    unknown = set(schema) - CHECKED - ANNOTATIONS
    if unknown:
        raise ValueError(f"{path}: validator does not support {sorted(unknown)}")
    if value is None:
        return [] if schema.get("nullable") else [f"{path}: null is not allowed"]
    errors: list[str] = []
    for sub in schema.get("allOf", []):
        errors += validate(spec, sub, value, path)
    kind = schema.get("type")
    if kind is not None:
        ok = isinstance(value, TYPES[kind]) and not (
            kind in ("integer", "number") and isinstance(value, bool)
        )
        if not ok:
            return [*errors, f"{path}: expected {kind}, got {type(value).__name__} {value!r:.60}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not one of {schema['enum']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} > maximum {schema['maximum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += validate(spec, schema["items"], item, f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}: missing required {name!r}")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in props:
                errors += validate(spec, props[name], item, f"{path}.{name}")
            elif extra is False:
                errors.append(f"{path}: unexpected property {name!r}")
            elif isinstance(extra, dict):
                errors += validate(spec, extra, item, f"{path}.{name}")
    return errors


def response_schema(spec: dict[str, Any], route: str, status: int) -> dict[str, Any]:
    """The JSON schema the spec documents for ``GET route`` answering ``status``."""
    responses = spec["paths"][route]["get"]["responses"]
    assert str(status) in responses, f"GET {route} answered {status}, not documented"
    response = resolve(spec, responses[str(status)])
    content = response["content"]
    media = "application/json" if "application/json" in content else next(iter(content))
    schema: dict[str, Any] = content[media]["schema"]
    return schema
