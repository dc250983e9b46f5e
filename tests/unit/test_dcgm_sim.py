"""The DCGM exporter simulator's pure parts, its load API and its HTTP server, no cluster."""

from __future__ import annotations

import argparse
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from localcluster import dcgm_sim
from localcluster.dcgm_sim import (
    GPU_MODELS,
    LoadTable,
    RenderOptions,
    SimulatorState,
    Slot,
    WatchExpired,
    assign_gpus,
    fake_gpu_nodes,
    follow_watch,
    gpu_pods,
    gpu_uuid,
    handle_load_api,
    parse_listen,
    render_cluster,
)

DCGM_FIELDS = (
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
    "DCGM_FI_DEV_POWER_USAGE",
)
A100 = GPU_MODELS["a100-80gb"]
L4 = GPU_MODELS["l4"]


# --------------------------------------------------------------------------- builders


def node(name: str, gpu_type: str = "a100-80gb", *, kwok: bool = True) -> dict[str, Any]:
    labels = {"gpuyard.io/pool": gpu_type, "gpuyard.io/gpu-type": gpu_type}
    if kwok:
        labels["type"] = "kwok"
    return {
        "metadata": {"name": name, "uid": f"uid-node-{name}", "labels": labels},
        "status": {"capacity": {"nvidia.com/gpu": "8"}},
    }


def pod(
    name: str,
    node_name: str = "gpu-a",
    gpus: int = 1,
    *,
    namespace: str = "team",
    service: str | None = "chat",
    labels: Mapping[str, str] | None = None,
    phase: str = "Running",
    resource: str = "nvidia.com/gpu",
    created: str = "2025-01-01T00:00:00Z",
    container: str = "server",
) -> dict[str, Any]:
    all_labels = dict(labels or {})
    if service is not None:
        all_labels["gpuyard.io/service"] = service
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{namespace}-{name}",
            "labels": all_labels,
            "creationTimestamp": created,
        },
        "spec": {
            "nodeName": node_name,
            "containers": [
                {"name": container, "resources": {"limits": {resource: str(gpus), "cpu": "1"}}},
                {"name": "sidecar", "resources": {}},
            ],
        },
        "status": {"phase": phase},
    }


Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str) -> Samples:
    """Family name -> [(labels, value)], checking that every family is a gauge."""
    families: Samples = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge", family.name
        families[family.name] = [(dict(s.labels), s.value) for s in family.samples]
    return families


def render(
    pods: list[dict[str, Any]],
    nodes: list[dict[str, Any]] | None = None,
    loads: Mapping[tuple[str, str], float] | None = None,
    previous: Mapping[str, Slot] | None = None,
    **options: Any,
) -> tuple[Samples, dict[str, Slot]]:
    text, allocation = render_cluster(
        pods,
        nodes if nodes is not None else [node("gpu-a"), node("gpu-l4", "l4")],
        loads or {},
        previous or {},
        options=RenderOptions(**options),
    )
    return parse(text), allocation


def by_pod(samples: Samples, field: str = "DCGM_FI_DEV_GPU_UTIL") -> dict[str, list[float]]:
    result: dict[str, list[float]] = {}
    for labels, value in samples[field]:
        result.setdefault(labels["pod"], []).append(value)
    return result


def gpu_indices(samples: Samples) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for labels, _ in samples["DCGM_FI_DEV_GPU_UTIL"]:
        result.setdefault(labels["pod"], []).append(labels["gpu"])
    return result


# --------------------------------------------------------------------------- exposition


def test_series_and_labels_match_dcgm_exporter() -> None:
    samples, _ = render([pod("chat-0", gpus=2)], loads={("team", "chat"): 100})

    assert set(samples) == {*DCGM_FIELDS, "gpuyard_sim_requests_in_flight"}
    for field in DCGM_FIELDS:
        assert len(samples[field]) == 2, field
    labels = [labels for labels, _ in samples["DCGM_FI_DEV_GPU_UTIL"]]
    assert labels[0] == {
        "gpu": "0",
        "UUID": gpu_uuid("gpu-a", 0),
        "pci_bus_id": "00000000:01:00.0",
        "device": "nvidia0",
        "modelName": "NVIDIA A100-SXM4-80GB",
        "Hostname": "gpu-a",
        "container": "server",
        "namespace": "team",
        "pod": "chat-0",
    }
    assert [(lb["gpu"], lb["device"]) for lb in labels] == [("0", "nvidia0"), ("1", "nvidia1")]


def test_help_text_is_dcgm_exporters() -> None:
    text, _ = render_cluster([], [], {}, {})
    assert "# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).\n" in text
    assert "# TYPE DCGM_FI_DEV_FB_USED gauge\n" in text


def test_uuid_is_stable_dcgm_shaped_and_unique() -> None:
    uuids = {gpu_uuid(n, i) for n in ("gpu-a", "gpu-b") for i in range(8)}
    assert len(uuids) == 16
    assert gpu_uuid("gpu-a", 3) == gpu_uuid("gpu-a", 3)
    assert all(u.startswith("GPU-") and len(u) == 40 for u in uuids)


@pytest.mark.parametrize(
    ("load", "gpus", "expected"),
    [
        (300, 4, 75.0),  # three GPUs of work spread over four
        (300, 2, 100.0),  # demand beyond capacity saturates, never above 100
        (100, 3, 100 / 3),
        (0, 2, 0.0),
        (None, 2, 0.0),  # no load set
    ],
)
def test_utilisation_is_load_shared_by_the_services_gpus(
    load: float | None, gpus: int, expected: float
) -> None:
    pods = [pod(f"chat-{i}", gpus=1) for i in range(gpus)]
    loads = {} if load is None else {("team", "chat"): load}
    samples, _ = render(pods, loads=loads)

    assert [v for _, v in samples["DCGM_FI_DEV_GPU_UTIL"]] == [round(expected)] * gpus
    for _, ratio in samples["DCGM_FI_PROF_GR_ENGINE_ACTIVE"]:
        assert ratio == pytest.approx(expected / 100, abs=1e-6)
    for _, watts in samples["DCGM_FI_DEV_POWER_USAGE"]:
        busy = expected / 100
        expected_watts = A100.idle_watts + (A100.max_watts - A100.idle_watts) * busy
        assert watts == pytest.approx(expected_watts, abs=1e-3)


def test_framebuffer_follows_utilisation_and_adds_up_to_the_model() -> None:
    loads = {("team", "idle"): 0, ("team", "busy"): 200}
    pods = [
        pod("idle-0", "gpu-l4", service="idle"),
        pod("busy-0", "gpu-l4", 2, service="busy"),
    ]
    samples, _ = render(pods, loads=loads)
    used = by_pod(samples, "DCGM_FI_DEV_FB_USED")
    free = by_pod(samples, "DCGM_FI_DEV_FB_FREE")

    assert used["idle-0"] == [round(L4.fb_total_mib * 0.10)]
    assert used["busy-0"] == [round(L4.fb_total_mib * 0.90)] * 2
    for name in used:
        assert [u + f for u, f in zip(used[name], free[name], strict=True)] == [23034] * len(
            used[name]
        )


def test_load_is_per_service_and_namespace() -> None:
    pods = [
        pod("chat-0", gpus=2),
        pod("chat-0", "gpu-l4", namespace="other"),  # same service name, other namespace
        pod("embed-0", service="embed"),
        pod("legacy-0", service=None, labels={"app": "legacy"}),
        pod("loner-0", service=None),
    ]
    loads = {("team", "chat"): 100, ("other", "chat"): 50, ("team", "legacy"): 30}
    samples, _ = render(pods, loads=loads)
    util = {(lb["namespace"], lb["pod"]): v for lb, v in samples["DCGM_FI_DEV_GPU_UTIL"]}

    assert util == {
        ("team", "chat-0"): 50,  # 100 over its 2 GPUs (one entry for both)
        ("other", "chat-0"): 50,
        ("team", "embed-0"): 0,
        ("team", "legacy-0"): 30,  # the `app` label names the service when gpuyard's is absent
        ("team", "loner-0"): 0,
    }


def test_gpuyard_service_label_wins_over_app() -> None:
    pods = [pod("x-0", service="chat", labels={"app": "other"})]
    samples, _ = render(pods, loads={("team", "chat"): 40, ("team", "other"): 90})
    assert by_pod(samples) == {"x-0": [40]}


@pytest.mark.parametrize(
    "excluded",
    [
        pod("pending", phase="Pending"),
        pod("done", phase="Succeeded"),
        pod("real-node", "worker-1"),  # a node that is not a fake GPU node
        pod("unscheduled", ""),
        pod("cpu-only", gpus=0),
        pod("other-vendor", resource="amd.com/gpu"),
    ],
    ids=lambda p: p["metadata"]["name"],
)
def test_only_running_pods_holding_nvidia_devices_on_fake_nodes_have_series(
    excluded: dict[str, Any],
) -> None:
    nodes = [node("gpu-a"), node("worker-1", kwok=False)]
    samples, _ = render([excluded, pod("chat-0")], nodes)
    assert by_pod(samples) == {"chat-0": [0]}


def test_series_vanish_when_the_pod_goes_away() -> None:
    loads = {("team", "chat"): 100}
    before, allocation = render([pod("chat-0"), pod("chat-1")], loads=loads)
    after, _ = render([pod("chat-1")], loads=loads, previous=allocation)

    assert set(by_pod(before)) == {"chat-0", "chat-1"}
    for field in DCGM_FIELDS:
        assert {lb["pod"] for lb, _ in after[field]} == {"chat-1"}, field
    assert by_pod(after) == {"chat-1": [100]}  # the survivor now carries the whole load


def test_requests_in_flight_exist_without_pods_and_go_with_the_load() -> None:
    loads = {("team", "chat"): 250, ("ml", "embed"): 0}
    samples, _ = render([], loads=loads)

    assert samples["gpuyard_sim_requests_in_flight"] == [
        ({"namespace": "ml", "service": "embed"}, 0.0),
        ({"namespace": "team", "service": "chat"}, 2.5),
    ]
    assert samples["DCGM_FI_DEV_GPU_UTIL"] == []
    empty, _ = render([])
    assert empty["gpuyard_sim_requests_in_flight"] == []


def test_exported_labels_reproduce_prometheus_renaming() -> None:
    samples, _ = render([pod("chat-0")], loads={("team", "chat"): 100}, exported_labels=True)
    labels = samples["DCGM_FI_DEV_GPU_UTIL"][0][0]

    assert labels["exported_pod"] == "chat-0"
    assert labels["exported_namespace"] == "team"
    assert labels["exported_container"] == "server"
    assert not {"pod", "namespace", "container"} & set(labels)
    assert samples["gpuyard_sim_requests_in_flight"][0][0] == {
        "exported_namespace": "team",
        "service": "chat",
    }


def test_mig_slices_are_devices_with_their_share_of_memory() -> None:
    mig = pod("mig-0", gpus=2, resource="nvidia.com/mig-1g.10gb")
    samples, _ = render([mig], loads={("team", "chat"): 100})
    labels = [lb for lb, _ in samples["DCGM_FI_PROF_GR_ENGINE_ACTIVE"]]

    assert [(lb["GPU_I_PROFILE"], lb["GPU_I_ID"]) for lb in labels] == [
        ("1g.10gb", "0"),
        ("1g.10gb", "1"),
    ]
    used = [v for _, v in samples["DCGM_FI_DEV_FB_USED"]]
    free = [v for _, v in samples["DCGM_FI_DEV_FB_FREE"]]
    assert [u + f for u, f in zip(used, free, strict=True)] == [10240, 10240]


def test_node_model_falls_back_to_product_and_memory_labels() -> None:
    custom = node("gpu-x", "unknown-type")
    custom["metadata"]["labels"] |= {
        "nvidia.com/gpu.product": "NVIDIA-B200",
        "nvidia.com/gpu.memory": "183359",
    }
    known = node("gpu-y", "unknown-type")
    known["metadata"]["labels"]["nvidia.com/gpu.product"] = "NVIDIA-L4"
    models = {n: f.model for n, f in fake_gpu_nodes([custom, known]).items()}

    assert models["gpu-x"].name == "NVIDIA-B200"
    assert models["gpu-x"].fb_total_mib == 183359
    assert models["gpu-y"] == L4


def test_container_label_names_the_container_holding_the_device() -> None:
    two = pod("multi-0", gpus=1)
    two["spec"]["containers"][1]["resources"] = {"limits": {"nvidia.com/gpu": "2"}}
    samples, _ = render([two])
    assert [(lb["gpu"], lb["container"]) for lb, _ in samples["DCGM_FI_DEV_GPU_UTIL"]] == [
        ("0", "server"),
        ("1", "sidecar"),
        ("2", "sidecar"),
    ]


def test_label_values_are_escaped() -> None:
    odd = pod("chat-0", container='we"ird\\name')
    samples, _ = render([odd])
    assert samples["DCGM_FI_DEV_GPU_UTIL"][0][0]["container"] == 'we"ird\\name'


def test_jitter_is_off_by_default_bounded_and_deterministic() -> None:
    pods = [pod(f"chat-{i}") for i in range(4)] + [pod("idle-0", service="idle")]
    loads = {("team", "chat"): 200}
    plain, _ = render(pods, loads=loads)
    assert set(by_pod(plain, "DCGM_FI_PROF_GR_ENGINE_ACTIVE")["chat-0"]) == {0.5}

    def jittered(now: float) -> list[float]:
        text, _ = render_cluster(
            pods, [node("gpu-a")], loads, {}, options=RenderOptions(jitter=5.0), now=now
        )
        ratios = by_pod(parse(text), "DCGM_FI_PROF_GR_ENGINE_ACTIVE")
        assert ratios["idle-0"] == [0.0]  # idle GPUs stay exactly idle
        return [v for name, (v,) in sorted(ratios.items()) if name != "idle-0"]

    first = jittered(1000.2)
    assert first == jittered(1000.7)  # same second, same values
    assert first != jittered(1001.2)
    assert all(0.45 <= v <= 0.55 for v in first)


# --------------------------------------------------------------------------- allocation


def test_indices_are_stable_and_freed_ones_are_reused() -> None:
    pods = [
        pod("a", gpus=2, created="2025-01-01T00:00:01Z"),
        pod("b", gpus=1, created="2025-01-01T00:00:02Z"),
        pod("c", gpus=2, created="2025-01-01T00:00:03Z"),
    ]
    first, allocation = render(pods)
    assert gpu_indices(first) == {"a": ["0", "1"], "b": ["2"], "c": ["3", "4"]}

    # `a` goes; `d` (1 GPU) and `e` (2 GPUs) arrive: they fill the lowest free indices
    # while `b` and `c` keep theirs, UUIDs included.
    later = [
        pods[1],
        pods[2],
        pod("d", gpus=1, created="2025-01-01T00:00:04Z"),
        pod("e", gpus=2, created="2025-01-01T00:00:05Z"),
    ]
    second, allocation = render(later, previous=allocation)
    assert gpu_indices(second) == {"b": ["2"], "c": ["3", "4"], "d": ["0"], "e": ["1", "5"]}
    uuids = {lb["pod"]: lb["UUID"] for lb, _ in second["DCGM_FI_DEV_GPU_UTIL"] if lb["gpu"] == "2"}
    assert uuids == {"b": gpu_uuid("gpu-a", 2)}

    # Order of the input does not move anyone.
    third, _ = render(list(reversed(later)), previous=allocation)
    assert gpu_indices(third) == gpu_indices(second)


def test_indices_are_per_node() -> None:
    samples, _ = render([pod("a", "gpu-a"), pod("b", "gpu-l4"), pod("c", "gpu-a")])
    placed = {lb["pod"]: (lb["Hostname"], lb["gpu"]) for lb, _ in samples["DCGM_FI_DEV_GPU_UTIL"]}
    assert placed == {"a": ("gpu-a", "0"), "b": ("gpu-l4", "0"), "c": ("gpu-a", "1")}


def test_a_recreated_pod_is_a_new_pod() -> None:
    old = pod("chat-0", gpus=1, created="2025-01-01T00:00:01Z")
    other = pod("other", gpus=1, created="2025-01-01T00:00:02Z")
    _, allocation = render([old, other])
    reborn = pod("chat-0", gpus=2, created="2025-01-01T00:00:09Z")
    reborn["metadata"]["uid"] = "uid-new"
    samples, _ = render([reborn, other], previous=allocation)
    assert gpu_indices(samples) == {"other": ["1"], "chat-0": ["0", "2"]}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 7), st.integers(1, 3), st.sampled_from("ab")),
        max_size=30,
    )
)
def test_allocation_never_shares_a_device_and_never_moves_a_pod(
    steps: list[tuple[bool, int, int, str]],
) -> None:
    live: dict[str, dict[str, Any]] = {}
    nodes = fake_gpu_nodes([node("a"), node("b")])
    allocation: dict[str, Slot] = {}
    for number, (add, which, gpus, node_name) in enumerate(steps):
        name = f"p{which}"
        if add and name not in live:
            created = f"2025-01-01T00:{number // 60:02d}:{number % 60:02d}Z"
            live[name] = pod(name, node_name, gpus, created=created)
        elif not add:
            live.pop(name, None)
        holders = gpu_pods(live.values(), nodes)
        new = assign_gpus(allocation, holders)

        for key, slot in allocation.items():
            if key in new:
                assert new[key] == slot  # a pod keeps what it holds
        for node_name_ in ("a", "b"):
            taken = [i for s in new.values() if s.node == node_name_ for i in s.indices]
            assert len(taken) == len(set(taken))  # no device is held twice
        assert {h.key: h.total for h in holders} == {k: len(s.indices) for k, s in new.items()}
        allocation = new


# --------------------------------------------------------------------------- load API


def call(
    method: str, path: str, body: object = None, table: LoadTable | None = None
) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    response = handle_load_api(method, path, raw, table if table is not None else LoadTable())
    return response.status, response.body


def test_load_api_round_trip() -> None:
    table = LoadTable()
    assert call("PUT", "/load/team/chat", {"load": 300}, table) == (
        200,
        {"namespace": "team", "service": "chat", "load": 300, "requestsInFlight": 3.0},
    )
    call("PUT", "/load/team/embed", {"load": 12.5}, table)
    assert call("GET", "/load/team/chat", table=table)[1]["load"] == 300
    status, listing = call("GET", "/load", table=table)
    assert status == 200
    assert [(e["service"], e["load"]) for e in listing["loads"]] == [("chat", 300), ("embed", 12.5)]

    assert call("DELETE", "/load/team/chat", table=table) == (204, None)
    assert call("DELETE", "/load/team/chat", table=table) == (204, None)  # idempotent
    assert call("GET", "/load/team/chat", table=table)[0] == 404
    assert table.snapshot() == {("team", "embed"): 12.5}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not JSON"),
        (b"", "not JSON"),
        ([300], "JSON object"),
        ({}, 'missing field "load"'),
        ({"load": 1, "extra": 2}, "unknown field(s) extra"),
        ({"load": "300"}, "must be a number"),
        ({"load": True}, "must be a number"),
        ({"load": None}, "must be a number"),
        ({"load": -1}, "between 0 and 1000000"),
        ({"load": 1e9}, "between 0 and 1000000"),
        (b'{"load": NaN}', "between 0 and 1000000"),
    ],
)
def test_bad_load_bodies_are_400_with_a_reason(body: object, message: str) -> None:
    table = LoadTable()
    status, error = call("PUT", "/load/team/chat", body, table)
    assert status == 400
    assert message in error["error"]
    assert table.snapshot() == {}


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("PUT", "/load/Team/chat", 400, "namespace 'Team' is not a DNS label"),
        ("PUT", "/load/team/-chat", 400, "service '-chat' is not a label value"),
        ("GET", "/load/team", 404, "no such path"),
        ("GET", "/elsewhere", 404, "no such path"),
        ("POST", "/load", 405, "use GET on /load"),
        ("POST", "/load/team/chat", 405, "use GET, PUT or DELETE"),
        ("GET", "/load/team/chat", 404, "no load set for team/chat"),
    ],
)
def test_load_api_errors(method: str, path: str, status: int, message: str) -> None:
    got_status, body = call(method, path, {"load": 1})
    assert got_status == status
    assert message in body["error"]


# --------------------------------------------------------------------------- state + HTTP


def test_state_follows_watch_events() -> None:
    state = SimulatorState()
    state.replace("nodes", [node("gpu-a")])
    state.replace("pods", [pod("chat-0")])
    state.loads.set(("team", "chat"), 200)
    assert by_pod(parse(state.render(0))) == {"chat-0": [100]}

    state.apply("pods", "ADDED", pod("chat-1"))
    assert by_pod(parse(state.render(0))) == {"chat-0": [100], "chat-1": [100]}
    state.apply("pods", "DELETED", pod("chat-0"))
    assert gpu_indices(parse(state.render(0))) == {"chat-1": ["1"]}  # it keeps index 1
    state.apply("nodes", "DELETED", node("gpu-a"))
    assert by_pod(parse(state.render(0))) == {}


class FakeResponse:
    """Enough of urllib3's streaming response for ``follow_watch``."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(e).encode() + b"\n" for e in events)
        # Chunks that split lines, as a real stream does.
        self.chunks = [data[i : i + 7] for i in range(0, len(data), 7)]
        self.closed = False

    def stream(self, *_: object, **__: object) -> Iterator[bytes]:
        yield from self.chunks

    def close(self) -> None:
        self.closed = True

    def release_conn(self) -> None:
        pass


def event(kind: str, obj: dict[str, Any], rv: str) -> dict[str, Any]:
    obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": rv}}
    return {"type": kind, "object": obj}


def test_follow_watch_applies_events_and_tracks_the_resource_version() -> None:
    state = SimulatorState()
    state.replace("nodes", [node("gpu-a")])
    state.replace("pods", [])
    response = FakeResponse(
        [
            event("ADDED", pod("chat-0"), "11"),
            event("ADDED", pod("chat-1"), "12"),
            event("DELETED", pod("chat-0"), "13"),
            {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "20"}}},
        ]
    )
    calls: list[dict[str, Any]] = []

    def list_fn(**kwargs: Any) -> FakeResponse:
        calls.append(kwargs)
        return response

    assert follow_watch(list_fn, "pods", state, "10", field_selector="x") == "20"
    assert calls[0]["resource_version"] == "10"
    assert calls[0]["watch"] is True
    assert calls[0]["field_selector"] == "x"
    assert response.closed
    assert set(by_pod(parse(state.render(0)))) == {"chat-1"}


def test_follow_watch_reports_an_expired_version() -> None:
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
    with pytest.raises(WatchExpired):
        follow_watch(lambda **_: FakeResponse([gone]), "pods", SimulatorState(), "1")


class FakeList:
    """A list response: the raw JSON body the client returns without model objects."""

    def __init__(self, items: list[dict[str, Any]], rv: str) -> None:
        self.data = json.dumps({"metadata": {"resourceVersion": rv}, "items": items}).encode()


def test_informer_relists_when_the_watch_expires() -> None:
    state = SimulatorState()
    state.replace("nodes", [node("gpu-a")])
    stop = threading.Event()
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
    lists = [FakeList([pod("chat-0")], "5"), FakeList([pod("chat-1")], "30")]
    watches = [FakeResponse([event("ADDED", pod("chat-2"), "6"), gone])]
    seen: list[str | None] = []

    def list_fn(**kwargs: Any) -> FakeList | FakeResponse:
        seen.append(kwargs.get("resource_version"))
        if kwargs.get("watch"):
            return watches.pop(0)
        if len(lists) == 1:
            stop.set()  # the re-list is the last step of this test
        return lists.pop(0)

    dcgm_sim.run_informer(list_fn, "pods", state, stop)

    assert seen == [None, "5", None]
    assert set(by_pod(parse(state.render(0)))) == {"chat-1"}  # the re-list replaced all


@pytest.fixture
def server() -> Iterator[tuple[str, SimulatorState]]:
    state = SimulatorState()
    httpd = dcgm_sim.make_server(state, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def fetch(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


def test_http_server(server: tuple[str, SimulatorState]) -> None:
    url, state = server
    assert fetch(f"{url}/healthz")[0] == 503  # nothing listed yet

    state.replace("nodes", [node("gpu-a")])
    state.replace("pods", [pod("chat-0", gpus=2)])
    assert fetch(f"{url}/healthz")[:1] == (200,)

    status, content_type, body = fetch(f"{url}/load/team/chat", "PUT", b'{"load": 150}')
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body)["requestsInFlight"] == 1.5

    status, content_type, text = fetch(f"{url}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = parse(text)
    assert by_pod(samples) == {"chat-0": [75, 75]}
    assert samples["gpuyard_sim_requests_in_flight"][0][1] == 1.5

    status, _, body = fetch(f"{url}/load/team/chat", "PUT", b'{"load": -5}')
    assert status == 400
    assert "between 0" in json.loads(body)["error"]
    assert fetch(f"{url}/load/team/chat", "DELETE")[0] == 204
    assert json.loads(fetch(f"{url}/load")[2]) == {"loads": []}


@pytest.mark.parametrize(
    ("value", "expected"),
    [("127.0.0.1:9400", ("127.0.0.1", 9400)), (":0", ("127.0.0.1", 0)), ("[::1]:80", ("::1", 80))],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["9400", "host:", "host:99999", "host:http"])
def test_parse_listen_rejects(value: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="HOST:PORT"):
        parse_listen(value)
