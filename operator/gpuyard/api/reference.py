"""The API reference (docs/api.md), generated from the same schemas as the CRDs.

Each field of each kind becomes one table row: its path, type, default, bounds and the
description written on the pydantic model, so the reference cannot drift from what the
API server enforces (a unit test compares the committed file with this output).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from gpuyard.api.crd import build_crds

_BOUNDS = (
    ("minimum", "≥ {}"),
    ("maximum", "≤ {}"),
    ("minLength", "length ≥ {}"),
    ("maxLength", "length ≤ {}"),
    ("maxItems", "≤ {} items"),
    ("maxProperties", "≤ {} entries"),
    ("pattern", "matches `{}`"),
)


def _type(schema: Mapping[str, Any]) -> str:
    kind = str(schema.get("type", "object"))
    if kind == "array":
        return f"list of {_type(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema:
        return f"map of {_type(schema['additionalProperties'])}"
    if "enum" in schema:
        return " \\| ".join(f"`{value}`" for value in schema["enum"])
    return kind


def _default(schema: Mapping[str, Any]) -> str:
    if "default" not in schema or schema["default"] == {}:
        return ""
    value = schema["default"]
    return '`""`' if value == "" else f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _rows(schema: Mapping[str, Any], path: str, required: set[str]) -> Iterator[str]:
    for name, child in schema.get("properties", {}).items():
        field = f"{path}.{name}" if path else name
        bounds = [form.format(child[key]) for key, form in _BOUNDS if key in child]
        # A list's item rules (each toleration, each env variable) belong on the list's row.
        items = child.get("items", {}) if child.get("type") == "array" else {}
        for rule in [*child.get("x-kubernetes-validations", []),
                     *items.get("x-kubernetes-validations", [])]:  # fmt: skip
            bounds.append(rule["message"])
        default = ""
        if "default" in child and child["default"] != {}:
            default = (
                f"`{child['default']!r}`" if child["default"] == "" else f"`{child['default']}`"
            )
        yield (
            f"| `{field}` | {_type(child)} | {'yes' if name in required else ''} | {default} | "
            f"{_cell(child.get('description', ''))} | {_cell('; '.join(bounds))} |"
        )
        nested = child.get("items", child) if child.get("type") == "array" else child
        yield from _rows(nested, field + ("[]" if child.get("type") == "array" else ""),
                         set(nested.get("required", [])))  # fmt: skip


def render_reference() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the pydantic models by `make crds` (as are the CRDs in `crds/`); "
        "do not edit by hand. Group `gpuyard.io`, version `v1alpha1`.",
    ]
    for crd in build_crds():
        names = crd["spec"]["names"]
        version = crd["spec"]["versions"][0]
        schema = version["schema"]["openAPIV3Schema"]
        lines += [
            "",
            f"## {names['kind']}",
            "",
            f"Scope: {crd['spec']['scope']}; short names "
            f"`{', '.join(names.get('shortNames', []))}`; "
            f"category `{', '.join(names.get('categories', []))}`.",
        ]
        for part in ("spec", "status"):
            section = schema["properties"][part]
            lines += [
                "",
                f"### {names['kind']}.{part}",
                "",
                "| field | type | required | default | description | rules |",
                "|---|---|---|---|---|---|",
                *_rows(section, "", set(section.get("required", []))),
            ]
            lines += [f"| *(object rule)* | | | | | {_cell(rule['message'])} |"
                      for rule in section.get("x-kubernetes-validations", [])]  # fmt: skip
    return "\n".join(lines) + "\n"
