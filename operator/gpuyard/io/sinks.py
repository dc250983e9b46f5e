"""Usage sinks: where acknowledged usage records go.

Every sink has one coroutine, `emit(records)`, that returns only once the records are
durably accepted and raises `SinkError` otherwise; the meter advances a service's mark
only after `emit` returns. The interface is async because the operator runs on Kopf's
event loop: an HTTP sink backing off must not block it, and blocking work runs in worker
threads (the ledger's fsync via `asyncio.to_thread`, the HTTP sink's POSTs in its own pool).

Delivery is at-least-once: after a crash, or when one of several sinks fails, records
are emitted again with the same ids. Each sink is therefore idempotent by record id —
the ledger reader and billing systems deduplicate, `PrometheusSink` deduplicates in
process, and `MultiSink` does not resend to a sink that already acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import ssl
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, Protocol, TextIO, TypeVar

from prometheus_client import CollectorRegistry, Counter

from gpuyard.api.formats import format_time
from gpuyard.logic.metering import (
    UsageRecord,
    epoch_floor,
    record_to_json,
    record_to_line,
)

T = TypeVar("T")

CLOUDEVENTS_BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
DEFAULT_EVENT_TYPE = "gpu-usage"


class SinkError(Exception):
    """A sink did not accept the records; the caller must not advance the mark."""


class SinkUnavailableError(SinkError):
    """Retryable failures outlasted the retry budget (network down, 5xx, 429)."""


class SinkRejectedError(SinkError):
    """The receiver refused the batch as invalid (4xx): retrying it will not help."""


class SinkQueueFullError(SinkError):
    """Accepting the records would exceed the sink's bound on records in flight."""


class MultiSinkError(SinkError):
    def __init__(self, failures: Mapping[str, BaseException]) -> None:
        self.failures = dict(failures)
        detail = "; ".join(f"{name}: {exc!r}" for name, exc in sorted(self.failures.items()))
        super().__init__(f"{len(self.failures)} sink(s) failed: {detail}")


class UsageSink(Protocol):
    async def emit(self, records: Sequence[UsageRecord]) -> None: ...

    async def aclose(self) -> None: ...


# --------------------------------------------------------------------------- stdout


class StdoutSink:
    """JSON lines on standard output (the default sink: `kubectl logs` is the ledger)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        # Resolved per emit when None, so a replaced sys.stdout (tests, redirection) wins.
        self._stream = stream

    async def emit(self, records: Sequence[UsageRecord]) -> None:
        if not records:
            return
        stream = self._stream if self._stream is not None else sys.stdout
        try:
            stream.write("".join(record_to_line(r) + "\n" for r in records))
            stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: write to a closed stream
            raise SinkUnavailableError(f"stdout: {exc}") from exc

    async def aclose(self) -> None:
        return None


# --------------------------------------------------------------------------- ledger


class LedgerFileSink:
    """An append-only JSON-lines ledger file, fsync'ed before `emit` returns.

    Crash safety: each emit is one `write` of whole lines followed by `fsync`. A crash
    mid-write can leave a torn last line; it was never acknowledged, so it will be emitted
    again. Before its first append a sink cuts such a torn tail off (the only truncation
    it ever does), so the torn bytes cannot glue onto the next record; readers skip a torn
    last line in any case (`gpuyard.io.ledger`).
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: Callable[[int], None] = os.fsync):
        self.path = Path(path)
        self._fsync = fsync
        self._fd: int | None = None
        # Emits may overlap (several services per tick); lines must not interleave.
        self._lock = threading.Lock()

    async def emit(self, records: Sequence[UsageRecord]) -> None:
        if not records:
            return
        data = "".join(record_to_line(r) + "\n" for r in records).encode()
        try:
            await asyncio.to_thread(self._append, data)
        except OSError as exc:
            raise SinkUnavailableError(f"ledger {self.path}: {exc}") from exc

    def _append(self, data: bytes) -> None:
        with self._lock:
            fd = self._open()
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            self._fsync(fd)

    def _open(self) -> int:
        if self._fd is not None:
            return self._fd
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            _cut_torn_tail(fd)
            if created:
                # The new file's directory entry must survive a crash too.
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    self._fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return fd

    async def aclose(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _cut_torn_tail(fd: int, chunk: int = 65536) -> None:
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - chunk)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            os.ftruncate(fd, start + newline + 1)
            os.fsync(fd)
            return
        end = start
    os.ftruncate(fd, 0)
    os.fsync(fd)


# --------------------------------------------------------------------------- HTTP


def to_cloudevent(
    record: UsageRecord,
    *,
    source: str,
    event_type: str = DEFAULT_EVENT_TYPE,
    subject: Callable[[UsageRecord], str] | None = None,
) -> dict[str, Any]:
    """A CloudEvents 1.0 structured event for OpenMeter's ingest API.

    `id` is the record id: OpenMeter deduplicates on (namespace, source, id), so `source`
    must be stable across restarts and replicas (the cluster, never the pod). `time` is
    the window start, so the usage lands in the meter window and billing period it
    belongs to.
    """
    return {
        "specversion": "1.0",
        "id": record.id,
        "source": source,
        "type": event_type,
        "subject": subject(record) if subject else f"{record.namespace}/{record.service}",
        "time": format_time(record.start),
        "datacontenttype": "application/json",
        "data": record_to_json(record),
    }


class SinkConfigError(ValueError):
    """A sink cannot work as configured: its URL, header file or CA bundle."""


# Headers that describe the body or the connection, which the sink and urllib set: a
# header file overriding them would corrupt the request, not authenticate it.
RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "host", "transfer-encoding", "connection"}
)
# A field name is an RFC 9110 token; a value here is printable ASCII (spaces and tabs too).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]+")


def parse_header_file(text: str, *, origin: str) -> dict[str, str]:
    """Request headers from `Name: value` lines; blank lines and `#` comments are skipped.

    An error names `origin` and the line number, never the line: the values are
    credentials (an `Authorization: Bearer ...` token) and errors end up in logs.
    """
    headers: dict[str, str] = {}
    first_seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, colon, value = stripped.partition(":")
        name, value = name.strip(), value.strip()
        where = f"{origin}:{number}"
        if not colon or not _HEADER_NAME.fullmatch(name):
            raise SinkConfigError(f"{where}: not a 'Name: value' line")
        if name.lower() in RESERVED_HEADERS:
            raise SinkConfigError(f"{where}: {name} is set by the sink and cannot be overridden")
        if name.lower() in first_seen:
            raise SinkConfigError(f"{where}: {name} repeats line {first_seen[name.lower()]}")
        if not value:
            raise SinkConfigError(f"{where}: {name} has no value")
        if not _HEADER_VALUE.fullmatch(value):
            raise SinkConfigError(f"{where}: the value of {name} is not printable ASCII")
        first_seen[name.lower()] = number
        headers[name] = value
    return headers


def _read_header_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        # The decoder's message quotes the offending byte, which belongs to a secret.
        raise SinkConfigError(f"{path}: not UTF-8 text") from None
    return parse_header_file(text, origin=str(path))


class _ReloadingFile(Generic[T]):
    """What `load` makes of a file, made again whenever the file changes.

    A Secret or ConfigMap volume updates its files by swapping a symlink, so a new
    version has a new inode and mtime; `stat` follows the link. The file is stat'ed
    before it is read: a change in between shows as a new signature next time, which
    reads it again. Called on the event loop: a stat, and rarely a read, of a small file
    on the pod's own volume.
    """

    def __init__(self, path: Path, load: Callable[[Path], T]) -> None:
        self.path = path
        self._load = load
        self._signature = self._stat()
        self._value = load(path)

    def _stat(self) -> tuple[int, int, int, int]:
        info = os.stat(self.path)
        return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)

    def current(self) -> T:
        signature = self._stat()
        if signature != self._signature:
            # If the new version does not load, the old signature stays: retried next call.
            self._value = self._load(self.path)
            self._signature = signature
        return self._value


Transport = Callable[
    [str, bytes, Mapping[str, str], float], Awaitable[tuple[int, Mapping[str, str]]]
]
"""(url, body, headers, timeout) -> (status, response headers); raises OSError on I/O."""


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Hands a 3xx back as the answer instead of following it.

    urllib follows a 301, 302 or 303 answer to a POST with a GET without a body, and a
    2xx to that GET would read as an accepted batch that no receiver ever got.
    """

    def redirect_request(self, *_: object) -> None:
        return None


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verifies certificates and hostnames (create_default_context's defaults) against
    `ca_file`, which replaces the system's trust store rather than adding to it."""
    return ssl.create_default_context(cafile=ca_file)


def _opener(ca_file: Path | None) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(
        _RefuseRedirects(), urllib.request.HTTPSHandler(context=tls_context(ca_file))
    )


def _post(
    opener: urllib.request.OpenerDirector,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout: float,
) -> tuple[int, dict[str, str]]:
    # The scheme is checked in HttpCloudEventsSink.__init__ (http or https only).
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")  # noqa: S310
    try:
        with opener.open(request, timeout=timeout) as response:
            response.read()
            return int(response.status), dict(response.headers)
    except urllib.error.HTTPError as exc:
        with exc:  # the error is the answer, and holds its connection
            exc.read()
            return exc.code, dict(exc.headers or {})


class UrllibTransport:
    """POSTs with urllib, never following a redirect, in `max_connections` threads of its
    own.

    Its own threads: a receiver that never answers holds a thread for the timeout of
    each attempt, and in asyncio's default executor it would also hold the threads the
    ledger's fsync runs in. The CA bundle (default: the system's trust store) is loaded
    again when its file changes, as a rotated ConfigMap or Secret volume swaps it.
    """

    def __init__(self, *, ca_file: Path | None = None, max_connections: int = 8) -> None:
        self._current_opener: Callable[[], urllib.request.OpenerDirector]
        try:
            if ca_file is None:
                opener = _opener(None)
                self._current_opener = lambda: opener
            else:
                self._current_opener = _ReloadingFile(ca_file, _opener).current
        except OSError as exc:  # ssl.SSLError is an OSError too
            raise SinkConfigError(f"CA bundle {ca_file}: {exc}") from exc
        self._executor = ThreadPoolExecutor(
            max_workers=max_connections, thread_name_prefix="gpuyard-usage-http"
        )

    async def __call__(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> tuple[int, Mapping[str, str]]:
        # A CA bundle that no longer loads raises an OSError here: a failed attempt.
        opener = self._current_opener()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, _post, opener, url, body, headers, timeout
        )

    def close(self) -> None:
        # Threads stuck on a silent receiver end at their timeout; nobody waits for them.
        self._executor.shutdown(wait=False, cancel_futures=True)


def _header(headers: Mapping[str, str], wanted: str) -> str | None:
    for name, value in headers.items():
        if name.lower() == wanted:
            return value
    return None


def _retryable(status: int) -> bool:
    # A 3xx is retried: a receiver moving behind a load balancer redirects for a while.
    return 300 <= status < 400 or status in (408, 425, 429) or status >= 500


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = _header(headers, "retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


DEFAULT_MAX_ATTEMPTS = 4
DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_BACKOFF_MAX_SECONDS = 5.0


class HttpCloudEventsSink:
    """POSTs records as CloudEvents batches (`application/cloudevents-batch+json`), e.g.
    to OpenMeter's `POST /api/v1/events`.

    - Batches of at most `batch_size` events; `emit` returns when all are accepted (2xx).
    - A redirect is never followed: a 3xx is a failed attempt, and the error names its
      `Location`.
    - Network errors, 3xx, 408, 425, 429 and 5xx are retried up to `max_attempts` per
      batch with exponential backoff and full jitter: sleep uniform(0, min(cap, base *
      2**n)), or the server's `Retry-After` (seconds) when given, capped at
      `backoff_max`. Other 4xx raise `SinkRejectedError` at once. A receiver that never
      answers fails a batch after at most max_attempts x timeout + (max_attempts - 1) x
      backoff_max seconds (55 s with the defaults): `timeout` bounds each socket
      operation (connecting, and each wait for the answer).
    - Headers come from `headers_file` (`Name: value` lines, see `parse_header_file`),
      read again whenever the file changes, so a rotated Secret is used without a restart.
    - `https://` is verified against `ca_file`, or the system's trust store; `http://`
      only with `allow_insecure`, and never with credentials in the URL.
    - At most `max_in_flight` records are being delivered at any moment across concurrent
      emits; an emit that would exceed it raises `SinkQueueFullError` without sending
      anything, and the meter's mark holds the records meanwhile. An emit larger than
      `max_in_flight` can only ever go alone: it is sent at once when nothing is in
      flight, and otherwise waits for the deliveries in flight to finish, while newer
      emits are refused so that it cannot starve.
    """

    def __init__(
        self,
        url: str,
        *,
        source: str,
        event_type: str = DEFAULT_EVENT_TYPE,
        subject: Callable[[UsageRecord], str] | None = None,
        headers_file: Path | None = None,
        ca_file: Path | None = None,
        allow_insecure: bool = False,
        batch_size: int = 100,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_base: float = 0.5,
        backoff_max: float = DEFAULT_BACKOFF_MAX_SECONDS,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        max_in_flight: int = 50_000,
        max_connections: int = 8,
        transport: Transport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        _check_url(url, allow_insecure=allow_insecure, ca_file=ca_file)
        if not source:
            raise ValueError("a CloudEvents source is required and must be stable")
        if batch_size < 1 or max_attempts < 1 or max_in_flight < 1:
            raise ValueError("batch_size, max_attempts and max_in_flight must be >= 1")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.url = url
        self.source = source
        self.event_type = event_type
        self._subject = subject
        self._header_file: _ReloadingFile[dict[str, str]] | None = None
        if headers_file is not None:
            try:
                self._header_file = _ReloadingFile(headers_file, _read_header_file)
            except OSError as exc:
                raise SinkConfigError(f"headers file: {exc}") from exc
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        # A transport of the caller's (tests) replaces urllib, ca_file and max_connections.
        self._own_transport: UrllibTransport | None = None
        if transport is None:
            self._own_transport = transport = UrllibTransport(
                ca_file=ca_file, max_connections=max_connections
            )
        self._transport: Transport = transport
        self._sleep = sleep
        # Jitter only spreads retries out; it needs no cryptographic randomness.
        self._rng = rng or random.Random()  # noqa: S311
        self._in_flight = 0
        # An emit larger than max_in_flight that waits for the others to finish.
        self._alone: tuple[int, asyncio.Event] | None = None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def header_names(self) -> list[str]:
        """The names of the headers the file sets now (never their values)."""
        return sorted(self._header_file.current()) if self._header_file else []

    async def emit(self, records: Sequence[UsageRecord]) -> None:
        if not records:
            return
        count = len(records)
        ready: asyncio.Event | None = None
        if self._in_flight and self._in_flight + count > self.max_in_flight:
            if count <= self.max_in_flight or self._in_flight > self.max_in_flight:
                raise SinkQueueFullError(
                    f"{count} records would exceed {self.max_in_flight} in flight "
                    f"({self._in_flight} already)"
                )
            # Too large to share the bound with anyone: claim all of it now, so nothing
            # new is admitted while the deliveries in flight finish.
            ready = asyncio.Event()
            self._alone = (count, ready)
        self._in_flight += count
        try:
            if ready is not None:
                await ready.wait()
            for offset in range(0, count, self.batch_size):
                await self._send(records[offset : offset + self.batch_size])
        finally:
            self._in_flight -= count
            if ready is not None:
                self._alone = None
            elif self._alone is not None and self._in_flight == self._alone[0]:
                self._alone[1].set()

    def encode(self, records: Sequence[UsageRecord]) -> bytes:
        events = [
            to_cloudevent(r, source=self.source, event_type=self.event_type, subject=self._subject)
            for r in records
        ]
        return json.dumps(events, separators=(",", ":")).encode()

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Delay before retry number `attempt` (0-based)."""
        if retry_after is not None:
            return min(retry_after, self.backoff_max)
        ceiling = min(self.backoff_max, self.backoff_base * 2**attempt)
        return self._rng.uniform(0, ceiling)

    def _request_headers(self) -> dict[str, str]:
        headers = {"Content-Type": CLOUDEVENTS_BATCH_CONTENT_TYPE}
        if self._header_file is not None:
            try:
                headers.update(self._header_file.current())
            except (OSError, SinkConfigError) as exc:
                # Unreadable or malformed after a rotation: nothing is sent until it is
                # fixed; the mark keeps the records.
                raise SinkUnavailableError(f"usage sink headers: {exc}") from exc
        return headers

    async def _send(self, batch: Sequence[UsageRecord]) -> None:
        body = self.encode(batch)
        last = "no attempt"
        for attempt in range(self.max_attempts):
            headers = self._request_headers()
            retry_after = None
            try:
                status, answer = await self._transport(self.url, body, headers, self.timeout)
            except (OSError, TimeoutError) as exc:  # URLError and socket errors are OSErrors
                last = f"{type(exc).__name__}: {exc}"
            else:
                if 200 <= status < 300:
                    return
                if not _retryable(status):
                    raise SinkRejectedError(
                        f"{self.url} answered {status} to a batch of {len(batch)}"
                    )
                last = f"HTTP {status}"
                if status < 400:
                    location = _header(answer, "location") or "nowhere (no Location header)"
                    last += f" redirecting to {location}, not followed"
                retry_after = _retry_after(answer)
            if attempt + 1 < self.max_attempts:
                await self._sleep(self.backoff(attempt, retry_after))
        raise SinkUnavailableError(f"{self.url}: {self.max_attempts} attempts failed, last: {last}")

    async def aclose(self) -> None:
        if self._own_transport is not None:
            self._own_transport.close()


def _check_url(url: str, *, allow_insecure: bool, ca_file: Path | None) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None or parts.password is not None:
        # A URL is printed in errors and logs; credentials belong in the headers file.
        raise SinkConfigError("the usage sink URL holds credentials: send them as headers")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SinkConfigError(f"the usage sink URL must be http(s)://host...: {url!r}")
    if parts.scheme == "http" and not allow_insecure:
        raise SinkConfigError(
            f"refusing {url}: over http:// usage records and headers cross the network "
            "unencrypted. Use https://, or allow it explicitly (allow_insecure; "
            "GPUYARD_USAGE_HTTP_ALLOW_INSECURE=true; chart value usage.http.allowInsecure)"
        )
    if parts.scheme == "http" and ca_file is not None:
        raise SinkConfigError("a CA bundle only applies to an https:// usage sink URL")


# --------------------------------------------------------------------------- Prometheus


class PrometheusSink:
    """Counters of acknowledged usage on the operator's metrics registry:

    - `gpuyard_gpu_seconds_total{namespace, service, pool}`
    - `gpuyard_idle_gpu_seconds_total{namespace, service, pool}` (records with utilisation)
    - `gpuyard_starting_gpu_seconds_total{namespace, service, pool}` (cold starts)
    - `gpuyard_cost_total{namespace, service, pool, currency}` (a float: for dashboards)

    A counter is not idempotent, so the sink remembers the ids it counted and skips
    repeats. The memory covers records whose window ended within `dedupe_horizon_seconds`
    of the newest one seen; keep it above the meter's catch-up span (max windows per tick
    x window length). On restart the counters start from zero, which Prometheus reads as a
    counter reset; records re-emitted from the mark are counted again by the new process,
    so `increase()` across a restart may overcount by the windows between the last
    persisted mark and the crash. The ledger and the billing system are the record of
    truth; these counters are for dashboards and alerts.
    """

    def __init__(self, registry: CollectorRegistry, *, dedupe_horizon_seconds: int = 3600):
        self._gpu_seconds = Counter(
            "gpuyard_gpu_seconds",
            "GPU-seconds held by pods of a service, from acknowledged usage records.",
            ("namespace", "service", "pool"),
            registry=registry,
        )
        self._idle_gpu_seconds = Counter(
            "gpuyard_idle_gpu_seconds",
            "GPU-seconds paid for but idle, from records with a known utilisation.",
            ("namespace", "service", "pool"),
            registry=registry,
        )
        self._starting_gpu_seconds = Counter(
            "gpuyard_starting_gpu_seconds",
            "GPU-seconds held by pods still starting (bound, not ready yet): cold starts.",
            ("namespace", "service", "pool"),
            registry=registry,
        )
        self._cost = Counter(
            "gpuyard_cost",
            "Cost of GPU usage of a service, from acknowledged usage records.",
            ("namespace", "service", "pool", "currency"),
            registry=registry,
        )
        self._horizon = dedupe_horizon_seconds
        self._ids: set[str] = set()
        # The same ids grouped by window end (epoch s): pruning drops whole windows.
        self._by_end: dict[int, list[str]] = {}
        self._newest_end = 0

    def seen(self, record_id: str) -> bool:
        return record_id in self._ids

    async def emit(self, records: Sequence[UsageRecord]) -> None:
        for record in records:
            if record.id in self._ids:
                continue
            end = epoch_floor(record.end)
            self._ids.add(record.id)
            self._by_end.setdefault(end, []).append(record.id)
            self._newest_end = max(self._newest_end, end)
            labels = (record.namespace, record.service, record.pool)
            self._gpu_seconds.labels(*labels).inc(record.gpu_seconds)
            if record.idle_gpu_seconds is not None:
                self._idle_gpu_seconds.labels(*labels).inc(record.idle_gpu_seconds)
            if record.starting_gpu_seconds:
                self._starting_gpu_seconds.labels(*labels).inc(record.starting_gpu_seconds)
            # A float is fine here: counters are for dashboards, never for invoices.
            self._cost.labels(*labels, record.currency).inc(float(record.cost))
        self._prune()

    def _prune(self) -> None:
        horizon = self._newest_end - self._horizon
        for end in [end for end in self._by_end if end <= horizon]:
            self._ids.difference_update(self._by_end.pop(end))

    async def aclose(self) -> None:
        return None


# --------------------------------------------------------------------------- fan-out


class MultiSink:
    """Fans records out to several named sinks concurrently.

    Semantics: `emit` succeeds only when every sink has acknowledged every record, so the
    mark advances only then. When some fail, `MultiSinkError` names them; the sinks that
    succeeded keep their acknowledgement in memory, and the next emit of the same records
    (the meter re-cuts from the unchanged mark) skips them there. A ledger therefore does
    not grow by a copy of each record per retry while an HTTP receiver is down. The memory
    is released when a record has been acknowledged by all sinks, and is dropped
    wholesale past `max_remembered` ids (costing only duplicates, which ids absorb).
    """

    def __init__(self, sinks: Mapping[str, UsageSink], *, max_remembered: int = 200_000):
        if not sinks:
            raise ValueError("MultiSink needs at least one sink")
        self.sinks = dict(sinks)
        self._max_remembered = max_remembered
        self._acked: dict[str, set[str]] = {name: set() for name in self.sinks}

    async def emit(self, records: Sequence[UsageRecord]) -> None:
        if not records:
            return
        names = sorted(self.sinks)
        pending = {name: [r for r in records if r.id not in self._acked[name]] for name in names}
        results = await asyncio.gather(
            *(self._emit_one(name, pending[name]) for name in names), return_exceptions=True
        )
        failures: dict[str, BaseException] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result  # cancellation and exits are not sink failures
                failures[name] = result
            else:
                self._acked[name].update(r.id for r in pending[name])
        if failures:
            for ids in self._acked.values():
                if len(ids) > self._max_remembered:
                    ids.clear()
            raise MultiSinkError(failures)
        batch_ids = {r.id for r in records}
        for ids in self._acked.values():
            ids.difference_update(batch_ids)

    async def _emit_one(self, name: str, records: Sequence[UsageRecord]) -> None:
        if records:
            await self.sinks[name].emit(records)

    async def aclose(self) -> None:
        for name in sorted(self.sinks):
            await self.sinks[name].aclose()
