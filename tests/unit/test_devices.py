"""The pool's device selector: the Python matcher and the generated CEL on one table, and the
reading of DeviceClass selectors."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from device_selector_table import SELECTOR_TABLE
from gpuyard.api.pool import DevicePool, DeviceSelector
from gpuyard.logic.devices import (
    Device,
    class_selection,
    device_from_dict,
    device_matches,
    device_selector_cel,
)

DRIVER = "gpu.nvidia.com"

H100 = device_from_dict(
    {
        "name": "gpu-0",
        "attributes": {
            "type": {"string": "gpu"},
            "productName": {"string": "NVIDIA H100 80GB HBM3"},
            "index": {"int": 0},
            "driverVersion": {"version": "550.54.15"},
            "resource.kubernetes.io/pcieRoot": {"string": "pci0000:00"},
        },
        "capacity": {"memory": {"value": "80Gi"}},
    },
    DRIVER,
)


def pool(**selector: Any) -> DevicePool:
    return DevicePool.model_validate(
        {"deviceClassName": DRIVER, "selector": selector}
        if selector
        else {"deviceClassName": DRIVER}
    )


@pytest.mark.parametrize(("selector", "expected"), SELECTOR_TABLE)
def test_the_matcher_follows_the_table(selector: dict[str, Any], expected: bool) -> None:
    assert H100 is not None
    assert device_matches(H100, pool(**selector).selector) is expected


def test_no_selector_matches_everything_and_has_no_cel() -> None:
    assert H100 is not None
    assert device_matches(H100, None)
    assert device_selector_cel(pool()) is None
    assert device_selector_cel(None) is None


def test_cel_reads_short_names_in_the_device_driver_domain() -> None:
    cel = device_selector_cel(pool(attributes={"productName": "X"}, minCapacity={"memory": "1Gi"}))
    assert cel == (
        '("productName" in device.attributes[device.driver] && '
        'device.attributes[device.driver]["productName"] == "X") && '
        '("memory" in device.capacity[device.driver] && '
        'device.capacity[device.driver]["memory"].compareTo(quantity("1Gi")) >= 0)'
    )


def test_cel_escapes_quotes_and_backslashes() -> None:
    cel = device_selector_cel(pool(attributes={"productName": 'a"b\\c'}))
    assert cel is not None
    assert '== "a\\"b\\\\c")' in cel


def test_values_outside_printable_ascii_are_refused() -> None:
    with pytest.raises(ValueError, match="pattern"):
        DeviceSelector.model_validate({"attributes": {"productName": "a\nb"}})


def test_a_selector_with_extended_resource_is_refused() -> None:
    with pytest.raises(ValueError, match="ClaimTemplate"):
        DevicePool.model_validate(
            {
                "deviceClassName": DRIVER,
                "request": "ExtendedResource",
                "selector": {"attributes": {"productName": "X"}},
            }
        )


def test_slice_devices_keep_typed_attributes_and_capacity() -> None:
    assert (
        Device(
            name="gpu-0",
            driver=DRIVER,
            attributes={
                "gpu.nvidia.com/type": "gpu",
                "gpu.nvidia.com/productName": "NVIDIA H100 80GB HBM3",
                "gpu.nvidia.com/index": 0,
                "gpu.nvidia.com/driverVersion": ("version", "550.54.15"),
                "resource.kubernetes.io/pcieRoot": "pci0000:00",
            },
            capacity={"gpu.nvidia.com/memory": Decimal(80 * 2**30)},
        )
        == H100
    )


def device_class(*expressions: str, extended: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"selectors": [{"cel": {"expression": e}} for e in expressions]}
    if extended:
        spec["extendedResourceName"] = extended
    return {"metadata": {"name": DRIVER}, "spec": spec}


def test_a_conjunction_inside_a_literal_is_part_of_the_literal() -> None:
    assert class_selection(device_class("device.driver == 'a && b'")).driver == "a && b"


def test_the_driver_and_nvidia_class_forms_are_read() -> None:
    plain = class_selection(
        device_class('device.driver == "gpu.nvidia.com"', extended="nvidia.com/gpu")
    )
    assert plain.driver == DRIVER
    assert plain.unsupported_expression is None
    assert plain.extended_resource_name == "nvidia.com/gpu"
    nvidia = class_selection(
        device_class(
            "device.driver == 'gpu.nvidia.com' && device.attributes['gpu.nvidia.com'].type == 'gpu'"
        )
    )
    assert nvidia.attributes == {"gpu.nvidia.com/type": "gpu"}
    assert H100 is not None
    assert nvidia.selects(H100)
    other = Device(name="x", driver="other.example.com", attributes={}, capacity={})
    assert not nvidia.selects(other)


@pytest.mark.parametrize(
    "expression",
    [
        "device.driver == 'a' || device.driver == 'b'",
        "device.capacity['gpu.nvidia.com'].memory.compareTo(quantity('1Gi')) >= 0",
        "device.attributes['gpu.nvidia.com'].productName.startsWith('NVIDIA')",
        "device.driver == 'gpu.nvidia.com' && !device.attributes['x'].y == 'z'",
        "device.driver != 'gpu.nvidia.com'",
    ],
)
def test_other_class_expressions_are_reported_not_guessed(expression: str) -> None:
    selection = class_selection(device_class(expression))
    assert selection.unsupported_expression == expression
    assert H100 is not None
    assert not selection.selects(H100)
