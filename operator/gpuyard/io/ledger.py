"""Reading a usage ledger written by `LedgerFileSink`.

A ledger is JSON lines, one usage record per line, appended at least once per record:
a record re-emitted after a crash or a failed fan-out appears again with the same id.
Reading deduplicates by id (the first copy wins) and tolerates a torn last line — the
bytes of a write interrupted by a crash, never acknowledged and re-emitted later. Any
other unreadable line is corruption and raises, because silently skipping a record in
the middle would under-bill without a trace.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gpuyard.logic.metering import MeteringError, UsageRecord, record_from_line


class LedgerCorruptError(ValueError):
    def __init__(self, path: str, line_number: int, reason: str) -> None:
        self.path = path
        self.line_number = line_number
        super().__init__(f"{path}:{line_number}: {reason}")


@dataclass(frozen=True, slots=True)
class LedgerContents:
    records: tuple[UsageRecord, ...]
    """Unique records, in first-seen order."""
    duplicates: int = 0
    """Lines whose id was already seen (expected after retries and restarts)."""
    conflicts: tuple[str, ...] = field(default_factory=tuple)
    """Ids seen twice with different billed fields: a bug, since ids are deterministic."""
    torn_tail: bool = False
    """Whether an incomplete last line was ignored."""


def parse_ledger_lines(lines: Iterable[str], *, source: str = "<ledger>") -> LedgerContents:
    """Deduplicate ledger lines; `lines` keep their trailing newline (as file iteration
    yields them), which is how a torn last line is recognised."""
    by_id: dict[str, UsageRecord] = {}
    duplicates = 0
    conflicts: dict[str, None] = {}
    torn = False
    pending: tuple[int, str, str] | None = None
    for number, line in enumerate(lines, start=1):
        if pending is not None:
            raise LedgerCorruptError(source, pending[0], pending[2])
        if not line.strip():
            continue
        try:
            record = record_from_line(line)
        except MeteringError as exc:
            # Only the last line may be torn; decide once we know whether one follows.
            pending = (number, line, str(exc))
            continue
        if not line.endswith("\n"):
            # A parseable line without its newline was still cut short of being acked;
            # keeping it is safe because its id is deterministic, so we do.
            torn = True
        seen = by_id.get(record.id)
        if seen is None:
            by_id[record.id] = record
            continue
        duplicates += 1
        if seen.billing_fields() != record.billing_fields():
            conflicts[record.id] = None
    if pending is not None:
        number, line, reason = pending
        if line.endswith("\n"):
            raise LedgerCorruptError(source, number, reason)
        torn = True
    return LedgerContents(tuple(by_id.values()), duplicates, tuple(conflicts), torn)


def read_ledger(path: str | os.PathLike[str]) -> LedgerContents:
    """Read and deduplicate a ledger file. Raises OSError and LedgerCorruptError."""
    with Path(path).open(encoding="utf-8", newline="\n") as handle:
        return parse_ledger_lines(handle, source=str(path))
