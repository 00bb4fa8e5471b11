"""YAML as plain data plus the line of every value: the one loader for segment definitions
and playbooks, so both report errors the same way ("line: field: problem").

Paths name values the way error messages do: ``segments[2].enter.value``. Duplicate keys are
reported (YAML itself keeps the last one silently, which hides a mistake); scalars resolve
as ``yaml.safe_load`` resolves them.

>>> doc = load("a: 1\\nb:\\n  - x: true\\n  - x: 2\\na: 3\\n")
>>> doc.data, doc.line("b[1].x"), doc.line("b[1].nope")
({'a': 1, 'b': [{'x': True}, {'x': 2}]}, 4, 4)
>>> doc.duplicates
[Duplicate(path='a', line=5, first_line=1)]
>>> load("a: [1, 2\\n")
Traceback (most recent call last):
...
segflow.yamldoc.YamlSyntaxError: line 2: expected ',' or ']', but got '<stream end>'
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml


class YamlSyntaxError(ValueError):
    """Text that is not YAML, with the line where the parser gave up."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"line {line}: {problem}")
        self.line, self.problem = line, problem


@dataclass(frozen=True)
class Duplicate:
    path: str
    line: int
    first_line: int


@dataclass
class Document:
    """One YAML document: ``data`` (plain dicts, lists and scalars), the line of each path."""

    data: Any = None
    lines: dict[str, int] = field(default_factory=dict)
    duplicates: list[Duplicate] = field(default_factory=list)

    def line(self, path: str) -> int:
        """The line of ``path``, or of its nearest enclosing value (1 for the document)."""
        while path:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return self.lines.get("", 1)


def load(text: str) -> Document:
    """The single document in ``text`` (an empty text gives ``data`` None)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise _syntax(exc) from None
    return from_node(node) if node is not None else Document()


def load_all(text: str) -> Iterator[Document]:
    """Every document in ``text`` (``---``-separated)."""
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise _syntax(exc) from None
    for node in nodes:
        yield from_node(node) if node is not None else Document()


def from_node(node: yaml.Node) -> Document:
    doc = Document()
    doc.data = _build(doc, node, "")
    return doc


def _build(doc: Document, node: yaml.Node, path: str) -> Any:
    doc.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            sub = f"{path}.{key}" if path else key
            if key in out:
                doc.duplicates.append(Duplicate(sub, key_node.start_mark.line + 1, doc.lines[sub]))
                continue
            out[key] = _build(doc, value_node, sub)
            doc.lines[sub] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(doc, item, f"{path}[{i}]") for i, item in enumerate(node.value)]
    return yaml.SafeLoader("").construct_object(node)


def _syntax(exc: yaml.YAMLError) -> YamlSyntaxError:
    mark = getattr(exc, "problem_mark", None)
    return YamlSyntaxError(
        mark.line + 1 if mark is not None else 1, str(getattr(exc, "problem", None) or exc)
    )
