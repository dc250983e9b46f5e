"""Which DRA devices a GPUPool offers: the pool's device selector, both as a Python matcher
and as the CEL the scheduler evaluates, and the DeviceClass selectors the operator can read.

A device (resource.k8s.io/v1, an entry of a ResourceSlice's spec.devices) carries typed
attributes and capacities, each named by a short C identifier in the driver's own domain or
by a `domain/name` qualified name. The scheduler evaluates CEL over them; the operator
cannot evaluate arbitrary CEL, so it counts devices with a Python matcher that must agree
with the CEL it generates (the unit tests run both on one table; an integration test lets
the real scheduler allocate through the generated CEL).

A DeviceClass's own selectors are CEL written by whoever installed the driver. The operator
reads one form only, the one NVIDIA's driver and the local cluster install: a conjunction
of `device.driver == "<driver>"` and `device.attributes["<domain>"].<name> == "<value>"`
clauses. Any other expression is reported, never guessed at.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Protocol

from gpuyard.api.formats import parse_quantity
from gpuyard.api.names import SERVICE_LABEL
from gpuyard.api.pool import DevicePool, DeviceSelector

#: An attribute value as the operator keeps it: the one typed member of the API's
#: DeviceAttribute (string, int, bool or version; a version is kept as its text, tagged so
#: that it never equals a string).
AttributeValue = str | int | bool | tuple[str, str]


@dataclass(frozen=True)
class Device:
    """One device of a ResourceSlice, with names qualified by domain."""

    name: str
    driver: str
    attributes: Mapping[str, AttributeValue]
    capacity: Mapping[str, Decimal]


def qualified_name(name: str, driver: str) -> str:
    """`name` with the driver's domain when it has none, as DRA reads short names."""
    return name if "/" in name else f"{driver}/{name}"


def _attribute_value(value: object) -> AttributeValue | None:
    if not isinstance(value, Mapping):
        return None
    for kind in ("string", "int", "bool"):
        member = value.get(kind)
        if member is not None:
            return member if isinstance(member, str | int | bool) else None
    version = value.get("version")
    return ("version", version) if isinstance(version, str) else None


def device_from_dict(obj: Mapping[str, Any], driver: str) -> Device | None:
    """The device entry of a ResourceSlice, or None when it has no name."""
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    attributes: dict[str, AttributeValue] = {}
    raw_attributes = obj.get("attributes")
    for key, raw in (raw_attributes if isinstance(raw_attributes, Mapping) else {}).items():
        value = _attribute_value(raw)
        if value is not None:
            attributes[qualified_name(str(key), driver)] = value
    capacity: dict[str, Decimal] = {}
    raw_capacity = obj.get("capacity")
    for key, raw in (raw_capacity if isinstance(raw_capacity, Mapping) else {}).items():
        amount = parse_quantity(raw.get("value") if isinstance(raw, Mapping) else None)
        if amount is not None:
            capacity[qualified_name(str(key), driver)] = amount
    return Device(name=name, driver=driver, attributes=attributes, capacity=capacity)


#: A device's identity across the cluster: (driver, pool, device), as claims name it.
DeviceKey = tuple[str, str, str]


@dataclass(frozen=True)
class SliceInfo:
    """What accounting keeps of a ResourceSlice: its node, pool generation and devices."""

    node_name: str
    driver: str
    pool: str
    generation: int
    devices: tuple[Device, ...]


def slice_info_from_dict(obj: Mapping[str, Any]) -> SliceInfo | None:
    """The node-local devices of a ResourceSlice; None for a slice of no single node (a
    network-attached pool), which no GPUPool's node can own."""
    spec = obj.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}
    node, driver = spec.get("nodeName"), spec.get("driver")
    pool = spec.get("pool")
    pool = pool if isinstance(pool, Mapping) else {}
    if not isinstance(node, str) or not node or not isinstance(driver, str):
        return None
    generation = pool.get("generation")
    raw_devices = spec.get("devices")
    devices = tuple(
        device
        for raw in (raw_devices if isinstance(raw_devices, Sequence) else [])
        if isinstance(raw, Mapping) and (device := device_from_dict(raw, driver)) is not None
    )
    return SliceInfo(
        node_name=node,
        driver=driver,
        pool=str(pool.get("name", "")),
        generation=generation if isinstance(generation, int) else 0,
        devices=devices,
    )


@dataclass(frozen=True)
class ClaimHolder:
    """The claim an allocated device belongs to: its namespace and, for a claim made from
    an AIService's template, the service (the `gpuyard.io/service` label)."""

    namespace: str
    claim: str
    service: str | None = None


def claim_allocations_from_dict(obj: Mapping[str, Any]) -> dict[DeviceKey, ClaimHolder]:
    """Every device a ResourceClaim's status.allocation holds, with the claim holding it."""
    metadata = obj.get("metadata")
    metadata = metadata if isinstance(metadata, Mapping) else {}
    labels = metadata.get("labels")
    service = labels.get(SERVICE_LABEL) if isinstance(labels, Mapping) else None
    holder = ClaimHolder(
        namespace=str(metadata.get("namespace", "")),
        claim=str(metadata.get("name", "")),
        service=service if isinstance(service, str) else None,
    )
    status = obj.get("status")
    allocation = status.get("allocation") if isinstance(status, Mapping) else None
    devices = allocation.get("devices") if isinstance(allocation, Mapping) else None
    results = devices.get("results") if isinstance(devices, Mapping) else None
    held: dict[DeviceKey, ClaimHolder] = {}
    for result in results if isinstance(results, Sequence) else []:
        if not isinstance(result, Mapping):
            continue
        key = (result.get("driver"), result.get("pool"), result.get("device"))
        if all(isinstance(part, str) for part in key):
            held[(str(key[0]), str(key[1]), str(key[2]))] = holder
    return held


class DeviceInventory(Protocol):
    """The DRA objects accounting reads, as the operator's caches hold them."""

    def slices_on(self, node: str) -> Iterable[SliceInfo]:
        """Every ResourceSlice published for `node`."""
        ...

    def holder(self, device: DeviceKey) -> ClaimHolder | None:
        """The claim `device` is allocated to, if any."""
        ...

    def device_class(self, name: str) -> ClassSelection | None:
        """The DeviceClass `name` as read, or None when it does not exist."""
        ...


def current_devices(slices: Iterable[SliceInfo]) -> list[tuple[DeviceKey, Device]]:
    """The devices of the slices, each pool at its newest generation only: while a driver
    rewrites a pool, slices of the old generation are stale (resource.k8s.io/v1
    ResourceSlice: consumers must ignore all but the highest generation)."""
    slices = list(slices)
    newest: dict[tuple[str, str], int] = {}
    for item in slices:
        pool = (item.driver, item.pool)
        newest[pool] = max(newest.get(pool, item.generation), item.generation)
    return [
        ((item.driver, item.pool, device.name), device)
        for item in slices
        if item.generation == newest[(item.driver, item.pool)]
        for device in item.devices
    ]


# --- The pool's selector ---------------------------------------------------------------------


def device_matches(device: Device, selector: DeviceSelector | None) -> bool:
    """Whether the pool's selector takes `device`: what the CEL of `device_selector_cel`
    decides for it. A missing attribute or capacity, or one of another type, does not match."""
    if selector is None:
        return True
    for key, wanted in (selector.attributes or {}).items():
        value = device.attributes.get(qualified_name(key, device.driver))
        # bool is an int in Python; CEL keeps them apart, and a string never equals either.
        if not isinstance(value, str) or value != wanted:
            return False
    for key, least in (selector.min_capacity or {}).items():
        amount = device.capacity.get(qualified_name(key, device.driver))
        minimum = parse_quantity(least)
        if amount is None or minimum is None or amount < minimum:
            return False
    return True


def _cel_string(text: str) -> str:
    # The API admits printable ASCII only (DEVICE_ATTRIBUTE_VALUE_PATTERN), so the quote and
    # the backslash are the only characters with a meaning inside a double-quoted literal.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _lookup(collection: str, key: str) -> tuple[str, str]:
    """The CEL map holding `key` and the key's identifier inside it. A short name is read in
    the device's own driver domain, exactly as `qualified_name` does."""
    if "/" in key:
        domain, identifier = key.rsplit("/", 1)
        return f"device.{collection}[{_cel_string(domain)}]", identifier
    return f"device.{collection}[device.driver]", key


def device_selector_cel(pool_devices: DevicePool | None) -> str | None:
    """The CEL expression of the pool's device selector for a ResourceClaim request's
    `selectors: [{cel: {expression: ...}}]`, or None when the pool narrows nothing.

    Each clause first checks that the device has the attribute or capacity (`in` on the
    domain's map): reading a missing one is an evaluation error that aborts allocation,
    where the operator's count simply skips the device. Identifiers are looked up as map
    keys, never as fields, so a name such as `in` or `if` (reserved words in CEL) stays safe.
    """
    selector = pool_devices.selector if pool_devices is not None else None
    if selector is None:
        return None
    clauses: list[str] = []
    for key, wanted in sorted((selector.attributes or {}).items()):
        domain_map, identifier = _lookup("attributes", key)
        name = _cel_string(identifier)
        clauses.append(f"({name} in {domain_map} && {domain_map}[{name}] == {_cel_string(wanted)})")
    for key, least in sorted((selector.min_capacity or {}).items()):
        domain_map, identifier = _lookup("capacity", key)
        name = _cel_string(identifier)
        clauses.append(
            f"({name} in {domain_map} && "
            f"{domain_map}[{name}].compareTo(quantity({_cel_string(least)})) >= 0)"
        )
    return " && ".join(clauses) if clauses else None


# --- The DeviceClass -------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassSelection:
    """What a DeviceClass selects, as far as the operator can read it."""

    driver: str | None
    """The driver every selected device has; None when the class names none."""
    attributes: Mapping[str, str]
    """Qualified attribute names and the string values the class requires."""
    extended_resource_name: str | None
    """The extended resource the scheduler serves from the class (KEP-5004)."""
    unsupported_expression: str | None = None
    """The first selector expression the operator cannot read; when set, nothing else
    here may be trusted."""

    def selects(self, device: Device) -> bool:
        """Whether the class takes `device` (never, when a selector could not be read)."""
        if self.unsupported_expression is not None:
            return False
        if self.driver is not None and device.driver != self.driver:
            return False
        return all(
            device.attributes.get(key) == value and isinstance(device.attributes.get(key), str)
            for key, value in self.attributes.items()
        )


_STRING = r"""(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)')"""
_DRIVER_CLAUSE = re.compile(rf"^device[.]driver\s*==\s*{_STRING}$")
_ATTRIBUTE_CLAUSE = re.compile(
    rf"^device[.]attributes\[\s*{_STRING}\s*\][.]([A-Za-z_][A-Za-z0-9_]*)\s*==\s*{_STRING}$"
)
_UNESCAPE = re.compile(r"\\(.)")


def _literal(double: str | None, single: str | None) -> str:
    text = double if double is not None else single or ""
    return _UNESCAPE.sub(r"\1", text)


def _split_conjunction(expression: str) -> list[str] | None:
    """The clauses of `a && b && c`, split outside string literals; None when, outside
    literals, the expression has parentheses, `||` or `!` (forms the reader does not follow)."""
    clauses: list[str] = []
    start, quote, index = 0, "", 0
    while index < len(expression):
        char = expression[index]
        if quote:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char in "()|" or (char == "!" and expression[index : index + 2] != "!="):
            return None
        elif expression.startswith("&&", index):
            clauses.append(expression[start:index].strip())
            start = index + 2
            index += 1
        index += 1
    clauses.append(expression[start:].strip())
    return clauses


def class_selection(device_class: Mapping[str, Any]) -> ClassSelection:
    """Read a DeviceClass object (its spec.selectors[].cel and spec.extendedResourceName)."""
    spec = device_class.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}
    extended = spec.get("extendedResourceName")
    extended_name = extended if isinstance(extended, str) and extended else None
    unsupported = ClassSelection(
        driver=None,
        attributes={},
        extended_resource_name=extended_name,
        unsupported_expression="",
    )
    driver: str | None = None
    attributes: dict[str, str] = {}
    selectors = spec.get("selectors")
    for selector in selectors if isinstance(selectors, Sequence) else []:
        cel = selector.get("cel") if isinstance(selector, Mapping) else None
        expression = cel.get("expression") if isinstance(cel, Mapping) else None
        if not isinstance(expression, str):
            continue
        clauses = _split_conjunction(expression.strip())
        if clauses is None:
            return replace(unsupported, unsupported_expression=expression)
        for clause in clauses:
            driver_match = _DRIVER_CLAUSE.match(clause)
            attribute_match = _ATTRIBUTE_CLAUSE.match(clause)
            if driver_match and driver in (None, _literal(*driver_match.groups())):
                driver = _literal(*driver_match.groups())
            elif attribute_match:
                domain = _literal(attribute_match.group(1), attribute_match.group(2))
                attributes[f"{domain}/{attribute_match.group(3)}"] = _literal(
                    attribute_match.group(4), attribute_match.group(5)
                )
            else:
                return replace(unsupported, unsupported_expression=expression)
    return ClassSelection(
        driver=driver, attributes=attributes, extended_resource_name=extended_name
    )
