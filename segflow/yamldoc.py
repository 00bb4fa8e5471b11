"""YAML as plain data plus the line of every value: the one loader for segment definitions
and playbooks, so both report errors the same way ("line: field: problem").

Paths name values the way error messages do: ``segments[2].enter.value``. Duplicate keys are
reported (YAML itself keeps the last one silently, which hides a mistake); scalars resolve
as ``yaml.safe_load`` resolves them.

The files' shapes are pydantic models (:class:`Strict`: unknown keys are errors) validated over
``data``; :func:`located` turns each pydantic error into the line and the path of the value it
is about (the error's ``loc``, looked up in the lines this loader recorded).

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

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError


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
            key = _key(key_node)
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


def _key(node: yaml.Node) -> str:
    """A key as text; a mapping or a list used as a key (``{{feature: x}}``, doubled braces)
    as written, so an error about it shows what was typed.

    >>> load("enter: {{feature: x, op: a}}\\n").data
    {'enter': {'{feature: x, op: a}': None}}
    """
    if isinstance(node, yaml.ScalarNode):
        return str(node.value)
    mark, end = node.start_mark, node.end_mark
    if isinstance(mark.buffer, str):
        return mark.buffer[mark.pointer : mark.pointer + end.index - mark.index]
    return str(yaml.safe_load(yaml.serialize(node)))


def _syntax(exc: yaml.YAMLError) -> YamlSyntaxError:
    mark = getattr(exc, "problem_mark", None)
    return YamlSyntaxError(
        mark.line + 1 if mark is not None else 1, str(getattr(exc, "problem", None) or exc)
    )


# -- pydantic models over a document -----------------------------------------------------------
#: Prefix of the tags of discriminated unions: a tag shows in an error's ``loc`` but names no
#: value in the file, so :func:`path_of` leaves it out.
TAG = "§"
#: The error type of every problem segflow words itself (the message is the whole text).
PROBLEM = "segflow"


def problem(message: str) -> PydanticCustomError:
    """A validation error whose message is ``message`` as written (braces and all)."""
    return PydanticCustomError(PROBLEM, "{message}", {"message": message})


def fail(at: Sequence[str | int], message: str, value: Any = None) -> ValidationError:
    """An error about the value at ``at`` (relative to the value being validated): raised in a
    validator, pydantic puts the enclosing location in front, so a check across fields names
    the field it is about, not the model."""
    return fail_all([(at, message, value)])


def fail_all(errors: Sequence[tuple[Sequence[str | int], str, Any]]) -> ValidationError:
    """Several :func:`fail` errors at once."""
    return ValidationError.from_exception_data(
        "segflow",
        [InitErrorDetails(type=problem(m), loc=tuple(at), input=v) for at, m, v in errors],
    )


class Strict(BaseModel):
    """A mapping in a YAML file: unknown keys are errors, and the errors at this level say
    what was expected in segflow's words (``shape``: not a mapping; ``required``: a missing
    key, reported at the mapping, or at the key when ``required_at_key``; ``expected``: a
    key's value of the wrong type)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: ClassVar[str] = "expected a mapping"
    required: ClassVar[dict[str, str]] = {}
    expected: ClassVar[dict[str, str]] = {}
    required_at_key: ClassVar[bool] = False

    @model_validator(mode="wrap")
    @classmethod
    def _worded(cls, data: Any, handler: Any) -> Any:
        try:
            return handler(data)
        except ValidationError as exc:
            errors = exc.errors()
            if not any(cls._reword(e) for e in errors):
                raise
            out = []
            for e in errors:
                worded = cls._reword(e)
                if worded is not None:
                    loc, message = worded
                    out.append(InitErrorDetails(type=problem(message), loc=loc, input=e["input"]))
                elif e["type"] == PROBLEM:
                    out.append(
                        InitErrorDetails(type=problem(e["msg"]), loc=e["loc"], input=e["input"])
                    )
                else:
                    out.append(
                        InitErrorDetails(
                            type=e["type"],
                            loc=e["loc"],
                            input=e["input"],
                            ctx=e.get("ctx") or {},
                        )
                    )
            raise ValidationError.from_exception_data(exc.title, out) from None

    @classmethod
    def keys(cls) -> list[str]:
        """The keys this mapping accepts, as written in the file."""
        return sorted(f.alias or name for name, f in cls.model_fields.items())

    @classmethod
    def _reword(cls, e: Any) -> tuple[tuple[str | int, ...], str] | None:
        loc, kind = tuple(e["loc"]), e["type"]
        if kind == PROBLEM:
            return None
        if not loc:
            return ((), cls.shape) if kind in ("model_type", "dict_type") else None
        key = loc[0]
        if kind == "extra_forbidden" and len(loc) == 1:
            return loc, f"unknown field (expected one of {', '.join(cls.keys())})"
        if kind == "missing" and len(loc) == 1:
            message = cls.required.get(str(key), f"{key!r} is required")
            return (loc if cls.required_at_key else ()), message
        if key in cls.expected and all(isinstance(x, str) and x.startswith(TAG) for x in loc[1:]):
            return loc, cls.expected[str(key)]
        return None


def path_of(loc: Sequence[str | int]) -> str:
    """``segments[0].enter.all[1]`` for the ``loc`` of a pydantic error (tags left out).

    >>> path_of(("segments", 0, "enter", TAG + "all", "all", 1))
    'segments[0].enter.all[1]'
    """
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not part.startswith(TAG):
            path = f"{path}.{part}" if path else part
    return path


@dataclass(frozen=True)
class Located:
    """One validation error: the line, the path of the value (``""``: the document) and what
    was expected."""

    line: int
    path: str
    message: str


def located(exc: ValidationError, doc: Document, prefix: Sequence[str | int] = ()) -> list[Located]:
    """Every error in ``exc`` with the line of its value in ``doc`` (validated at ``prefix``),
    in the order of the file; a missing key has the line of the mapping that lacks it.

    >>> class Step(Strict):
    ...     id: str
    ...     after: int = 0
    >>> class Book(Strict):
    ...     steps: list[Step]
    >>> doc = load("steps:\\n  - id: a\\n  - after: x\\n    colour: red\\n")
    >>> try:
    ...     Book.model_validate(doc.data)
    ... except ValidationError as exc:
    ...     for e in located(exc, doc):
    ...         print(e.line, e.path, e.message)
    3 steps[1] 'id' is required
    3 steps[1].after Input should be a valid integer, unable to parse string as an integer (got 'x')
    4 steps[1].colour unknown field (expected one of after, id)
    """
    out = []
    for e in exc.errors():
        path = path_of((*prefix, *e["loc"]))
        message = e["msg"]
        if e["type"] != PROBLEM:  # pydantic's own wording, with what was found
            got = repr(e["input"])
            message = f"{message} (got {got if len(got) <= 60 else got[:57] + '...'})"
        out.append(Located(doc.line(path), path, message))
    return sorted(out, key=lambda x: x.line)
