"""Pool device selectors and whether each takes an H100 as NVIDIA's DRA driver publishes it:
one table for the Python matcher (tests/unit/test_devices.py) and for the CEL the real
scheduler evaluates (tests/integration/test_dra_pools.py)."""

from __future__ import annotations

from typing import Any

#: (selector, matches the H100 of the unit tests).
SELECTOR_TABLE: list[tuple[dict[str, Any], bool]] = [
    ({"attributes": {"productName": "NVIDIA H100 80GB HBM3"}}, True),
    ({"attributes": {"productName": "NVIDIA A100"}}, False),
    ({"attributes": {"gpu.nvidia.com/productName": "NVIDIA H100 80GB HBM3"}}, True),
    ({"attributes": {"resource.kubernetes.io/pcieRoot": "pci0000:00"}}, True),
    ({"attributes": {"missing": "x"}}, False),
    # An int attribute never equals a string, in CEL as here.
    ({"attributes": {"index": "0"}}, False),
    ({"minCapacity": {"memory": "40Gi"}}, True),
    ({"minCapacity": {"memory": "80Gi"}}, True),
    ({"minCapacity": {"memory": "81Gi"}}, False),
    ({"minCapacity": {"cores": "1"}}, False),
    ({"attributes": {"productName": 'say "hi" \\ bye'}}, False),
]
