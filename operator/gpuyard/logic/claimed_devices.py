"""Which DRA devices a pod holds, read from its ResourceClaims: what the meter bills.

A pod on a DRA pool asks for no extended resource (ClaimTemplate), or asks for one that the
scheduler serves through a claim it makes for the pod (ExtendedResource). Either way the
truth of what the pod holds is the allocation of its claims, written by the scheduler
before it binds the pod: each result names a device by driver, pool and device name
(resource.k8s.io/v1 `DeviceRequestAllocationResult`). The pod's GPUs on a pool are the
results whose request asked for the pool's DeviceClass, so a claim that also holds a NIC of
another class bills only its GPUs, and a pod that also asks `nvidia.com/gpu: N` in its limits
(ExtendedResource) counts its N devices once.

Results with `adminAccess` are left out: admin access (monitoring, health checks) reaches
devices that others hold and allocates nothing, so billing it would bill those GPUs twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gpuyard.logic.devices import Device


class ClaimedDeviceError(ValueError):
    """A device list that cannot be read back (a hand-edited annotation, a bad record)."""


@dataclass(frozen=True, slots=True, order=True)
class HeldDevice:
    """One allocated device: its name in the ResourceSlices, and the GPU's UUID when the
    driver publishes one (NVIDIA's driver has a `uuid` attribute; DCGM labels series with
    it, which is how utilisation is joined to the device)."""

    driver: str
    pool: str
    device: str
    uuid: str = ""

    def to_json(self) -> dict[str, str]:
        data = {"driver": self.driver, "pool": self.pool, "device": self.device}
        if self.uuid:
            data["uuid"] = self.uuid
        return data

    @classmethod
    def from_json(cls, data: Any) -> HeldDevice:
        if not isinstance(data, Mapping):
            raise ClaimedDeviceError(f"a device must be a JSON object, got {data!r}")
        fields = {}
        for name in ("driver", "pool", "device", "uuid"):
            value = data.get(name, "")
            if not isinstance(value, str) or (name != "uuid" and not value):
                raise ClaimedDeviceError(f"device field {name!r} must be a string, got {value!r}")
            fields[name] = value
        return cls(**fields)


def nested(mapping: Any, *path: str) -> Any:
    """The value at `path` in nested mappings, or None where any step is missing (API
    objects read as JSON: a field may be absent at any depth)."""
    current = mapping
    for key in path:
        if not isinstance(current, Mapping):
            return None
        current = current.get(key)
    return current


def pod_claim_names(pod: Mapping[str, Any]) -> list[str]:
    """The ResourceClaims a pod uses, in a fixed order: those it names itself
    (`spec.resourceClaims[].resourceClaimName`), those made from its templates
    (`status.resourceClaimStatuses`), and the one the scheduler made for its extended
    resources (`status.extendedResourceClaimStatus`)."""
    names: list[str] = []
    for entry in nested(pod, "spec", "resourceClaims") or ():
        names.append(nested(entry, "resourceClaimName") or "")
    for entry in nested(pod, "status", "resourceClaimStatuses") or ():
        names.append(nested(entry, "resourceClaimName") or "")
    names.append(nested(pod, "status", "extendedResourceClaimStatus", "resourceClaimName") or "")
    unique: list[str] = []
    for name in names:
        if name and name not in unique:
            unique.append(name)
    return unique


def _request_classes(claim: Mapping[str, Any]) -> dict[str, str]:
    """The DeviceClass of each request of a claim, by the name its results carry: `name`
    for a request with `exactly`, `name/sub` for each alternative of `firstAvailable`."""
    classes: dict[str, str] = {}
    for request in nested(claim, "spec", "devices", "requests") or ():
        name = str(nested(request, "name") or "")
        exactly = nested(request, "exactly")
        if isinstance(exactly, Mapping):
            classes[name] = str(exactly.get("deviceClassName") or "")
        for sub in nested(request, "firstAvailable") or ():
            classes[f"{name}/{nested(sub, 'name')}"] = str(nested(sub, "deviceClassName") or "")
    return classes


def allocated_devices(
    claim: Mapping[str, Any],
    device_class: str,
    uuid_of: Callable[[str, str, str], str] | None = None,
) -> list[HeldDevice]:
    """The devices of `device_class` allocated to `claim`; `uuid_of(driver, pool, device)`
    gives each one's UUID (or "") from the ResourceSlices."""
    classes = _request_classes(claim)
    devices: list[HeldDevice] = []
    for result in nested(claim, "status", "allocation", "devices", "results") or ():
        if nested(result, "adminAccess") is True:
            continue
        if classes.get(str(nested(result, "request") or "")) != device_class:
            continue
        driver, pool, device = (
            str(nested(result, key) or "") for key in ("driver", "pool", "device")
        )
        if not (driver and pool and device):
            continue
        uuid = uuid_of(driver, pool, device) if uuid_of is not None else ""
        devices.append(HeldDevice(driver, pool, device, uuid or ""))
    return devices


def device_uuid(device: Device) -> str:
    """A published device's `uuid` string attribute ("" without one). The slice index keeps
    attribute names qualified by the driver's domain, as DRA reads a short name."""
    value = device.attributes.get(f"{device.driver}/uuid")
    return value if isinstance(value, str) else ""


def devices_to_text(devices: Iterable[HeldDevice]) -> str:
    """Devices as compact JSON (an annotation value, a ledger column)."""
    return json.dumps([d.to_json() for d in sorted(devices)], separators=(",", ":"))


def devices_from_text(text: str) -> tuple[HeldDevice, ...]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ClaimedDeviceError(f"a device list must be JSON: {error}") from error
    if not isinstance(data, list):
        raise ClaimedDeviceError("a device list must be a JSON array")
    return tuple(sorted(HeldDevice.from_json(item) for item in data))
