"""Building blocks shared by both kinds: name patterns, bounded string types, decimal strings,
Kubernetes' own small types (Condition, LabelSelector, Toleration) and the model base class
that states every cross-field rule once for pydantic and once as CEL.

Every pattern here is written for three regular-expression engines at once: pydantic's (Rust
`regex`), the API server's (Go RE2, for OpenAPI `pattern` and CEL `matches`) and Python's
`re` (tests, Hypothesis). So: anchored with `^...$` (OpenAPI and Rust patterns are searches,
not full matches), no look-around (RE2 has none), and `[.]` instead of `\\.` so a pattern can
be pasted into a CEL string literal without a second layer of escaping.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Generic, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel

from gpuyard import API_GROUP, API_VERSION

# --- Name patterns -------------------------------------------------------------------------

#: RFC 1123 label: most Kubernetes object names, and the longest a label value may be.
DNS1123_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: RFC 1035 label: a Service name must start with a letter.
DNS1035_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_LABEL_MAX_LENGTH = 63

_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_QUALIFIED_NAME_PART = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"

#: RFC 1123 subdomain: the names of Secrets, ConfigMaps, claims, ServiceAccounts and
#: PriorityClasses.
DNS1123_SUBDOMAIN_PATTERN = rf"^{_DNS_SUBDOMAIN}$"
DNS_SUBDOMAIN_MAX_LENGTH = 253

#: A label key (or annotation key, taint key): optional DNS-subdomain prefix, a slash, then a
#: name of at most 63 characters. RE2 has no look-ahead, so the prefix's own 253-character
#: limit is not expressed; the total length bound (253 + 1 + 63) keeps it close.
LABEL_KEY_PATTERN = rf"^({_DNS_SUBDOMAIN}/)?{_QUALIFIED_NAME_PART}$"
LABEL_KEY_MAX_LENGTH = 317
#: A label value: empty, or alphanumerics at both ends with `-_.` in between.
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LABEL_VALUE_MAX_LENGTH = 63

#: An extended resource name must carry a domain prefix (`nvidia.com/gpu`,
#: `nvidia.com/mig-1g.10gb`); unprefixed names belong to Kubernetes itself.
EXTENDED_RESOURCE_PATTERN = rf"^{_DNS_SUBDOMAIN}/{_QUALIFIED_NAME_PART}$"
EXTENDED_RESOURCE_MAX_LENGTH = 253

#: metav1.Condition's `type` and `reason` patterns, verbatim in meaning.
CONDITION_TYPE_PATTERN = rf"^({_DNS_SUBDOMAIN}/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"

#: A CamelCase word such as a recommendation reason or a scaling limit (`Capacity`).
CAMEL_CASE_PATTERN = r"^[A-Z][A-Za-z0-9]*$"

#: Decimal amounts in specs: never floats, so a price survives YAML round trips exactly.
DECIMAL_PATTERN = r"^[0-9]{1,9}([.][0-9]{1,6})?$"
DECIMAL_MAX_LENGTH = 16
#: Accumulated amounts in status (costs so far) need more integer digits than a price, and
#: the nine decimals usage records carry (docs/metering.md), so the total equals the ledger.
AMOUNT_PATTERN = r"^[0-9]{1,15}([.][0-9]{1,9})?$"
AMOUNT_MAX_LENGTH = 25
#: Measured metric values in status may be negative (a custom Prometheus series can be).
MEASUREMENT_PATTERN = r"^-?[0-9]{1,15}([.][0-9]{1,6})?$"
MEASUREMENT_MAX_LENGTH = 23
#: Digits after the point that every decimal string above may carry.
DECIMAL_PLACES = 6

CURRENCY_PATTERN = r"^[A-Z]{3}$"

#: RFC 3339 as Kubernetes writes metav1.Time (`2006-01-02T15:04:05Z`), fractions tolerated.
TIMESTAMP_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
    r"([.][0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$"
)
TIMESTAMP_MAX_LENGTH = 35

#: Upper bound of a generation or of any int64 counter the API server keeps.
INT64_MAX = 2**63 - 1

# --- Bounded string types ------------------------------------------------------------------

DnsLabel = Annotated[
    str,
    StringConstraints(min_length=1, max_length=DNS_LABEL_MAX_LENGTH, pattern=DNS1123_LABEL_PATTERN),
]
DnsSubdomain = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=DNS_SUBDOMAIN_MAX_LENGTH, pattern=DNS1123_SUBDOMAIN_PATTERN
    ),
]
LabelKey = Annotated[
    str, StringConstraints(max_length=LABEL_KEY_MAX_LENGTH, pattern=LABEL_KEY_PATTERN)
]
LabelValue = Annotated[
    str, StringConstraints(max_length=LABEL_VALUE_MAX_LENGTH, pattern=LABEL_VALUE_PATTERN)
]
ExtendedResourceName = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=EXTENDED_RESOURCE_MAX_LENGTH, pattern=EXTENDED_RESOURCE_PATTERN
    ),
]
CamelCaseWord = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=CAMEL_CASE_PATTERN)
]
DecimalString = Annotated[
    str, StringConstraints(min_length=1, max_length=DECIMAL_MAX_LENGTH, pattern=DECIMAL_PATTERN)
]
AmountString = Annotated[
    str, StringConstraints(min_length=1, max_length=AMOUNT_MAX_LENGTH, pattern=AMOUNT_PATTERN)
]
MeasurementString = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MEASUREMENT_MAX_LENGTH, pattern=MEASUREMENT_PATTERN),
]
CurrencyCode = Annotated[
    str, StringConstraints(min_length=3, max_length=3, pattern=CURRENCY_PATTERN)
]
Timestamp = Annotated[
    str,
    StringConstraints(max_length=TIMESTAMP_MAX_LENGTH, pattern=TIMESTAMP_PATTERN),
    Field(json_schema_extra={"format": "date-time"}),
]
Generation = Annotated[int, Field(ge=0, le=INT64_MAX, json_schema_extra={"format": "int64"})]

#: The description names the key in the CEL message that checks map keys (see api.crd).
LabelMap = dict[Annotated[LabelKey, Field(description="a label key")], LabelValue]


def plain_json(value: Any) -> Any:
    """`value` with every mapping turned into a dict and every list or tuple into a list, so
    read-only views (Kopf's Body, Spec, Status) validate like the JSON they wrap."""
    if isinstance(value, Mapping):
        return {key: plain_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain_json(item) for item in value]
    return value


# --- The model base class ------------------------------------------------------------------

ModelT = TypeVar("ModelT")


@dataclass(frozen=True)
class CelRule(Generic[ModelT]):
    """One cross-field rule, stated once as CEL for the API server and once in Python.

    The CEL half lands in the CRD as an `x-kubernetes-validations` entry on the model's
    schema; the Python half runs in the model validator, so the operator refuses exactly
    what the API server refuses even when the CRD in a cluster is older than the code.
    """

    rule: str
    message: str
    holds: Callable[[ModelT], bool]
    field_path: str | None = None

    def as_schema(self) -> dict[str, str]:
        """The `x-kubernetes-validations` entry."""
        entry = {"rule": self.rule, "message": self.message}
        if self.field_path is not None:
            entry["fieldPath"] = self.field_path
        return entry


def _add_cel_rules(schema: dict[str, Any], model: type[Any]) -> None:
    rules: tuple[CelRule[Any], ...] = getattr(model, "cel_rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [rule.as_schema() for rule in rules]


class ApiModel(BaseModel):
    """Base of every spec and status model: camelCase on the wire, unknown fields refused.

    Models are frozen because the pure core passes them around freely; nothing may change
    a parsed spec behind the back of the code that parsed it. They are strict because the API
    server is: `"3"` is not an integer there, so it must not become one here either.
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        use_attribute_docstrings=True,
        json_schema_extra=_add_cel_rules,
    )

    cel_rules: ClassVar[tuple[CelRule[Any], ...]] = ()

    @model_validator(mode="after")
    def _check_cel_rules(self) -> Self:
        broken = [rule.message for rule in type(self).cel_rules if not rule.holds(self)]
        if broken:
            raise ValueError("; ".join(broken))
        return self

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Self:
        """Validate Kubernetes JSON given as any mapping, such as Kopf's `spec` view (which
        strict validation would refuse as not being a dict)."""
        return cls.model_validate(plain_json(data))

    def to_json(self) -> dict[str, Any]:
        """The model as Kubernetes JSON: camelCase keys, absent optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


#: Put on a field whose default is a whole sub-object: the CRD then defaults it to `{}` and
#: the API server fills in the sub-object's own defaults, exactly as pydantic does.
DEFAULT_EMPTY_OBJECT: dict[str, Any] = {"default": {}}


# --- Kubernetes' small shared types --------------------------------------------------------


class Condition(ApiModel):
    """One observation of the object's state, as the Kubernetes API conventions describe."""

    type: Annotated[
        str, StringConstraints(min_length=1, max_length=316, pattern=CONDITION_TYPE_PATTERN)
    ]
    """CamelCase name of the condition, such as Ready."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    observed_generation: Generation | None = None
    """The metadata.generation the condition was computed from."""
    last_transition_time: Timestamp
    """When status last changed (not when reason or message did)."""
    reason: Annotated[
        str, StringConstraints(min_length=1, max_length=1024, pattern=CONDITION_REASON_PATTERN)
    ]
    """CamelCase, machine-readable cause of the current status."""
    message: Annotated[str, StringConstraints(max_length=32768)]
    """What a person should know, ideally what to do about it."""


#: Conditions form a list keyed by `type`, so server-side apply and strategic merges treat
#: each condition as one entry rather than replacing the whole list.
CONDITIONS_LIST_MAP: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}
MAX_CONDITIONS = 16
#: The `status.conditions` field of both kinds.
ConditionList = Annotated[
    list[Condition], Field(max_length=MAX_CONDITIONS, json_schema_extra=CONDITIONS_LIST_MAP)
]


def _selector_values_match_operator(requirement: LabelSelectorRequirement) -> bool:
    takes_values = requirement.operator in {"In", "NotIn"}
    return takes_values == bool(requirement.values)


class LabelSelectorRequirement(ApiModel):
    """A label key, an operator and the values the operator compares with."""

    cel_rules = (
        CelRule(
            rule="(self.operator in ['In', 'NotIn']) == "
            "(has(self.values) && size(self.values) > 0)",
            message="values must be non-empty for operators In and NotIn, and empty for Exists "
            "and DoesNotExist",
            holds=_selector_values_match_operator,
        ),
    )

    key: LabelKey
    """The label key the requirement applies to."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """How the key's value relates to values."""
    values: Annotated[list[LabelValue], Field(max_length=64)] | None = None
    """Values for In and NotIn; empty for Exists and DoesNotExist."""


class LabelSelector(ApiModel):
    """Kubernetes label selector: every matchLabels pair and every expression must hold."""

    match_labels: Annotated[LabelMap, Field(max_length=16)] | None = None
    """Labels that must be present with exactly these values."""
    match_expressions: Annotated[list[LabelSelectorRequirement], Field(max_length=16)] | None = None
    """Further requirements on labels."""


def _exists_has_no_value(toleration: Toleration) -> bool:
    return toleration.operator != "Exists" or not toleration.value


def _equal_needs_key(toleration: Toleration) -> bool:
    return toleration.operator == "Exists" or toleration.key is not None


def _seconds_only_for_no_execute(toleration: Toleration) -> bool:
    return toleration.toleration_seconds is None or toleration.effect == "NoExecute"


class Toleration(ApiModel):
    """Lets the pool's pods run on nodes with a matching taint."""

    cel_rules = (
        CelRule(
            rule="self.operator != 'Exists' || !has(self.value) || self.value == ''",
            message="value must be empty when operator is Exists",
            holds=_exists_has_no_value,
        ),
        CelRule(
            rule="self.operator == 'Exists' || has(self.key)",
            message="key is required when operator is Equal (only Exists may leave it empty, "
            "to tolerate every taint)",
            holds=_equal_needs_key,
        ),
        CelRule(
            rule="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            message="tolerationSeconds only applies to effect NoExecute",
            holds=_seconds_only_for_no_execute,
        ),
    )

    key: LabelKey | None = None
    """Taint key to tolerate; empty with operator Exists tolerates every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Equal compares value; Exists matches any value."""
    value: LabelValue | None = None
    """Taint value to match when operator is Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches every effect."""
    toleration_seconds: Annotated[int, Field(ge=0, le=31_536_000)] | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


class ObjectMeta(BaseModel):
    """The few metadata fields the operator reads. Everything else the server keeps there
    (managedFields, resourceVersion, ...) is ignored rather than refused."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: Annotated[str, StringConstraints(min_length=1, max_length=253)]
    namespace: Annotated[str, StringConstraints(max_length=DNS_LABEL_MAX_LENGTH)] | None = None
    uid: Annotated[str, StringConstraints(max_length=128)] | None = None
    generation: Generation | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class ApiObject(BaseModel):
    """What every gpuyard object shares as the API returns it; the kinds add `kind`, their
    own metadata and their spec (the CRDs are built from the spec and status models, not
    from these)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True
    )

    api_version: str = Field(default=f"{API_GROUP}/{API_VERSION}", alias="apiVersion")
    metadata: ObjectMeta
    status: dict[str, Any] | None = None
    """Kept as plain data: a status written by another version must never stop the spec
    from being read."""

    @classmethod
    def from_mapping(cls, body: Mapping[str, Any]) -> Self:
        """Validate the object as Kopf or the Kubernetes client hands it over."""
        return cls.model_validate(plain_json(body))

    @property
    def name(self) -> str:
        """The object's name."""
        return self.metadata.name
