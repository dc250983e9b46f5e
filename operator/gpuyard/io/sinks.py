"""Usage sinks: where acknowledged usage records go.

Every sink has one coroutine, `emit(records)`, that returns only once the records are
durably accepted and raises `SinkError` otherwise; the meter advances a service's mark
only after `emit` returns. The interface is async because the operator runs on Kopf's
event loop: an HTTP sink backing off for minutes must not block it, and blocking work
(fsync, urllib) runs in a worker thread via `asyncio.to_thread`.

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
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

from prometheus_client import CollectorRegistry, Counter

from gpuyard.logic.metering import (
    UsageRecord,
    epoch_floor,
    format_time,
    record_to_json,
    record_to_line,
)

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


Transport = Callable[
    [str, bytes, Mapping[str, str], float], Awaitable[tuple[int, Mapping[str, str]]]
]
"""(url, body, headers, timeout) -> (status, response headers); raises OSError on I/O."""


def _urllib_post(
    url: str, body: bytes, headers: Mapping[str, str], timeout: float
) -> tuple[int, dict[str, str]]:
    # The scheme is checked in HttpCloudEventsSink.__init__ (http or https only).
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            response.read()
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code, dict(exc.headers or {})


async def urllib_transport(
    url: str, body: bytes, headers: Mapping[str, str], timeout: float
) -> tuple[int, Mapping[str, str]]:
    # urllib in a thread rather than aiohttp: one small POST per batch does not need a
    # session's lifecycle, and the standard library is always there.
    return await asyncio.to_thread(_urllib_post, url, body, headers, timeout)


def _retryable(status: int) -> bool:
    return status in (408, 425, 429) or status >= 500


def _retry_after(headers: Mapping[str, str]) -> float | None:
    for name, value in headers.items():
        if name.lower() == "retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None  # an HTTP date: fall back to our own backoff
    return None


class HttpCloudEventsSink:
    """POSTs records as CloudEvents batches (`application/cloudevents-batch+json`), e.g.
    to OpenMeter's `POST /api/v1/events`.

    - Batches of at most `batch_size` events; `emit` returns when all are accepted (2xx).
    - Network errors, 408, 425, 429 and 5xx are retried up to `max_attempts` per batch
      with exponential backoff and full jitter: sleep uniform(0, min(cap, base * 2**n)),
      or the server's `Retry-After` (seconds) when given, capped at `backoff_max`.
      Other 4xx raise `SinkRejectedError` at once.
    - At most `max_in_flight` records are being delivered at any moment across concurrent
      emits; an emit that would exceed it raises `SinkQueueFullError` without sending
      anything. The meter's mark holds the records meanwhile, so nothing is lost; keep
      `max_in_flight` above the largest tick (see MeterConfig.max_windows_per_tick).
    """

    def __init__(
        self,
        url: str,
        *,
        source: str,
        event_type: str = DEFAULT_EVENT_TYPE,
        headers: Mapping[str, str] | None = None,
        subject: Callable[[UsageRecord], str] | None = None,
        batch_size: int = 100,
        max_attempts: int = 8,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        timeout: float = 10.0,
        max_in_flight: int = 50_000,
        transport: Transport = urllib_transport,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the usage sink URL must be http(s): {url!r}")
        if not source:
            raise ValueError("a CloudEvents source is required and must be stable")
        if batch_size < 1 or max_attempts < 1 or max_in_flight < 1:
            raise ValueError("batch_size, max_attempts and max_in_flight must be >= 1")
        self.url = url
        self.source = source
        self.event_type = event_type
        self._headers = {"Content-Type": CLOUDEVENTS_BATCH_CONTENT_TYPE, **(headers or {})}
        self._subject = subject
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self._transport = transport
        self._sleep = sleep
        # Jitter only spreads retries out; it needs no cryptographic randomness.
        self._rng = rng or random.Random()  # noqa: S311
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def emit(self, records: Sequence[UsageRecord]) -> None:
        if not records:
            return
        if self._in_flight + len(records) > self.max_in_flight:
            raise SinkQueueFullError(
                f"{len(records)} records would exceed {self.max_in_flight} in flight "
                f"({self._in_flight} already)"
            )
        self._in_flight += len(records)
        try:
            for offset in range(0, len(records), self.batch_size):
                await self._send(records[offset : offset + self.batch_size])
        finally:
            self._in_flight -= len(records)

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

    async def _send(self, batch: Sequence[UsageRecord]) -> None:
        body = self.encode(batch)
        last = "no attempt"
        for attempt in range(self.max_attempts):
            retry_after = None
            try:
                status, headers = await self._transport(self.url, body, self._headers, self.timeout)
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
                retry_after = _retry_after(headers)
            if attempt + 1 < self.max_attempts:
                await self._sleep(self.backoff(attempt, retry_after))
        raise SinkUnavailableError(f"{self.url}: {self.max_attempts} attempts failed, last: {last}")

    async def aclose(self) -> None:
        return None


# --------------------------------------------------------------------------- Prometheus


class PrometheusSink:
    """Counters of acknowledged usage on the operator's metrics registry:

    - `gpuyard_gpu_seconds_total{namespace, service, pool}`
    - `gpuyard_idle_gpu_seconds_total{namespace, service, pool}` (records with utilisation)
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
