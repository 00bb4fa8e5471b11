"""The shape of a segment definitions file as pydantic models (pure): what each key accepts,
worded the way the file's author reads it. :mod:`services.segmenter.dsl` validates the data
of :mod:`segflow.yamldoc` with :class:`DefinitionsModel`, reports each error with the line
and the path of its value, and compiles a valid model into the rule tree of
:mod:`services.segmenter.rules`.

Every mapping is a :class:`segflow.yamldoc.Strict` model, so an unknown key is an error. A
rule is a union told apart by the one key it has (``feature``, ``all``, ``any``, ``not``,
``weighted`` or ``cluster``), so an error inside a rule names only that rule's fields:

>>> from pydantic import ValidationError
>>> from segflow.yamldoc import path_of
>>> try:
...     SegmentModel.model_validate({"name": "A", "enter": {"all": [{"feature": "x",
...                                  "op": ">", "value": 1, "colour": "red"}]}})
... except ValidationError as exc:
...     [(path_of(e["loc"]), e["msg"]) for e in exc.errors()]
[('enter.all[0].colour', 'unknown field (expected one of feature, op, value)')]
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import (
    BeforeValidator,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from segflow import durations
from segflow.yamldoc import TAG, Strict, fail, fail_all, problem
from services.segmenter.rules import (
    _ATTR,
    _PERCENTILE,
    AGING_PREFIX,
    ATTR_PREFIX,
    DERIVED_FEATURES,
    LOOKUP_PREFIX,
    OPERATORS,
    _is_number,
    lookup_call,
)

#: The keys that make a mapping a rule, one per rule.
RULE_KINDS = ("feature", "all", "any", "not", "weighted", "cluster")


# -- scalar checks ----------------------------------------------------------------------------
def _duration(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return durations.parse_duration(value)
    except ValueError:
        raise problem(f"bad duration {value!r}: {durations.EXPECTED}") from None


#: A duration as written (``7d``, ``48h``) in milliseconds; absent or null is None.
Duration = Annotated[Union[int, None], BeforeValidator(_duration)]  # noqa: UP007


def _number(message: str) -> BeforeValidator:
    def check(value: Any) -> float:
        if not _is_number(value):
            raise problem(message)
        return float(value)

    return BeforeValidator(check)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise problem("a non-empty 'name' is required")
    return value


def _version(value: Any) -> str:
    if value is None or isinstance(value, bool) or not str(value).strip():
        raise problem("a non-empty 'version' is required")
    return str(value)


def _priority(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise problem("priority must be an integer (higher wins)")
    return value


def _feature(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise problem("feature must be a non-empty name")
    if value.startswith(ATTR_PREFIX) and not _ATTR.match(value):
        raise problem(f"expected an attribute as attr.<name> (letters, digits, _), got {value!r}")
    if value.startswith(LOOKUP_PREFIX) and lookup_call(value) is None:
        raise problem(
            "expected a lookup as lookup.<table>(attr.<name>), e.g. "
            f"lookup.zip_income(attr.zip), got {value!r}"
        )
    return value


def _operator(value: Any) -> str:
    if value not in OPERATORS:
        raise problem(f"unknown operator {value!r} (one of {', '.join(OPERATORS)})")
    return str(value)


def _members(values: list[Any]) -> list[float | str]:
    """The members of an ``in`` list; an error at the first that is neither number nor text."""
    for i, item in enumerate(values):
        if not (_is_number(item) or isinstance(item, str)):
            raise fail((i,), "'in' values must be numbers or strings", item)
    return [float(v) if _is_number(v) else v for v in values]


def check_value(op: str, value: Any) -> Any:
    """The ``value`` of a condition with operator ``op``, checked (the error says the form)."""
    if op in ("between", "in"):
        if not isinstance(value, list) or not value:
            raise problem(f"'{op}' needs a list of values")
        if op == "in":
            return _members(value)
        if len(value) != 2 or not all(_is_number(v) for v in value):
            raise problem("'between' needs [low, high] numbers")
        lo, hi = float(value[0]), float(value[1])
        if lo > hi:
            raise problem(f"'between' low {lo} is above high {hi}")
        return [lo, hi]
    if isinstance(value, str):
        percentile = _PERCENTILE.match(value.strip()) is not None
        if not (percentile and op in (">", ">=", "<", "<=")) and op not in ("==", "!="):
            raise problem(f"{op!r} needs a number or a percentile like p80 (got {value!r})")
        return value
    if _is_number(value):
        return value
    raise problem(f"value must be a number, a string or a percentile (got {value!r})")


# -- rules ------------------------------------------------------------------------------------
def _rule_kind(value: Any) -> str:
    kinds = [k for k in RULE_KINDS if k in value] if isinstance(value, dict) else []
    return TAG + (kinds[0] if len(kinds) == 1 else "bad")


def _not_a_rule(value: Any) -> None:
    if not isinstance(value, dict):
        raise problem(
            "expected a rule (a mapping with feature/op/value, all, any, not, weighted or cluster)"
        )
    raise problem(
        "a rule needs exactly one of: feature, all, any, not, weighted, "
        f"cluster (got {', '.join(sorted(value)) or 'nothing'})"
    )


class ConditionRule(Strict):
    """``{feature: clv, op: ">=", value: 500}``."""

    required = {
        "feature": "feature must be a non-empty name",
        "op": "an 'op' is required",
        "value": "a 'value' is required",
    }

    feature: Annotated[str, BeforeValidator(_feature)]
    op: Annotated[str, BeforeValidator(_operator)]
    value: Any

    @field_validator("value")
    @classmethod
    def _value_fits_the_operator(cls, value: Any, info: ValidationInfo) -> Any:
        if "op" not in info.data or "feature" not in info.data:
            return value  # the feature or the operator is wrong: that is the error
        return check_value(info.data["op"], value)


class ClusterRule(Strict):
    """``{cluster: [2, 5]}``: ``{feature: cluster, op: in, value: [2, 5]}``."""

    cluster: Any

    @field_validator("cluster")
    @classmethod
    def _cluster_members(cls, value: Any) -> list[float | str]:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise problem("'in' needs a list of values")
        return _members(values)


class AllRule(Strict):
    expected = {"all": "expected a list of rules"}

    all: Annotated[list[RuleModel], Field(min_length=1)]


class AnyRule(Strict):
    expected = {"any": "expected a list of rules"}

    any: Annotated[list[RuleModel], Field(min_length=1)]


class NotRule(Strict):
    not_: RuleModel = Field(alias="not")


class WeightedPart(Strict):
    shape = "expected {when: rule, weight: number}"
    required = {"when": "a 'when' rule is required", "weight": "a numeric 'weight' is required"}

    when: RuleModel
    weight: Annotated[float, _number("a numeric 'weight' is required")]


class WeightedRule(Strict):
    """``{weighted: [{when: rule, weight: 0.7}, ...], threshold: 1.2}``."""

    required = {"threshold": "weighted scoring needs a numeric 'threshold'"}
    expected = {"weighted": "expected a list of {when: rule, weight: number}"}

    weighted: Annotated[list[WeightedPart], Field(min_length=1)]
    threshold: Annotated[float, _number("weighted scoring needs a numeric 'threshold'")]


RuleModel = Annotated[
    Union[  # noqa: UP007
        Annotated[ConditionRule, Tag(TAG + "feature")],
        Annotated[AllRule, Tag(TAG + "all")],
        Annotated[AnyRule, Tag(TAG + "any")],
        Annotated[NotRule, Tag(TAG + "not")],
        Annotated[WeightedRule, Tag(TAG + "weighted")],
        Annotated[ClusterRule, Tag(TAG + "cluster")],
        Annotated[None, PlainValidator(_not_a_rule), Tag(TAG + "bad")],
    ],
    Discriminator(_rule_kind),
]


# -- segments and the file --------------------------------------------------------------------
class SegmentModel(Strict):
    required = {"name": "a non-empty 'name' is required", "enter": "an 'enter' rule is required"}

    name: Annotated[str, BeforeValidator(_name)]
    description: Any = None
    priority: Annotated[int, BeforeValidator(_priority)] = 0
    enter: RuleModel
    exit: Union[RuleModel, None] = None  # noqa: UP007
    re_engaged_when: Union[RuleModel, None] = None  # noqa: UP007
    min_dwell: Duration = None
    cooldown: Duration = None
    ttl: Duration = None
    sustain: Duration = None
    sustain_since: Any = None
    re_engaged_after: Duration = None

    @field_validator("ttl")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise problem("ttl must be positive")
        return value

    @field_validator("sustain_since")
    @classmethod
    def _recency(cls, value: Any) -> str | None:
        if value is not None and (
            not isinstance(value, str)
            or not value.startswith(AGING_PREFIX)
            or value in DERIVED_FEATURES
        ):
            raise problem(f"expected a recency feature named {AGING_PREFIX}* (got {value!r})")
        return value

    @model_validator(mode="after")
    def _fields_that_need_another(self) -> SegmentModel:
        errors = []
        if self.re_engaged_after and self.re_engaged_when is None:
            errors.append(
                (
                    ("re_engaged_after",),
                    "re_engaged_after needs a 're_engaged_when' rule",
                    self.re_engaged_after,
                )
            )
        if self.sustain_since is not None and not self.sustain:
            errors.append(
                (("sustain_since",), "sustain_since needs a 'sustain' duration", self.sustain_since)
            )
        if errors:
            raise fail_all(errors)
        return self


class DefinitionsModel(Strict):
    shape = "expected a mapping with 'version' and 'segments'"
    required = {
        "version": "a non-empty 'version' is required",
        "segments": "'segments' must be a list",
    }
    expected = {"segments": "'segments' must be a list"}

    version: Annotated[str, BeforeValidator(_version)]
    description: Any = None
    deprecate_after: Duration = None
    segments: list[SegmentModel]


for _model in (
    AllRule,
    AnyRule,
    NotRule,
    WeightedPart,
    WeightedRule,
    SegmentModel,
    DefinitionsModel,
):
    _model.model_rebuild()

Rule = Union[  # noqa: UP007 (a runtime alias)
    ConditionRule, AllRule, AnyRule, NotRule, WeightedRule, ClusterRule
]
