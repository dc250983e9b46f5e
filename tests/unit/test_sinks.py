"""Usage sinks: ledger durability, the CloudEvents HTTP sink, Prometheus dedupe, fan-out."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gpuyard.config import Settings
from gpuyard.handlers.runtime import build_http_sink
from gpuyard.io.ledger import LedgerCorruptError, read_ledger
from gpuyard.io.sinks import (
    CLOUDEVENTS_BATCH_CONTENT_TYPE,
    HttpCloudEventsSink,
    LedgerFileSink,
    MultiSink,
    MultiSinkError,
    PrometheusSink,
    SinkConfigError,
    SinkQueueFullError,
    SinkRejectedError,
    SinkUnavailableError,
    StdoutSink,
    parse_header_file,
    tls_context,
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
        ready_at=T0,  # a warm start: no GPU-second is a cold start's
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
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A CloudEvents receiver on loopback: answers `failures` first, then 204 No Content.
    With `bearer` set, a request without `Authorization: Bearer <bearer>` gets 401."""

    failures: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    bearer: str | None = None
    url: str = ""


@contextlib.contextmanager
def serve(tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    state = Receiver()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self._answer(self.rfile.read(int(self.headers["Content-Length"])))

        def do_GET(self) -> None:
            # What a followed redirect would turn a POST into: recorded, so tests see it.
            self._answer(b"")

        def _answer(self, body: bytes) -> None:
            headers: dict[str, str] = {}
            with lock:
                state.requests.append(
                    Received(self.command, self.path, dict(self.headers.items()), body)
                )
                if state.bearer is not None and (
                    self.headers.get("Authorization") != f"Bearer {state.bearer}"
                ):
                    status = 401
                else:
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
    scheme = "http"
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    state.url = f"{scheme}://127.0.0.1:{server.server_address[1]}/api/v1/events"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib honours proxy variables; the receivers are on loopback.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serve() as state:
        yield state


def loopback_sink(url: str, **options: Any) -> HttpCloudEventsSink:
    """A sink for a plain-http loopback receiver (http:// must be allowed explicitly)."""
    return HttpCloudEventsSink(url, source="gpuyard/c1", allow_insecure=True, **options)


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def test_http_sink_retries_with_jittered_backoff_until_accepted(receiver: Receiver) -> None:
    receiver.failures = [(503, {}), (500, {}), (502, {})]
    sleep = RecordingSleep()
    sink = loopback_sink(receiver.url, sleep=sleep, backoff_base=1.0, backoff_max=3.0)
    asyncio.run(sink.emit(make_records(2)))
    assert len(receiver.requests) == 4
    assert len(sleep.delays) == 3
    ceilings = [1.0, 2.0, 3.0]  # base * 2**n, capped at backoff_max
    assert all(0 <= d <= c for d, c in zip(sleep.delays, ceilings, strict=True))
    assert sink.in_flight == 0


def test_http_sink_sends_cloudevents_batches_openmeter_accepts(receiver: Receiver) -> None:
    records = make_records(5)
    sink = loopback_sink(receiver.url, batch_size=2)
    asyncio.run(sink.emit(records))
    assert [len(json.loads(r.body)) for r in receiver.requests] == [2, 2, 1]
    assert {r.headers["Content-Type"] for r in receiver.requests} == {
        CLOUDEVENTS_BATCH_CONTENT_TYPE
    }
    events = [event for r in receiver.requests for event in json.loads(r.body)]
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
    sink = loopback_sink(receiver.url, max_attempts=3, sleep=RecordingSleep())
    with pytest.raises(SinkUnavailableError, match="HTTP 503"):
        asyncio.run(sink.emit(make_records(1)))
    assert len(receiver.requests) == 3


def test_http_sink_defaults_fail_a_silent_receiver_within_a_minute() -> None:
    sink = HttpCloudEventsSink("https://sink.invalid/", source="s")
    # Each attempt waits at most `timeout` per socket operation, each pause at most
    # backoff_max: 4 x 10 s + 3 x 5 s.
    worst = sink.max_attempts * sink.timeout + (sink.max_attempts - 1) * sink.backoff_max
    assert (sink.max_attempts, sink.timeout, sink.backoff_max, worst) == (4, 10.0, 5.0, 55.0)
    asyncio.run(sink.aclose())


def test_http_sink_fails_a_receiver_that_never_answers_within_its_budget() -> None:
    # A listening socket that nobody accepts from: the kernel completes the handshake and
    # takes the request, and no answer ever comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        sink = loopback_sink(url, max_attempts=3, timeout=0.3, backoff_max=0.05)
        started = time.monotonic()
        with pytest.raises(SinkUnavailableError, match=r"3 attempts failed, last: .*timed out"):
            asyncio.run(sink.emit(make_records(1)))
        elapsed = time.monotonic() - started
        asyncio.run(sink.aclose())
    budget = 3 * 0.3 + 2 * 0.05
    assert 3 * 0.3 <= elapsed < budget + 2.0  # slack for a loaded machine


def test_http_sink_does_not_retry_a_rejected_batch(receiver: Receiver) -> None:
    receiver.failures = [(400, {})]
    sleep = RecordingSleep()
    sink = loopback_sink(receiver.url, sleep=sleep)
    with pytest.raises(SinkRejectedError, match="400"):
        asyncio.run(sink.emit(make_records(1)))
    assert (len(receiver.requests), sleep.delays) == (1, [])


def test_http_sink_honours_retry_after_within_its_cap(receiver: Receiver) -> None:
    receiver.failures = [(429, {"Retry-After": "7"}), (503, {"Retry-After": "600"})]
    sleep = RecordingSleep()
    sink = loopback_sink(receiver.url, sleep=sleep, backoff_max=30)
    asyncio.run(sink.emit(make_records(1)))
    assert sleep.delays == [7.0, 30.0]


def test_http_sink_retries_connection_errors() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port any more: every attempt is refused.
    sleep = RecordingSleep()
    sink = loopback_sink(f"http://127.0.0.1:{port}/", max_attempts=2, sleep=sleep, timeout=2)
    with pytest.raises(SinkUnavailableError, match="attempts failed"):
        asyncio.run(sink.emit(make_records(1)))
    assert len(sleep.delays) == 1


def test_http_sink_makes_at_most_max_connections_posts_at_once() -> None:
    active, most, lock = [0], [0], threading.Lock()
    release = threading.Event()

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
            release.wait(timeout=10)
            with lock:
                active[0] -= 1
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    sink = loopback_sink(f"http://127.0.0.1:{server.server_address[1]}/", max_connections=2)

    async def scenario() -> None:
        running = asyncio.gather(*(sink.emit(make_records(1, uid=f"u{n}")) for n in range(5)))
        await asyncio.wait_for(_until(lambda: active[0] == 2), timeout=5)
        # Not a wait for anything: the time a third POST would need to show up, if it could.
        await asyncio.sleep(0.2)
        release.set()
        await asyncio.wait_for(running, timeout=10)

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        asyncio.run(sink.aclose())
    assert most[0] == 2


# -- redirects


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_http_sink_never_follows_a_redirect(receiver: Receiver, status: int) -> None:
    with serve() as elsewhere:
        receiver.failures = [(status, {"Location": elsewhere.url})]
        sink = loopback_sink(receiver.url, max_attempts=1)
        with pytest.raises(SinkUnavailableError) as failed:
            asyncio.run(sink.emit(make_records(1)))
    assert f"HTTP {status} redirecting to {elsewhere.url}, not followed" in str(failed.value)
    assert [r.method for r in receiver.requests] == ["POST"]
    assert elsewhere.requests == []


def test_records_arrive_once_the_receiver_stops_redirecting(receiver: Receiver) -> None:
    records = make_records(3)
    receiver.failures = [(307, {"Location": "https://new.example/api/v1/events"})] * 3
    sleep = RecordingSleep()
    sink = loopback_sink(receiver.url, max_attempts=2, sleep=sleep)
    multi = MultiSink({"http": sink})  # what the meter emits to

    # While it redirects, nothing is acknowledged: the meter's mark would not move.
    with pytest.raises(MultiSinkError) as failed:
        asyncio.run(multi.emit(records))
    assert "307 redirecting to https://new.example/api/v1/events" in str(failed.value)
    assert len(receiver.requests) == 2
    assert len(sleep.delays) == 1  # retried like a 5xx

    # The next tick re-emits the same records; the third redirect is the last.
    asyncio.run(multi.emit(records))
    accepted = receiver.requests[-1]
    assert [r.method for r in receiver.requests] == ["POST"] * 4
    assert [e["id"] for e in json.loads(accepted.body)] == [r.id for r in records]


# -- headers from a file


def secret_volume(directory: Path, files: Mapping[str, str]) -> None:
    """Write `files` the way the kubelet updates a Secret volume: into a new timestamped
    directory, then one atomic swap of the `..data` symlink the visible names go through."""
    directory.mkdir(exist_ok=True)
    version = directory / f"..{time.monotonic_ns()}"
    version.mkdir()
    for name, text in files.items():
        (version / name).write_text(text)
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(Path("..data") / name)
    swap = directory / "..data_tmp"
    swap.symlink_to(version.name)
    os.replace(swap, directory / "..data")


def test_http_sink_sends_the_headers_of_its_file(receiver: Receiver, tmp_path: Path) -> None:
    secret_volume(
        tmp_path / "secret",
        {"headers": "# billing\n\nAuthorization: Bearer tok-1\nX-Tenant:  acme \n"},
    )
    receiver.bearer = "tok-1"
    sink = loopback_sink(receiver.url, headers_file=tmp_path / "secret" / "headers")
    asyncio.run(sink.emit(make_records(1)))
    [request] = receiver.requests
    assert request.headers["Authorization"] == "Bearer tok-1"
    assert request.headers["X-Tenant"] == "acme"
    assert request.headers["Content-Type"] == CLOUDEVENTS_BATCH_CONTENT_TYPE
    assert sink.header_names == ["Authorization", "X-Tenant"]


def test_a_refused_token_is_rejected_and_never_quoted(receiver: Receiver, tmp_path: Path) -> None:
    secret_volume(tmp_path / "secret", {"headers": "Authorization: Bearer wrong-token\n"})
    receiver.bearer = "right-token"
    sink = loopback_sink(receiver.url, headers_file=tmp_path / "secret" / "headers")
    with pytest.raises(SinkRejectedError, match="answered 401") as failed:
        asyncio.run(sink.emit(make_records(1)))
    assert "wrong-token" not in str(failed.value)
    assert len(receiver.requests) == 1  # a 401 is not retried


def test_a_rotated_token_is_used_without_a_restart(receiver: Receiver, tmp_path: Path) -> None:
    volume = tmp_path / "secret"
    secret_volume(volume, {"headers": "Authorization: Bearer tok-1\n"})
    sink = loopback_sink(receiver.url, headers_file=volume / "headers")
    receiver.bearer = "tok-1"
    asyncio.run(sink.emit(make_records(1)))

    receiver.bearer = "tok-2"  # the receiver rotated first: the old token is refused
    with pytest.raises(SinkRejectedError, match="401"):
        asyncio.run(sink.emit(make_records(1)))
    secret_volume(volume, {"headers": "Authorization: Bearer tok-2\n"})  # the kubelet's swap
    asyncio.run(sink.emit(make_records(1)))

    receiver.bearer = "tok-3"  # a file rewritten in place is read again too
    (volume / "headers").resolve().write_text("Authorization: Bearer tok-3\n")
    asyncio.run(sink.emit(make_records(1)))
    assert [r.headers["Authorization"] for r in receiver.requests] == [
        "Bearer tok-1",
        "Bearer tok-1",
        "Bearer tok-2",
        "Bearer tok-3",
    ]


def test_a_broken_rotation_sends_nothing_until_it_is_fixed(
    receiver: Receiver, tmp_path: Path
) -> None:
    volume = tmp_path / "secret"
    secret_volume(volume, {"headers": "Authorization: Bearer tok-1\n"})
    sink = loopback_sink(receiver.url, headers_file=volume / "headers")
    secret_volume(volume, {"headers": "Authorization: Bearer tok-2\nBearer tok-2\n"})
    with pytest.raises(SinkUnavailableError, match=r"headers:2: not a 'Name: value' line") as e:
        asyncio.run(sink.emit(make_records(1)))
    assert "tok-2" not in str(e.value)
    assert receiver.requests == []
    secret_volume(volume, {"headers": "Authorization: Bearer tok-2\n"})
    asyncio.run(sink.emit(make_records(1)))
    assert [r.headers["Authorization"] for r in receiver.requests] == ["Bearer tok-2"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Authorization Bearer s3cr3t\n", "h:1: not a 'Name: value' line"),
        ("# note\n\ntoken=s3cr3t: x\n", "h:3: not a 'Name: value' line"),
        (": s3cr3t\n", "h:1: not a 'Name: value' line"),
        ("Content-Type: text/plain\n", "h:1: Content-Type is set by the sink"),
        ("content-length: 5\n", "h:1: content-length is set by the sink"),
        ("Host: s3cr3t.example\n", "h:1: Host is set by the sink"),
        ("X-Key: s3cr3t\nx-key: s3cr3t\n", "h:2: x-key repeats line 1"),
        ("X-Key:\n", "h:1: X-Key has no value"),
        ("X-Key: s3cr3t\u00e9\n", "h:1: the value of X-Key is not printable ASCII"),
    ],
)
def test_header_file_errors_name_the_line_never_the_value(text: str, message: str) -> None:
    with pytest.raises(SinkConfigError) as failed:
        parse_header_file(text, origin="h")
    assert str(failed.value).startswith(message)
    assert "s3cr3t" not in str(failed.value)


def test_header_file_accepts_comments_blank_lines_and_crlf() -> None:
    text = "# rotated by vault\r\n\r\n  Authorization: Bearer a:b \r\nX-Empty-Comment: #1\r\n"
    assert parse_header_file(text, origin="h") == {
        "Authorization": "Bearer a:b",
        "X-Empty-Comment": "#1",
    }
    assert parse_header_file("", origin="h") == {}


def test_a_bad_headers_file_stops_the_sink_from_being_built(tmp_path: Path) -> None:
    path = tmp_path / "headers"
    path.write_bytes(b"Authorization: Bearer \xffs3cr3t\n")
    with pytest.raises(SinkConfigError, match="not UTF-8 text") as failed:
        loopback_sink("http://127.0.0.1:9/", headers_file=path)
    assert "s3cr3t" not in str(failed.value)
    assert "xff" not in str(failed.value)
    path.write_text("X-Key: 1\nContent-Type: text/plain\n")
    with pytest.raises(SinkConfigError, match="headers:2: Content-Type is set by the sink"):
        loopback_sink("http://127.0.0.1:9/", headers_file=path)
    with pytest.raises(SinkConfigError, match="No such file"):
        loopback_sink("http://127.0.0.1:9/", headers_file=tmp_path / "missing")


# -- TLS


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.server_cert, self.server_key)
        return context


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "2", "-subj", f"/CN={name}", "-keyout", key, "-out", cert,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA, a server certificate it signed for 127.0.0.1 only, and an unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    directory = tmp_path_factory.mktemp("pki")
    ca, ca_key = _make_ca(directory, "test-ca")
    other_ca, _ = _make_ca(directory, "other-ca")
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    extensions = directory / "server.ext"
    extensions.write_text(
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", "/CN=receiver", "-keyout", key, "-out", csr,
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-days", "2", "-extfile", extensions, "-out", cert,
        cwd=directory,
    )  # fmt: skip
    return Pki(ca=ca, other_ca=other_ca, server_cert=cert, server_key=key)


@pytest.fixture
def tls_receiver(pki: Pki) -> Iterator[Receiver]:
    with serve(pki.server_context()) as state:
        yield state


def test_https_receiver_verified_with_the_given_ca(tls_receiver: Receiver, pki: Pki) -> None:
    sink = HttpCloudEventsSink(tls_receiver.url, source="s", ca_file=pki.ca)
    asyncio.run(sink.emit(make_records(2)))
    asyncio.run(sink.aclose())
    assert len(json.loads(tls_receiver.requests[0].body)) == 2


def test_https_receiver_unknown_to_the_trust_store_is_refused(tls_receiver: Receiver) -> None:
    # No CA file: the system's trust store, which has never heard of the test CA.
    sink = HttpCloudEventsSink(tls_receiver.url, source="s", max_attempts=1)
    with pytest.raises(SinkUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(sink.emit(make_records(1)))
    assert tls_receiver.requests == []


def test_hostname_verification_stays_on(tls_receiver: Receiver, pki: Pki) -> None:
    # The certificate names 127.0.0.1; "localhost" reaches the same server but is not it.
    url = tls_receiver.url.replace("127.0.0.1", "localhost")
    sink = HttpCloudEventsSink(url, source="s", ca_file=pki.ca, max_attempts=1)
    with pytest.raises(SinkUnavailableError, match="not valid for 'localhost'"):
        asyncio.run(sink.emit(make_records(1)))
    assert tls_receiver.requests == []


def test_a_ca_bundle_replaces_the_trust_store_and_verification_stays_on(pki: Pki) -> None:
    context = tls_context(pki.ca)
    assert [cert["subject"] for cert in context.get_ca_certs()] == [((("commonName", "test-ca"),),)]
    for context in (tls_context(pki.ca), tls_context(None)):
        assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)


def test_a_replaced_ca_bundle_is_loaded_again(
    tls_receiver: Receiver, pki: Pki, tmp_path: Path
) -> None:
    volume = tmp_path / "configmap"
    secret_volume(volume, {"ca.crt": pki.other_ca.read_text()})
    sink = HttpCloudEventsSink(
        tls_receiver.url, source="s", ca_file=volume / "ca.crt", max_attempts=1
    )
    with pytest.raises(SinkUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(sink.emit(make_records(1)))
    secret_volume(volume, {"ca.crt": pki.ca.read_text()})
    asyncio.run(sink.emit(make_records(1)))
    assert len(tls_receiver.requests) == 1


def test_an_unusable_ca_bundle_stops_the_sink_from_being_built(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.crt"
    bundle.write_text("not a certificate\n")
    with pytest.raises(SinkConfigError, match=f"CA bundle {bundle}"):
        HttpCloudEventsSink("https://sink.example/", source="s", ca_file=bundle)
    with pytest.raises(SinkConfigError, match="CA bundle"):
        HttpCloudEventsSink("https://sink.example/", source="s", ca_file=tmp_path / "none")


# -- URLs


def test_http_sink_refuses_plain_http_unless_allowed() -> None:
    with pytest.raises(SinkConfigError, match="GPUYARD_USAGE_HTTP_ALLOW_INSECURE=true"):
        HttpCloudEventsSink("http://sink.example/", source="s")
    HttpCloudEventsSink("http://sink.example/", source="s", allow_insecure=True)


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("file:///etc/passwd", {}, "must be http"),
        ("https:///no-host", {}, "must be http"),
        ("https://user:pw@sink.example/", {}, "holds credentials"),
        ("ftp://user:pw@sink.example/", {}, "holds credentials"),
        ("http://sink.example/", {"allow_insecure": True, "ca_file": Path("ca.crt")}, "https"),
    ],
)
def test_http_sink_refuses_bad_urls(url: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(SinkConfigError, match=message) as failed:
        HttpCloudEventsSink(url, source="s", **options)
    assert "pw" not in str(failed.value)


# -- the bound on records in flight


async def _until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until `condition` holds; callers bound it with wait_for."""
    while not condition():
        await asyncio.sleep(0)


class GatedTransport:
    """Holds every POST until `release` is set; records the batch sizes it was given."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.sizes: list[int] = []

    async def __call__(
        self, _url: str, body: bytes, _headers: Mapping[str, str], _timeout: float
    ) -> tuple[int, Mapping[str, str]]:
        self.sizes.append(len(json.loads(body)))
        await self.release.wait()
        return 204, {}


def test_http_sink_bounds_records_in_flight() -> None:
    async def scenario() -> None:
        transport = GatedTransport()
        sink = HttpCloudEventsSink(
            "https://sink.invalid/", source="s", transport=transport, max_in_flight=4
        )
        first = asyncio.create_task(sink.emit(make_records(3)))
        await asyncio.wait_for(_until(lambda: transport.sizes == [3]), timeout=5)
        assert sink.in_flight == 3
        with pytest.raises(SinkQueueFullError):
            await sink.emit(make_records(2, uid="uid-2"))
        assert transport.sizes == [3]  # the refused emit sent nothing
        fits = asyncio.create_task(sink.emit(make_records(1, uid="uid-3")))  # 3 + 1 <= 4
        await asyncio.wait_for(_until(lambda: sink.in_flight == 4), timeout=5)
        transport.release.set()
        await asyncio.wait_for(asyncio.gather(first, fits), timeout=5)
        assert sink.in_flight == 0
        await sink.emit(make_records(2, uid="uid-2"))  # room again once delivered

    asyncio.run(scenario())


def test_an_emit_larger_than_the_bound_goes_alone_when_nothing_is_in_flight() -> None:
    async def scenario() -> None:
        transport = GatedTransport()
        sink = HttpCloudEventsSink(
            "https://sink.invalid/", source="s", transport=transport, max_in_flight=4,
            batch_size=3,
        )  # fmt: skip
        big = asyncio.create_task(sink.emit(make_records(10)))
        await asyncio.wait_for(_until(lambda: transport.sizes == [3]), timeout=5)
        with pytest.raises(SinkQueueFullError):  # alone means alone
            await sink.emit(make_records(1, uid="uid-2"))
        transport.release.set()
        await asyncio.wait_for(big, timeout=5)
        assert (transport.sizes, sink.in_flight) == ([3, 3, 3, 1], 0)

    asyncio.run(scenario())


def test_an_emit_larger_than_the_bound_waits_for_the_others_and_cannot_starve() -> None:
    async def scenario() -> None:
        transport = GatedTransport()
        sink = HttpCloudEventsSink(
            "https://sink.invalid/", source="s", transport=transport, max_in_flight=4
        )
        small = asyncio.create_task(sink.emit(make_records(2)))
        await asyncio.wait_for(_until(lambda: transport.sizes == [2]), timeout=5)
        big = asyncio.create_task(sink.emit(make_records(10, uid="uid-big")))
        await asyncio.wait_for(_until(lambda: sink.in_flight == 12), timeout=5)
        assert transport.sizes == [2]  # waiting, not sending beside the small one
        # While it waits, newcomers are refused, however small, so it cannot starve ...
        with pytest.raises(SinkQueueFullError):
            await sink.emit(make_records(1, uid="uid-3"))
        # ... and a second oversized emit does not queue behind it either.
        with pytest.raises(SinkQueueFullError):
            await sink.emit(make_records(5, uid="uid-4"))
        transport.release.set()
        await asyncio.wait_for(asyncio.gather(small, big), timeout=5)
        assert (transport.sizes, sink.in_flight) == ([2, 10], 0)
        await sink.emit(make_records(1, uid="uid-3"))  # and all is open again

    asyncio.run(scenario())


def test_a_cancelled_waiting_emit_releases_its_claim() -> None:
    async def scenario() -> None:
        transport = GatedTransport()
        sink = HttpCloudEventsSink(
            "https://sink.invalid/", source="s", transport=transport, max_in_flight=4
        )
        small = asyncio.create_task(sink.emit(make_records(2)))
        await asyncio.wait_for(_until(lambda: transport.sizes == [2]), timeout=5)
        big = asyncio.create_task(sink.emit(make_records(10, uid="uid-big")))
        await asyncio.wait_for(_until(lambda: sink.in_flight == 12), timeout=5)
        big.cancel()
        with pytest.raises(asyncio.CancelledError):
            await big
        assert sink.in_flight == 2
        fits = asyncio.create_task(sink.emit(make_records(1, uid="uid-3")))
        transport.release.set()
        await asyncio.wait_for(asyncio.gather(small, fits), timeout=5)
        assert sink.in_flight == 0

    asyncio.run(scenario())


# -- built from the operator's settings


def test_settings_build_the_http_sink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("GPUYARD_")]:
        monkeypatch.delenv(name)
    headers = tmp_path / "headers"
    headers.write_text("Authorization: Bearer s3cr3t\n")
    settings = Settings(
        cluster_id="eu-1",
        usage_http_url="https://billing.example/api/v1/events",
        usage_http_headers_file=headers,
        usage_http_max_attempts=2,
        usage_http_timeout_seconds=3.5,
    )
    sink = build_http_sink(settings)
    assert sink is not None
    assert (sink.url, sink.source, sink.max_attempts, sink.timeout) == (
        "https://billing.example/api/v1/events",
        "gpuyard/eu-1",
        2,
        3.5,
    )
    assert sink.header_names == ["Authorization"]
    # Everything the meter delivers at once fits: 8 deliveries of up to 10,000 records.
    assert sink.max_in_flight == 80_000
    asyncio.run(sink.aclose())
    assert build_http_sink(Settings()) is None
    headers.write_text("Authorization Bearer s3cr3t\n")
    with pytest.raises(SinkConfigError, match=r"headers:1: not a 'Name: value' line"):
        build_http_sink(settings)


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


def test_prometheus_counts_the_gpu_seconds_of_cold_starts() -> None:
    registry = CollectorRegistry()
    sink = PrometheusSink(registry)
    records = make_records(2)
    asyncio.run(sink.emit([replace(records[0], starting_gpu_seconds=45), records[1]]))
    labels = {"namespace": "team-a", "service": "llm", "pool": "a100"}
    assert sample(registry, "gpuyard_starting_gpu_seconds_total", **labels) == 45


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
