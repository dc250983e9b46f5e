"""Usage sinks: ledger durability, the CloudEvents HTTP sink, Prometheus dedupe, fan-out."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gpuyard.io.ledger import LedgerCorruptError, read_ledger
from gpuyard.io.sinks import (
    CLOUDEVENTS_BATCH_CONTENT_TYPE,
    HttpCloudEventsSink,
    LedgerFileSink,
    MultiSink,
    MultiSinkError,
    PrometheusSink,
    SinkQueueFullError,
    SinkRejectedError,
    SinkUnavailableError,
    StdoutSink,
)
from gpuyard.logic.metering import (
    PodLifetime,
    PricePoint,
    UsageRecord,
    cut_records,
    record_from_line,
    record_to_line,
    with_utilization,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def make_records(count: int, *, uid: str = "uid-1", service: str = "llm") -> list[UsageRecord]:
    life = PodLifetime(
        cluster_id="c1",
        pod_uid=uid,
        pod_name=f"{service}-{uid}",
        namespace="team-a",
        service=service,
        pool="a100",
        gpu_type="a100-80gb",
        gpus=2,
        bound_at=T0,
        ended_at=None,
        prices=(PricePoint(T0, Decimal("2.50")),),
        currency="USD",
    )
    return cut_records(life, None, T0 + timedelta(minutes=count))


# --------------------------------------------------------------------------- stdout


def test_stdout_sink_writes_one_json_line_per_record() -> None:
    stream = io.StringIO()
    records = make_records(3)
    asyncio.run(StdoutSink(stream).emit(records))
    assert [record_from_line(line) for line in stream.getvalue().splitlines()] == records


def test_stdout_sink_defaults_to_the_current_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(StdoutSink().emit(make_records(1)))
    assert record_from_line(capsys.readouterr().out).id == make_records(1)[0].id


# --------------------------------------------------------------------------- ledger


def test_ledger_appends_and_fsyncs_before_acknowledging(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    synced: list[int] = []

    def fsync(fd: int) -> None:
        # What is durable at each fsync: the file's size (or -1 for the directory).
        synced.append(path.stat().st_size if os.fstat(fd).st_ino == path.stat().st_ino else -1)
        os.fsync(fd)

    sink = LedgerFileSink(path, fsync=fsync)
    first, second = make_records(2), make_records(3)[2:]
    asyncio.run(sink.emit(first))
    size_after_first = path.stat().st_size
    asyncio.run(sink.emit(second))
    asyncio.run(sink.aclose())
    # A new file: its directory entry is synced too; every batch is synced whole.
    assert synced == [-1, size_after_first, path.stat().st_size]
    assert list(read_ledger(path).records) == [*first, *second]


def test_ledger_emit_raises_when_fsync_fails(tmp_path: Path) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    sink = LedgerFileSink(tmp_path / "usage.jsonl", fsync=broken_fsync)
    with pytest.raises(SinkUnavailableError, match="Input/output error"):
        asyncio.run(sink.emit(make_records(1)))
    asyncio.run(sink.aclose())


def test_torn_last_line_is_ignored_and_cut_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    records = make_records(3)
    good = "".join(record_to_line(r) + "\n" for r in records[:2])
    torn = record_to_line(records[2])[:57]  # a crash in the middle of a write
    path.write_text(good + torn)

    contents = read_ledger(path)
    assert (list(contents.records), contents.torn_tail) == (records[:2], True)

    sink = LedgerFileSink(path)
    asyncio.run(sink.emit(records[2:]))
    asyncio.run(sink.aclose())
    assert path.read_text() == good + record_to_line(records[2]) + "\n"
    repaired = read_ledger(path)
    assert (list(repaired.records), repaired.torn_tail, repaired.duplicates) == (records, False, 0)


def test_a_torn_line_that_is_the_whole_file_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    path.write_text('{"schema":"gpuyard.io/us')
    sink = LedgerFileSink(path)
    asyncio.run(sink.emit(make_records(1)))
    asyncio.run(sink.aclose())
    assert list(read_ledger(path).records) == make_records(1)


def test_a_corrupt_line_in_the_middle_is_an_error_not_a_silent_gap(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    lines = [record_to_line(r) for r in make_records(2)]
    path.write_text(f"{lines[0]}\nnot json\n{lines[1]}\n")
    with pytest.raises(LedgerCorruptError, match=":2:"):
        read_ledger(path)


def test_ledger_read_deduplicates_and_reports_conflicting_copies(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    records = make_records(3)
    sink = LedgerFileSink(path)
    asyncio.run(sink.emit(records[:2]))
    # A replay after a crash: same ids, one now with utilisation (not a conflict) ...
    asyncio.run(sink.emit([with_utilization(records[1], Decimal(40)), records[2]]))
    # ... and one copy whose billed amount differs, which must never happen.
    asyncio.run(sink.emit([replace(records[0], gpu_seconds=1)]))
    asyncio.run(sink.aclose())
    contents = read_ledger(path)
    assert list(contents.records) == records
    assert (contents.duplicates, contents.conflicts) == (2, (records[0].id,))


# --------------------------------------------------------------------------- HTTP


@dataclass
class Receiver:
    """A CloudEvents receiver that answers `failures` first, then 204 No Content."""

    failures: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    requests: list[tuple[str, bytes]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    state = Receiver()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                state.requests.append((self.headers["Content-Type"], body))
                status, headers = state.failures.pop(0) if state.failures else (204, {})
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            # Keep request lines out of the test output.
            return None

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/api/v1/events"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def test_http_sink_retries_with_jittered_backoff_until_accepted(receiver: Receiver) -> None:
    receiver.failures = [(503, {}), (500, {}), (502, {})]
    sleep = RecordingSleep()
    sink = HttpCloudEventsSink(
        receiver.url, source="gpuyard/c1", sleep=sleep, backoff_base=1.0, backoff_max=3.0
    )
    asyncio.run(sink.emit(make_records(2)))
    assert len(receiver.requests) == 4
    assert len(sleep.delays) == 3
    ceilings = [1.0, 2.0, 3.0]  # base * 2**n, capped at backoff_max
    assert all(0 <= d <= c for d, c in zip(sleep.delays, ceilings, strict=True))
    assert sink.in_flight == 0


def test_http_sink_sends_cloudevents_batches_openmeter_accepts(receiver: Receiver) -> None:
    records = make_records(5)
    sink = HttpCloudEventsSink(receiver.url, source="gpuyard/c1", batch_size=2)
    asyncio.run(sink.emit(records))
    assert [len(json.loads(body)) for _, body in receiver.requests] == [2, 2, 1]
    assert {ctype for ctype, _ in receiver.requests} == {CLOUDEVENTS_BATCH_CONTENT_TYPE}
    events = [event for _, body in receiver.requests for event in json.loads(body)]
    first = events[0]
    assert {k: v for k, v in first.items() if k != "data"} == {
        "specversion": "1.0",
        "id": records[0].id,
        "source": "gpuyard/c1",
        "type": "gpu-usage",
        "subject": "team-a/llm",
        "time": "2024-05-01T12:00:00Z",
        "datacontenttype": "application/json",
    }
    assert first["data"]["gpu_seconds"] == 120
    assert first["data"]["cost"] == "0.083333333"
    assert [e["id"] for e in events] == [r.id for r in records]


def test_http_sink_gives_up_after_max_attempts(receiver: Receiver) -> None:
    receiver.failures = [(503, {})] * 5
    sink = HttpCloudEventsSink(
        receiver.url, source="gpuyard/c1", max_attempts=3, sleep=RecordingSleep()
    )
    with pytest.raises(SinkUnavailableError, match="HTTP 503"):
        asyncio.run(sink.emit(make_records(1)))
    assert len(receiver.requests) == 3


def test_http_sink_does_not_retry_a_rejected_batch(receiver: Receiver) -> None:
    receiver.failures = [(400, {})]
    sleep = RecordingSleep()
    sink = HttpCloudEventsSink(receiver.url, source="gpuyard/c1", sleep=sleep)
    with pytest.raises(SinkRejectedError, match="400"):
        asyncio.run(sink.emit(make_records(1)))
    assert (len(receiver.requests), sleep.delays) == (1, [])


def test_http_sink_honours_retry_after_within_its_cap(receiver: Receiver) -> None:
    receiver.failures = [(429, {"Retry-After": "7"}), (503, {"Retry-After": "600"})]
    sleep = RecordingSleep()
    sink = HttpCloudEventsSink(receiver.url, source="gpuyard/c1", sleep=sleep, backoff_max=30)
    asyncio.run(sink.emit(make_records(1)))
    assert sleep.delays == [7.0, 30.0]


def test_http_sink_retries_connection_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port any more: every attempt is refused.
    sleep = RecordingSleep()
    sink = HttpCloudEventsSink(
        f"http://127.0.0.1:{port}/", source="gpuyard/c1", max_attempts=2, sleep=sleep, timeout=2
    )
    with pytest.raises(SinkUnavailableError, match="attempts failed"):
        asyncio.run(sink.emit(make_records(1)))
    assert len(sleep.delays) == 1


async def _until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until `condition` holds; callers bound it with wait_for."""
    while not condition():
        await asyncio.sleep(0)


def test_http_sink_bounds_records_in_flight() -> None:
    release = asyncio.Event()
    started = asyncio.Event()
    bodies: list[bytes] = []

    async def transport(
        url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> tuple[int, Mapping[str, str]]:
        bodies.append(body)
        started.set()
        await release.wait()
        return 204, {}

    async def scenario() -> None:
        sink = HttpCloudEventsSink(
            "http://sink.invalid/", source="s", transport=transport, max_in_flight=4
        )
        first = asyncio.create_task(sink.emit(make_records(3)))
        await asyncio.wait_for(started.wait(), timeout=5)
        assert sink.in_flight == 3
        with pytest.raises(SinkQueueFullError):
            await sink.emit(make_records(2, uid="uid-2"))
        assert len(bodies) == 1  # the refused emit sent nothing
        fits = asyncio.create_task(sink.emit(make_records(1, uid="uid-3")))  # 3 + 1 <= 4
        await asyncio.wait_for(_until(lambda: sink.in_flight == 4), timeout=5)
        release.set()
        await asyncio.wait_for(asyncio.gather(first, fits), timeout=5)
        assert sink.in_flight == 0
        await sink.emit(make_records(2, uid="uid-2"))  # room again once delivered

    asyncio.run(scenario())


def test_http_sink_refuses_non_http_urls() -> None:
    with pytest.raises(ValueError, match="http"):
        HttpCloudEventsSink("file:///etc/passwd", source="s")


# --------------------------------------------------------------------------- Prometheus


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_prometheus_counters_count_each_record_id_once() -> None:
    registry = CollectorRegistry()
    sink = PrometheusSink(registry)
    records = make_records(3)
    asyncio.run(sink.emit(records[:2]))
    asyncio.run(sink.emit(records))  # a replay plus one new record
    labels = {"namespace": "team-a", "service": "llm", "pool": "a100"}
    assert sample(registry, "gpuyard_gpu_seconds_total", **labels) == 360
    cost = sample(registry, "gpuyard_cost_total", currency="USD", **labels)
    assert cost == pytest.approx(float(sum(r.cost for r in records)))
    assert sample(registry, "gpuyard_idle_gpu_seconds_total", **labels) is None


def test_prometheus_idle_counter_and_bounded_memory() -> None:
    registry = CollectorRegistry()
    sink = PrometheusSink(registry, dedupe_horizon_seconds=120)
    records = make_records(5)
    asyncio.run(sink.emit([with_utilization(records[0], Decimal(25))]))
    labels = {"namespace": "team-a", "service": "llm", "pool": "a100"}
    assert sample(registry, "gpuyard_idle_gpu_seconds_total", **labels) == 90
    asyncio.run(sink.emit(records[1:]))
    # Windows ending more than 120 s before the newest are forgotten.
    assert [sink.seen(r.id) for r in records] == [False, False, False, True, True]


# --------------------------------------------------------------------------- fan-out


class FakeSink:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.received: list[list[str]] = []

    async def emit(self, records: Sequence[UsageRecord]) -> None:
        self.received.append([r.id for r in records])
        if self.failures:
            self.failures -= 1
            raise SinkUnavailableError("down")

    async def aclose(self) -> None:
        return None


def test_multisink_acknowledges_only_when_every_sink_did() -> None:
    ledger, http = FakeSink(), FakeSink(failures=2)
    multi = MultiSink({"ledger": ledger, "http": http})
    records = make_records(2)
    ids = [r.id for r in records]
    for _ in range(2):
        with pytest.raises(MultiSinkError) as failed:
            asyncio.run(multi.emit(records))
        assert set(failed.value.failures) == {"http"}
    asyncio.run(multi.emit(records))
    # The ledger got the records once, not once per retry; http got them every time.
    assert ledger.received == [ids]
    assert http.received == [ids, ids, ids]
    # Once everyone acknowledged, the memory is released.
    assert multi._acked == {"ledger": set(), "http": set()}


def test_multisink_sends_new_records_to_sinks_that_acked_older_ones() -> None:
    ledger, http = FakeSink(), FakeSink(failures=1)
    multi = MultiSink({"ledger": ledger, "http": http})
    records = make_records(3)
    with pytest.raises(MultiSinkError):
        asyncio.run(multi.emit(records[:2]))
    asyncio.run(multi.emit(records))  # the next tick cut one more window
    assert ledger.received == [[r.id for r in records[:2]], [records[2].id]]
    assert http.received[-1] == [r.id for r in records]
