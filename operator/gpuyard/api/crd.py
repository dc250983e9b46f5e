"""CustomResourceDefinitions generated from the pydantic models.

Pydantic emits JSON Schema 2020-12; the API server wants a *structural* OpenAPI v3 schema.
The conversion below inlines `$ref`s, turns `Optional[X]` (an `anyOf` with `null`) into a
plain optional property, drops what OpenAPI v3 or the structural rules do not allow
(`title`, `additionalProperties: false`, `const`, `propertyNames`, `patternProperties`) and
re-expresses the last two as CEL, since the API server cannot check map keys otherwise.
Anything it does not know how to convert is an error, never silently dropped.

Every string carries a `maxLength` and every list a `maxItems` (the tests check it): the
API server estimates the cost of each CEL rule from those bounds and refuses a CRD whose
rules could cost too much.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from gpuyard import API_GROUP, API_VERSION
from gpuyard.api import pool, service
from gpuyard.api.common import INT64_MAX

CATEGORY = "gpuyard"
GENERATED_HEADER = (
    "# Generated from the models in operator/gpuyard/api by `gpuyard crds` (make crds).\n"
    "# Do not edit: change the models and regenerate.\n"
)

JsonSchema = dict[str, Any]


class UnsupportedSchemaError(ValueError):
    """The models use a JSON Schema construct that has no structural OpenAPI v3 equivalent."""


# --- JSON Schema -> structural OpenAPI v3 --------------------------------------------------

_VALIDATIONS = "x-kubernetes-validations"
_DROPPED_KEYS = frozenset({"title", "examples"})
_UNSUPPORTED_KEYS = frozenset(
    {"oneOf", "allOf", "not", "exclusiveMinimum", "exclusiveMaximum", "if", "then", "else"}
)


def _cel_string(text: str) -> str:
    """`text` as a single-quoted CEL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _normalize_description(text: str) -> str:
    # Docstrings wrap at the source's line length; a description is one paragraph.
    return " ".join(text.split())


def _merge(target: Mapping[str, Any], node: Mapping[str, Any], used_key: str) -> JsonSchema:
    merged = {**target, **{key: value for key, value in node.items() if key != used_key}}
    rules = [*target.get(_VALIDATIONS, []), *node.get(_VALIDATIONS, [])]
    if rules:
        merged[_VALIDATIONS] = rules
    return merged


def _drop_int64_maximum(schema: JsonSchema) -> None:
    # The API server holds schema bounds as float64, in which 2**63 - 1 is no integer: it
    # would refuse every value. `format: int64` states that bound in a way it understands.
    if schema.get("format") == "int64" and schema.get("maximum") == INT64_MAX:
        del schema["maximum"]


@dataclass
class _Converter:
    definitions: Mapping[str, JsonSchema]

    def convert(self, node: Mapping[str, Any]) -> JsonSchema:
        node = self._resolve(node)
        result: JsonSchema = {}
        for key, value in node.items():
            if key in _DROPPED_KEYS:
                continue
            if key in _UNSUPPORTED_KEYS:
                msg = f"{key} has no structural OpenAPI v3 equivalent: {json.dumps(node)}"
                raise UnsupportedSchemaError(msg)
            if key == "properties":
                result["properties"] = {name: self.convert(prop) for name, prop in value.items()}
            elif key == "items":
                result["items"] = self.convert(value)
            elif key == "additionalProperties":
                if isinstance(value, Mapping):
                    result["additionalProperties"] = self.convert(value)
                # `false` (extra="forbid") is what a structural schema does anyway: unknown
                # fields are pruned, or refused under strict field validation.
            elif key in {"patternProperties", "propertyNames"}:
                continue  # handled together below
            elif key == "const":
                result["enum"] = [value]
            elif key == "description":
                result["description"] = _normalize_description(value)
            elif key == "default" and value is None:
                continue
            else:
                result[key] = copy.deepcopy(value)
        self._convert_map_keys(node, result)
        _drop_int64_maximum(result)
        return result

    def _resolve(self, node: Mapping[str, Any]) -> Mapping[str, Any]:
        """Inline `$ref` and unwrap `anyOf: [X, null]`; sibling keys (a field's description
        or default) win over the target's, and CEL rules of both are kept."""
        if "$ref" in node:
            name = node["$ref"].removeprefix("#/$defs/")
            return _merge(self._resolve(self.definitions[name]), node, "$ref")
        if "anyOf" in node:
            branches = [branch for branch in node["anyOf"] if branch != {"type": "null"}]
            if len(branches) != 1 or len(branches) == len(node["anyOf"]):
                msg = f"only Optional[X] unions are supported: {json.dumps(node)}"
                raise UnsupportedSchemaError(msg)
            return _merge(self._resolve(branches[0]), node, "anyOf")
        return node

    def _convert_map_keys(self, node: Mapping[str, Any], result: JsonSchema) -> None:
        """Pydantic describes constrained dict keys with `patternProperties` and
        `propertyNames`, neither of which a structural schema allows; the value schema becomes
        `additionalProperties` and the key constraints a CEL rule on the map."""
        pattern_properties: Mapping[str, Any] = node.get("patternProperties", {})
        key_schema: Mapping[str, Any] = node.get("propertyNames", {})
        unknown = set(key_schema) - {"maxLength", "description"}
        if len(pattern_properties) > 1 or unknown:
            msg = f"map keys support one pattern, maxLength and description: {json.dumps(node)}"
            raise UnsupportedSchemaError(msg)
        checks: list[str] = []
        constraints: list[str] = []
        if "maxLength" in key_schema:
            checks.append(f"k.size() <= {key_schema['maxLength']}")
            constraints.append(f"at most {key_schema['maxLength']} characters")
        for key_pattern, value_schema in pattern_properties.items():
            result["additionalProperties"] = self.convert(value_schema)
            checks.append(f"k.matches({_cel_string(key_pattern)})")
            constraints.append(f"matching {key_pattern}")
        if checks:
            what = key_schema.get("description", "a valid key")
            rule = {
                "rule": f"self.all(k, {' && '.join(checks)})",
                "message": f"every key must be {what}: {', '.join(constraints)}",
            }
            result.setdefault(_VALIDATIONS, []).append(rule)


def openapi_schema(model: type[BaseModel]) -> JsonSchema:
    """The structural OpenAPI v3 schema of `model`, with every reference inlined."""
    json_schema = model.model_json_schema(by_alias=True, mode="validation")
    definitions = json_schema.pop("$defs", {})
    return _Converter(definitions).convert(json_schema)


# --- The two CRDs --------------------------------------------------------------------------


@dataclass(frozen=True)
class KindInfo:
    """What a CRD says about its kind besides the schema."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    namespaced: bool
    spec_model: type[BaseModel]
    status_model: type[BaseModel]
    name_pattern: str
    name_max_length: int
    description: str
    printer_columns: tuple[dict[str, Any], ...]
    scale: dict[str, str] | None = None

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{API_GROUP}"

    @property
    def file_name(self) -> str:
        return f"{API_GROUP}_{self.plural}.yaml"


def _ready_condition_column(field: str) -> str:
    return f'.status.conditions[?(@.type=="Ready")].{field}'


_AGE_COLUMN = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}

AISERVICE = KindInfo(
    kind=service.KIND,
    plural=service.PLURAL,
    short_names=("ais",),
    namespaced=True,
    spec_model=service.AIServiceSpec,
    status_model=service.AIServiceStatus,
    name_pattern=service.SERVICE_NAME_PATTERN,
    name_max_length=service.SERVICE_NAME_MAX_LENGTH,
    description="AIService is a GPU service run by gpuyard: a container whose replicas each "
    "get a number of GPUs from a GPUPool, scaled by load and budget, metered per second.",
    printer_columns=(
        {"name": "Pool", "type": "string", "jsonPath": ".spec.pool"},
        {
            "name": "GPUs",
            "type": "integer",
            "description": "GPUs per replica",
            "jsonPath": ".spec.gpusPerReplica",
        },
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas"},
        {
            "name": "Cost",
            "type": "string",
            "description": "Cost so far, in the pool's currency",
            "jsonPath": ".status.usage.cost",
        },
        {"name": "Status", "type": "string", "jsonPath": _ready_condition_column("status")},
        {
            "name": "Reason",
            "type": "string",
            "priority": 1,
            "jsonPath": _ready_condition_column("reason"),
        },
        _AGE_COLUMN,
    ),
    # The scale subresource lets kubectl scale, an HPA or KEDA drive a service whose
    # autoscaling mode is Off.
    scale={
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    },
)

GPUPOOL = KindInfo(
    kind=pool.KIND,
    plural=pool.PLURAL,
    short_names=("gpool",),
    namespaced=False,
    spec_model=pool.GPUPoolSpec,
    status_model=pool.GPUPoolStatus,
    name_pattern=pool.POOL_NAME_PATTERN,
    name_max_length=pool.POOL_NAME_MAX_LENGTH,
    description="GPUPool is a set of GPU nodes of one type with a price per GPU-hour, "
    "offered to some or all namespaces, optionally with a per-namespace GPU quota.",
    printer_columns=(
        {"name": "GPU Type", "type": "string", "jsonPath": ".spec.gpuType"},
        {"name": "Nodes", "type": "integer", "jsonPath": ".status.readyNodes"},
        {"name": "Capacity", "type": "integer", "jsonPath": ".status.capacity"},
        {"name": "Allocated", "type": "integer", "jsonPath": ".status.allocated"},
        {"name": "Available", "type": "integer", "jsonPath": ".status.available"},
        {"name": "Price", "type": "string", "jsonPath": ".spec.price.perGpuHour"},
        {
            "name": "Currency",
            "type": "string",
            "priority": 1,
            "jsonPath": ".spec.price.currency",
        },
        {"name": "Resource", "type": "string", "priority": 1, "jsonPath": ".spec.resourceName"},
        {
            "name": "Unmanaged",
            "type": "integer",
            "priority": 1,
            "jsonPath": ".status.billing.unmanagedGpus",
        },
        {"name": "Status", "type": "string", "jsonPath": _ready_condition_column("status")},
        _AGE_COLUMN,
    ),
)

KINDS: tuple[KindInfo, ...] = (AISERVICE, GPUPOOL)


def _root_schema(info: KindInfo) -> JsonSchema:
    return {
        "type": "object",
        "description": info.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "Versioned schema of this representation of an object.",
            },
            "kind": {
                "type": "string",
                "description": "REST resource this object represents.",
            },
            # Only name restrictions are allowed here; the name ends up in label values
            # (and, for an AIService, as a Service name), so it must be a 63-character label.
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "maxLength": info.name_max_length,
                        "pattern": info.name_pattern,
                    },
                },
            },
            "spec": openapi_schema(info.spec_model),
            "status": openapi_schema(info.status_model),
        },
    }


def build_crd(info: KindInfo) -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CustomResourceDefinition of one kind."""
    subresources: dict[str, Any] = {"status": {}}
    if info.scale is not None:
        subresources["scale"] = dict(info.scale)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": info.crd_name},
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.kind.lower(),
                "shortNames": list(info.short_names),
                "categories": [CATEGORY],
            },
            "scope": "Namespaced" if info.namespaced else "Cluster",
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": _root_schema(info)},
                    "subresources": subresources,
                    "additionalPrinterColumns": [dict(column) for column in info.printer_columns],
                }
            ],
        },
    }


def build_crds() -> list[dict[str, Any]]:
    """Both CRDs, ordered by name."""
    return sorted((build_crd(info) for info in KINDS), key=lambda crd: crd["metadata"]["name"])


# --- YAML ----------------------------------------------------------------------------------


class _CrdDumper(yaml.SafeDumper):
    """Block style for multi-line strings, so generated files diff line by line."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_CrdDumper.add_representer(str, _represent_str)


def _dump(document: Mapping[str, Any]) -> str:
    # Sorted keys and a fixed width make the output a pure function of the models.
    return yaml.dump(
        document,
        Dumper=_CrdDumper,
        sort_keys=True,
        default_flow_style=False,
        width=100,
        allow_unicode=True,
    )


def render_crd_yaml(crd: Mapping[str, Any]) -> str:
    """One CRD as a YAML document with the generated-file header."""
    return f"{GENERATED_HEADER}---\n{_dump(crd)}"


def render_crds_yaml() -> str:
    """Both CRDs as one multi-document YAML stream, as `kubectl apply -f -` takes it."""
    return GENERATED_HEADER + "".join(f"---\n{_dump(crd)}" for crd in build_crds())


def crd_files() -> dict[str, str]:
    """File name -> content of every CRD file, as `gpuyard crds --output-dir` writes them."""
    by_name = {crd["metadata"]["name"]: crd for crd in build_crds()}
    return {info.file_name: render_crd_yaml(by_name[info.crd_name]) for info in KINDS}
