"""What a pod on a DRA pool holds and is billed for: its claims' allocated devices."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from gpuyard.logic.claimed_devices import (
    ClaimedDeviceError,
    HeldDevice,
    allocated_devices,
    device_uuid,
    devices_from_text,
    devices_to_text,
    pod_claim_names,
)
from gpuyard.logic.devices import device_from_dict
from gpuyard.logic.metering import (
    PoolPricing,
    PricePoint,
    cut_records,
    device_mean,
    pod_lifetime_from_dict,
    pool_holding,
    record_from_json,
    record_to_json,
)
from gpuyard.logic.promql import (
    GpuExporter,
    gpu_utilization_by_uuid_query,
    parse_uuid_matrix_response,
)
from gpuyard.logic.usage_report import summarize

CLASS = "gpu.nvidia.com"
H100 = PoolPricing(
    name="h100",
    gpu_type="h100-80gb",
    currency="USD",
    prices=(PricePoint(datetime(2020, 1, 1, tzinfo=UTC), Decimal("3.60")),),
    node_selector=(("gpuyard.io/pool", "h100"),),
    device_class=CLASS,
)
DEVICES = (
    HeldDevice("gpu.nvidia.com", "h100-0", "gpu-0", "GPU-aaaa"),
    HeldDevice("gpu.nvidia.com", "h100-0", "gpu-1", "GPU-bbbb"),
)


def claim(results: list[dict[str, Any]], requests: list[dict[str, Any]] | None = None) -> Any:
    return {
        "spec": {
            "devices": {
                "requests": requests
                or [
                    {"name": "gpus", "exactly": {"deviceClassName": CLASS}},
                    {"name": "nic", "exactly": {"deviceClassName": "nic.example.com"}},
                ]
            }
        },
        "status": {"allocation": {"devices": {"results": results}}},
    }


def result(request: str, device: str, **extra: Any) -> dict[str, Any]:
    return {
        "request": request,
        "driver": "gpu.nvidia.com",
        "pool": "h100-0",
        "device": device,
        **extra,
    }


def test_only_the_pools_class_counts_and_admin_access_never_does() -> None:
    allocated = claim(
        [
            result("gpus", "gpu-0"),
            result("nic", "nic-0"),
            result("gpus", "gpu-1", adminAccess=True),
        ]
    )
    uuids = {"gpu-0": "GPU-aaaa"}
    devices = allocated_devices(
        allocated, CLASS, lambda _driver, _pool, device: uuids.get(device, "")
    )
    assert devices == [HeldDevice("gpu.nvidia.com", "h100-0", "gpu-0", "GPU-aaaa")]


def test_first_available_alternatives_are_matched_by_their_sub_request() -> None:
    requests = [
        {
            "name": "gpus",
            "firstAvailable": [
                {"name": "big", "deviceClassName": CLASS},
                {"name": "small", "deviceClassName": "mig.nvidia.com"},
            ],
        }
    ]
    assert len(allocated_devices(claim([result("gpus/big", "gpu-0")], requests), CLASS)) == 1
    assert allocated_devices(claim([result("gpus/small", "mig-0")], requests), CLASS) == []


def test_an_unallocated_claim_holds_nothing() -> None:
    assert allocated_devices({"spec": {}, "status": {}}, CLASS) == []


def test_a_pods_claims_come_from_its_spec_its_templates_and_its_extended_resources() -> None:
    pod = {
        "spec": {
            "resourceClaims": [
                {"name": "shared", "resourceClaimName": "team-gpus"},
                {"name": "gpus"},
            ]
        },
        "status": {
            "resourceClaimStatuses": [{"name": "gpus", "resourceClaimName": "llama-0-gpus-x7"}],
            "extendedResourceClaimStatus": {"resourceClaimName": "llama-0-extended-resources-q2"},
        },
    }
    assert pod_claim_names(pod) == ["team-gpus", "llama-0-gpus-x7", "llama-0-extended-resources-q2"]


def test_the_uuid_attribute_is_read_from_the_published_device() -> None:
    published = device_from_dict(
        {"name": "gpu-0", "attributes": {"uuid": {"string": "GPU-1"}, "index": {"int": 0}}},
        "gpu.nvidia.com",
    )
    assert published is not None
    assert device_uuid(published) == "GPU-1"
    bare = device_from_dict({"name": "gpu-1", "attributes": {"uuid": {"int": 3}}}, "gpu.nvidia.com")
    assert bare is not None
    assert device_uuid(bare) == ""


def test_devices_round_trip_as_text_and_refuse_junk() -> None:
    assert devices_from_text(devices_to_text(reversed(DEVICES))) == DEVICES
    for junk in ("{", "{}", '[{"driver": ""}]', '[{"driver": "d", "pool": "p", "device": 3}]'):
        with pytest.raises(ClaimedDeviceError):
            devices_from_text(junk)


def dra_pod(limits: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "llama-0", "namespace": "team-a", "uid": "u-1"},
        "spec": {"nodeName": "h100-0", "containers": [{"resources": {"limits": limits or {}}}]},
        "status": {
            "phase": "Running",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "True",
                    "lastTransitionTime": "2024-05-01T12:00:00Z",
                }
            ],
        },
    }


def test_a_dra_pods_gpus_are_its_devices_counted_once_whatever_its_limits_say() -> None:
    # ExtendedResource: the limit names the same GPUs the scheduler's claim holds.
    pod = dra_pod({"nvidia.com/gpu": "2"})
    labels = {"gpuyard.io/pool": "h100"}
    assert pool_holding(labels, pod["spec"], [H100], devices={CLASS: DEVICES}) == (H100, 2)
    assert pool_holding(labels, pod["spec"], [H100], devices={}) is None
    life = pod_lifetime_from_dict(pod, H100, service="llama", cluster_id="c", devices=DEVICES)
    assert life is not None
    assert (life.gpus, life.devices) == (2, DEVICES)
    # No device seen yet (the claim is not in the cache): not billed yet, nor guessed.
    assert pod_lifetime_from_dict(pod, H100, service="llama", cluster_id="c") is None


def test_records_carry_the_devices_and_old_records_read_without_them() -> None:
    life = pod_lifetime_from_dict(dra_pod(), H100, service="llama", cluster_id="c", devices=DEVICES)
    assert life is not None
    [record] = cut_records(life, None, datetime(2024, 5, 1, 12, 1, tzinfo=UTC))
    assert (record.devices, record.gpu_seconds) == (DEVICES, 120)
    data = record_to_json(record)
    assert data["devices"][0] == {
        "driver": "gpu.nvidia.com",
        "pool": "h100-0",
        "device": "gpu-0",
        "uuid": "GPU-aaaa",
    }
    assert record_from_json(data) == record
    old = {key: value for key, value in data.items() if key != "devices"}
    assert record_from_json(old).devices == ()


def test_utilisation_of_dra_devices_is_their_uuids_mean_and_needs_every_one() -> None:
    readings = {"GPU-aaaa": {60: 80.0}, "GPU-bbbb": {60: 40.0}, "GPU-other": {60: 100.0}}
    assert device_mean(readings, ["GPU-aaaa", "GPU-bbbb"], 60) == 60.0
    assert device_mean(readings, ["GPU-aaaa", "GPU-cccc"], 60) is None
    assert device_mean(readings, [], 60) is None


def test_the_uuid_query_needs_an_identified_exporter_and_names_no_device() -> None:
    # Any target can publish a UUID label: without the exporter's matchers a tenant could
    # pass another team's GPU off with numbers of its choosing.
    assert gpu_utilization_by_uuid_query(exporter=GpuExporter()) is None
    query = gpu_utilization_by_uuid_query(
        window_seconds=60, exporter=GpuExporter.parse('job="dcgm-exporter"')
    )
    assert query == 'avg by (UUID) (avg_over_time(DCGM_FI_DEV_GPU_UTIL{job="dcgm-exporter"}[60s]))'
    body = {
        "status": "success",
        "data": {
            "resultType": "matrix",
            "result": [
                {"metric": {"UUID": "GPU-aaaa"}, "values": [[60, "75"]]},
                {"metric": {}, "values": [[60, "1"]]},
            ],
        },
    }
    assert parse_uuid_matrix_response(body) == {"GPU-aaaa": {60: 75.0}}


def test_a_report_groups_by_the_devices_behind_the_gpus() -> None:
    life = pod_lifetime_from_dict(dra_pod(), H100, service="llama", cluster_id="c", devices=DEVICES)
    assert life is not None
    records = cut_records(life, None, datetime(2024, 5, 1, 12, 2, tzinfo=UTC))
    plugin = [replace(r, devices=(), pod_uid="p") for r in records]
    [dra_row, plugin_row] = sorted(
        summarize(records + plugin, ("devices",)).rows, key=lambda row: row.group, reverse=True
    )
    assert dra_row.group == ("GPU-aaaa,GPU-bbbb",)
    assert plugin_row.group == ("",)
    assert dra_row.gpu_seconds == 240
