"""The generated CRDs: committed files in sync, structural, bounded for CEL, and equivalent
to the pydantic models (same defaults, same rules)."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, Field
from sample_objects import pool_spec, service_spec

from gpuyard.api import crd as crd_module
from gpuyard.api.common import ApiModel, CelRule
from gpuyard.api.crd import (
    UnsupportedSchemaError,
    build_crds,
    crd_files,
    openapi_schema,
    render_crds_yaml,
)
from gpuyard.api.pool import GPUPoolSpec
from gpuyard.api.reference import render_reference
from gpuyard.api.service import AIServiceSpec
from gpuyard.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]
CRDS_DIR = REPO_ROOT / "crds"

Schema = dict[str, Any]


def crd_by_kind(kind: str) -> dict[str, Any]:
    return next(crd for crd in build_crds() if crd["spec"]["names"]["kind"] == kind)


def root_schema(kind: str) -> Schema:
    schema: Schema = crd_by_kind(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def walk(schema: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every schema node with its path (`.spec.container.env[].name`)."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def all_nodes() -> Iterator[tuple[str, str, Schema]]:
    for kind in ("AIService", "GPUPool"):
        for path, node in walk(root_schema(kind)):
            yield kind, path, node


# --- The committed files ------------------------------------------------------------------


@pytest.mark.parametrize("file_name", sorted(crd_files()))
def test_committed_crds_match_the_models(file_name: str) -> None:
    committed = CRDS_DIR / file_name
    expected = crd_files()[file_name]
    assert committed.exists(), f"crds/{file_name} is missing: run `gpuyard crds --output-dir crds`"
    assert committed.read_text(encoding="utf-8") == expected, (
        f"crds/{file_name} differs from the models in operator/gpuyard/api: "
        "run `make crds` (or `gpuyard crds --output-dir crds`) and commit the result"
    )


def test_no_stale_generated_file_is_left_behind() -> None:
    # A renamed kind would otherwise leave its old CRD file to be applied forever.
    generated = sorted(path.name for path in CRDS_DIR.glob("gpuyard.io_*.yaml"))

    assert generated == sorted(crd_files())


def test_crds_command_writes_what_crd_files_describes(tmp_path: Path) -> None:
    # The file writing lives in the CLI; gpuyard.api only renders text.
    assert main(["crds", "--output-dir", str(tmp_path / "crds")]) == 0
    written = sorted((tmp_path / "crds").iterdir())

    assert sorted(path.name for path in written) == sorted(crd_files())
    for path in written:
        assert path.read_text(encoding="utf-8") == crd_files()[path.name]


def test_crds_command_writes_the_reference(tmp_path: Path) -> None:
    assert main(["crds", "--reference", str(tmp_path / "api.md")]) == 0

    assert (tmp_path / "api.md").read_text(encoding="utf-8") == render_reference()


def test_rendered_stream_parses_back_to_the_built_crds() -> None:
    documents = list(yaml.safe_load_all(render_crds_yaml()))

    assert documents == build_crds()
    assert [doc["metadata"]["name"] for doc in documents] == [
        "aiservices.gpuyard.io",
        "gpupools.gpuyard.io",
    ]


# --- Names, scope, subresources, columns --------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "plural", "short_name", "scope"),
    [
        ("AIService", "aiservices", "ais", "Namespaced"),
        ("GPUPool", "gpupools", "gpool", "Cluster"),
    ],
)
def test_names_and_scope(kind: str, plural: str, short_name: str, scope: str) -> None:
    crd = crd_by_kind(kind)

    assert crd["metadata"]["name"] == f"{plural}.gpuyard.io"
    assert crd["spec"]["group"] == "gpuyard.io"
    assert crd["spec"]["scope"] == scope
    assert crd["spec"]["names"] == {
        "kind": kind,
        "listKind": f"{kind}List",
        "plural": plural,
        "singular": kind.lower(),
        "shortNames": [short_name],
        "categories": ["gpuyard"],
    }
    [version] = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)


def test_subresources() -> None:
    service_version = crd_by_kind("AIService")["spec"]["versions"][0]
    pool_version = crd_by_kind("GPUPool")["spec"]["versions"][0]

    assert service_version["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    assert pool_version["subresources"] == {"status": {}}
    schema = root_schema("AIService")
    assert resolve(schema, ".spec.replicas")["type"] == "integer"
    assert resolve(schema, ".status.replicas")["type"] == "integer"
    assert resolve(schema, ".status.selector")["type"] == "string"


def resolve(schema: Schema, json_path: str) -> Schema:
    """The schema node a simple JSONPath (as printer columns use) points at."""
    node = schema
    for step in re.sub(r"\[\?\(.*?\)\]", "[]", json_path).strip(".").split("."):
        name, _, rest = step.partition("[")
        if name == "metadata" and "properties" not in node["properties"][name]:
            return {"type": "object"}  # implicit ObjectMeta
        node = node["properties"][name]
        if rest:
            node = node["items"]
    return node


def test_aiservice_printer_columns() -> None:
    columns = crd_by_kind("AIService")["spec"]["versions"][0]["additionalPrinterColumns"]

    assert [(c["name"], c["jsonPath"]) for c in columns if c.get("priority", 0) == 0] == [
        ("Pool", ".spec.pool"),
        ("GPUs", ".spec.gpusPerReplica"),
        ("Ready", ".status.readyReplicas"),
        ("Desired", ".status.desiredReplicas"),
        ("Cost", ".status.usage.cost"),
        ("Status", '.status.conditions[?(@.type=="Ready")].status'),
        ("Age", ".metadata.creationTimestamp"),
    ]


@pytest.mark.parametrize("kind", ["AIService", "GPUPool"])
def test_printer_columns_point_at_fields_of_their_type(kind: str) -> None:
    schema = root_schema(kind)
    for column in crd_by_kind(kind)["spec"]["versions"][0]["additionalPrinterColumns"]:
        if column["jsonPath"] == ".metadata.creationTimestamp":
            assert column["type"] == "date"
            continue
        target = resolve(schema, column["jsonPath"])
        assert target["type"] == column["type"], column


@pytest.mark.parametrize("kind", ["AIService", "GPUPool"])
def test_conditions_are_a_list_map_keyed_by_type(kind: str) -> None:
    conditions = resolve(root_schema(kind), ".status.conditions")

    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]
    assert conditions["items"]["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert conditions["items"]["properties"]["lastTransitionTime"]["format"] == "date-time"


@pytest.mark.parametrize(
    ("kind", "pattern"),
    [("AIService", "^[a-z]([-a-z0-9]*[a-z0-9])?$"), ("GPUPool", "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")],
)
def test_object_names_are_limited_to_63_character_labels(kind: str, pattern: str) -> None:
    metadata = root_schema(kind)["properties"]["metadata"]

    assert metadata == {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 63, "pattern": pattern}},
    }


# --- Structural rules ---------------------------------------------------------------------

FORBIDDEN_KEYS = {
    "$ref",
    "$defs",
    "anyOf",
    "allOf",
    "oneOf",
    "not",
    "title",
    "const",
    "propertyNames",
    "patternProperties",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "examples",
}
#: apiVersion and kind are checked by the API server itself and never reach a CEL rule.
ROOT_STRINGS = {".apiVersion", ".kind"}


def test_no_json_schema_only_constructs_are_left() -> None:
    leftovers = [
        (kind, path, sorted(FORBIDDEN_KEYS & node.keys()))
        for kind, path, node in all_nodes()
        if FORBIDDEN_KEYS & node.keys()
    ]
    assert leftovers == []


def test_every_node_has_a_type_and_no_boolean_additional_properties() -> None:
    for kind, path, node in all_nodes():
        assert node.get("type") in {"object", "array", "string", "integer", "boolean"}, (kind, path)
        assert not isinstance(node.get("additionalProperties"), bool), (kind, path)
        assert not ("properties" in node and "additionalProperties" in node), (kind, path)


def test_every_string_list_and_map_is_bounded() -> None:
    unbounded = []
    for kind, path, node in all_nodes():
        bounded_string = "maxLength" in node or "enum" in node
        if node["type"] == "string" and not bounded_string and path not in ROOT_STRINGS:
            unbounded.append((kind, path, "maxLength"))
        if node["type"] == "array" and "maxItems" not in node:
            unbounded.append((kind, path, "maxItems"))
        if "additionalProperties" in node and "maxProperties" not in node:
            unbounded.append((kind, path, "maxProperties"))
    assert unbounded == []


def test_every_number_is_bounded() -> None:
    unbounded = [
        (kind, path)
        for kind, path, node in all_nodes()
        if node["type"] == "integer"
        and ("minimum" not in node or ("maximum" not in node and node.get("format") != "int64"))
    ]
    assert unbounded == []


def test_required_fields_exist_and_list_map_keys_are_required() -> None:
    for kind, path, node in all_nodes():
        assert set(node.get("required", [])) <= set(node.get("properties", {})), (kind, path)
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert set(keys) <= set(node["items"].get("required", [])), (kind, path)


def test_every_field_is_described_in_one_paragraph() -> None:
    # `kubectl explain` shows these descriptions; docstrings wrap, descriptions must not.
    for kind in ("AIService", "GPUPool"):
        root = root_schema(kind)
        for part in ("spec", "status"):
            for path, node in walk(root["properties"][part], f".{part}"):
                for name, prop in node.get("properties", {}).items():
                    assert prop.get("description", "").strip(), (kind, f"{path}.{name}")
                assert "\n" not in node.get("description", ""), (kind, path)


def test_no_status_field_has_a_default() -> None:
    # Defaults under status would be written by the API server, not observed by the operator.
    for kind in ("AIService", "GPUPool"):
        for path, node in walk(root_schema(kind)["properties"]["status"], ".status"):
            assert "default" not in node, (kind, path)


# --- CEL rules ----------------------------------------------------------------------------

FIELD_REFERENCE = re.compile(r"\bself((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
CEL_METHODS = {
    "size",
    "all",
    "exists",
    "exists_one",
    "filter",
    "map",
    "matches",
    "startsWith",
    "endsWith",
    "contains",
}


def test_every_model_rule_is_in_the_crd() -> None:
    crd_rules = {
        rule["rule"]
        for _, _, node in all_nodes()
        for rule in node.get("x-kubernetes-validations", [])
    }
    model_rules: set[str] = set()
    pending: list[type[ApiModel]] = list(ApiModel.__subclasses__())
    while pending:
        model = pending.pop()
        pending.extend(model.__subclasses__())
        if model.__module__.startswith("gpuyard."):  # not the tests' own small models
            model_rules.update(rule.rule for rule in model.cel_rules)

    assert model_rules
    assert model_rules <= crd_rules


def test_every_cel_rule_has_a_message_and_references_real_fields() -> None:
    for kind, path, node in all_nodes():
        for validation in node.get("x-kubernetes-validations", []):
            assert set(validation) <= {"rule", "message", "fieldPath"}, (kind, path)
            assert validation["message"].strip(), (kind, path)
            for reference in FIELD_REFERENCE.findall(validation["rule"]):
                target = node
                for name in reference.strip(".").split("."):
                    if name in CEL_METHODS:
                        break
                    assert name in target.get("properties", {}), (kind, path, validation["rule"])
                    target = target["properties"][name]
            if "fieldPath" in validation:
                target = node
                for name in validation["fieldPath"].strip(".").split("."):
                    target = target["properties"][name]


def test_cel_string_literals_are_balanced() -> None:
    # An unescaped quote inside a generated regex would end the CEL string early.
    for kind, path, node in all_nodes():
        for validation in node.get("x-kubernetes-validations", []):
            unescaped = re.sub(r"\\.", "", validation["rule"])
            assert unescaped.count("'") % 2 == 0, (kind, path, validation["rule"])
            assert unescaped.count("(") == unescaped.count(")"), (kind, path)


def test_map_key_rules_come_from_the_key_types() -> None:
    node_selector = resolve(root_schema("GPUPool"), ".spec.nodeSelector")

    [validation] = node_selector["x-kubernetes-validations"]
    assert validation["rule"].startswith("self.all(k, k.size() <= 317 && k.matches('^(")
    assert validation["message"].startswith("every key must be a label key: at most 317")
    assert node_selector["additionalProperties"]["maxLength"] == 63
    assert (node_selector["minProperties"], node_selector["maxProperties"]) == (1, 16)


# --- Same behaviour as the models ---------------------------------------------------------


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Structural defaulting as the API server does it: a missing property with a default
    gets it, then defaulting continues inside (so `default: {}` fills nested defaults)."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and "properties" in schema:
        for name, prop in schema["properties"].items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
            if name in value:
                value[name] = apply_defaults(prop, value[name])
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        value = {k: apply_defaults(schema["additionalProperties"], v) for k, v in value.items()}
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], item) for item in value]
    return value


@pytest.mark.parametrize(
    ("model", "spec"),
    [
        (AIServiceSpec, service_spec()),
        (
            AIServiceSpec,
            service_spec(
                maxReplicas=3,
                container={"image": "x", "port": 8080, "readinessProbe": {"httpGet": {}}},
                autoscaling={
                    "scaleUp": {"periodSeconds": 30},
                    "metrics": [
                        {
                            "type": "Prometheus",
                            "prometheus": {"metric": "m", "targetPerReplica": "2"},
                        }
                    ],
                },
            ),
        ),
        (GPUPoolSpec, pool_spec()),
        (GPUPoolSpec, pool_spec(tolerations=[{"key": "nvidia.com/gpu", "effect": "NoSchedule"}])),
    ],
)
def test_api_server_defaults_equal_pydantic_defaults(model: type[ApiModel], spec: Any) -> None:
    kind = "AIService" if model is AIServiceSpec else "GPUPool"

    defaulted = apply_defaults(root_schema(kind)["properties"]["spec"], spec)

    assert defaulted == model.model_validate(spec).to_json()


def test_every_default_is_accepted_by_its_own_schema_type() -> None:
    python_types: dict[str, type] = {
        "string": str,
        "integer": int,
        "object": dict,
        "array": list,
        "boolean": bool,
    }
    for kind, path, node in all_nodes():
        if "default" in node:
            default = node["default"]
            assert isinstance(default, python_types[node["type"]]), (kind, path)
            if isinstance(default, str) and "pattern" in node:
                assert re.fullmatch(node["pattern"].strip("^$"), default), (kind, path)


# --- The converter refuses what it cannot express -----------------------------------------


class _UnionModel(BaseModel):
    value: int | str


class _ExclusiveModel(BaseModel):
    value: int = Field(gt=0, le=5)


class _TwoPatternKeysModel(BaseModel):
    value: dict[str, int]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_UnionModel, "only Optional[X] unions are supported"),
        (_ExclusiveModel, "exclusiveMinimum has no structural OpenAPI v3 equivalent"),
    ],
)
def test_unsupported_constructs_fail_loudly(model: type[BaseModel], message: str) -> None:
    with pytest.raises(UnsupportedSchemaError, match=re.escape(message)):
        openapi_schema(model)


def test_plain_dict_becomes_additional_properties_without_key_rule() -> None:
    schema = openapi_schema(_TwoPatternKeysModel)

    assert schema["properties"]["value"] == {
        "type": "object",
        "additionalProperties": {"type": "integer"},
    }


class _RuledChild(ApiModel):
    cel_rules = (CelRule(rule="self.a <= 2", message="a too big", holds=lambda m: m.a <= 2),)

    a: int = Field(default=0, ge=0, le=5)
    """A number."""


class _RuledParent(ApiModel):
    child: _RuledChild | None = Field(
        default=None,
        json_schema_extra={"x-kubernetes-validations": [{"rule": "self.a != 1", "message": "x"}]},
    )
    """A child with rules of its own and of the field."""


def test_field_rules_and_model_rules_are_both_kept() -> None:
    child = openapi_schema(_RuledParent)["properties"]["child"]

    assert child["x-kubernetes-validations"] == [
        {"rule": "self.a <= 2", "message": "a too big"},
        {"rule": "self.a != 1", "message": "x"},
    ]
    assert child["description"] == "A child with rules of its own and of the field."


def test_cel_string_escapes_quotes_and_backslashes() -> None:
    assert crd_module._cel_string(r"it's a \d") == r"'it\'s a \\d'"
