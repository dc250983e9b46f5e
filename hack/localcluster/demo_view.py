"""What the demo shows while it runs: a frame redrawn in place on a terminal, or plain log
lines when stdout is not a terminal (CI, a pipe, a test).

Rendering is pure (``render_frame`` and ``changes`` take data and return text); the two
writers only put that text on a stream. The frame fits 80 columns and 24 lines.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, TextIO

from localcluster.demo_story import Snapshot, Story, Verdict

WIDTH: Final = 80
HEIGHT: Final = 24
REASON_WIDTH: Final = 31
#: The service table's width: its columns and the spaces between them.
TABLE_WIDTH: Final = 10 + 4 + 4 + 4 + 5 + REASON_WIDTH + 6 + 7 + 7
# Short forms of the autoscaler's limiting factors (status.recommendation.limitedBy), so
# that the reason and what held it back fit one column.
LIMITS: Final = {
    "StabilizationWindow": "window",
    "ScaleToZeroDelay": "idle timer",
    "RateLimit": "rate limit",
    "MinReplicas": "min",
    "MaxReplicas": "max",
    "Capacity": "pool full",
    "Budget": "budget",
    "PodsNotReady": "not ready",
    "MetricsUnavailable": "no metrics",
    "NoWakeMetric": "no wake metric",
}


def clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def money(amount: Decimal) -> str:
    return f"{amount:.4f}"


def reason_text(reason: str | None, limited_by: str | None) -> str:
    if not reason:
        return "-"
    if limited_by:
        return f"{reason} ({LIMITS.get(limited_by, limited_by)})"
    return reason


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


@dataclass(frozen=True)
class Marks:
    """Characters for a verdict; ASCII unless the terminal speaks UTF-8."""

    ok: str = "ok"
    failed: str = "!!"
    waiting: str = ".."

    @classmethod
    def for_encoding(cls, encoding: str | None) -> Marks:
        if encoding and encoding.lower().replace("-", "") == "utf8":
            return cls("✓", "✗", "…")
        return cls()


def _verdict_line(verdict: Verdict, marks: Marks) -> str:
    if verdict.met is None:
        return f" {marks.waiting} {verdict.phase:<6} {verdict.title}"
    mark = marks.ok if verdict.met else marks.failed
    at = clock(verdict.at or 0)
    return f" {mark} {at:>5} {verdict.title}: {verdict.detail}"


def render_frame(
    snap: Snapshot,
    story: Story,
    *,
    profile: str,
    width: int = WIDTH,
    height: int = HEIGHT,
    marks: Marks | None = None,
) -> list[str]:
    """The live view: at most ``height`` lines of at most ``width`` characters."""
    marks = marks or Marks()
    phase = story.phase
    number = (story.phases.index(phase) + 1) if phase else 0
    title = f"gpuyard demo  {profile}  {clock(snap.t)}"
    if phase is not None and not story.done:
        title += f"  phase {number}/{len(story.phases)} {phase.name.upper()}"
        deadline = story.deadline()
        if deadline is not None and story.phase_elapsed(snap.t) > phase.min_seconds:
            title += f" (deadline {clock(deadline)})"
    elif story.done:
        title += "  story finished"
    lines = [title, _fit(phase.caption, width) if phase else "", operator_line(snap), ""]
    lines.append(f"{'POOL':<6} {'GPU TYPE':<10} {'GPUS':>5} {'ALLOCATED':>9} {'FREE':>5}  PRICE")
    for pool in snap.pools.values():
        price = f"{pool.price} {pool.currency}/GPU-h" if pool.price else ""
        lines.append(
            f"{pool.name:<6} {pool.gpu_type:<10} {pool.capacity:>5} {pool.allocated:>9} "
            f"{pool.available:>5}  {price}"
        )
    lines.append("")
    lines.append(
        f"{'SERVICE':<10} {'POOL':<4} {'LOAD':>4} {'GPU%':>4} {'READY':>5} "
        f"{'REASON (LIMITED BY)':<{REASON_WIDTH}} {'GPU-S':>6} {'COST':>7}"
    )
    notes = []
    for view in snap.services.values():
        util = "-" if view.utilization is None else f"{view.utilization:.0f}"
        ready = f"{view.ready}/{view.desired}"
        lines.append(
            f"{view.name:<10} {view.pool:<4} {view.load:>4.0f} {util:>4} {ready:>5} "
            f"{_fit(reason_text(view.reason, view.limited_by), REASON_WIDTH):<{REASON_WIDTH}} "
            f"{view.gpu_seconds:>6} {money(view.cost):>7}"
        )
        if view.capacity_limited:
            # The autoscaler's message ends with what the pool lacks; that part fits.
            lacks = view.capacity_message.rsplit("; ", 1)[-1]
            notes.append(_fit(f"{view.name} CapacityLimited: {lacks}", width))
    total = sum((v.cost for v in snap.services.values()), Decimal(0))
    currency = next((v.currency for v in snap.services.values() if v.currency), "")
    # Right-aligned under the COST column: the cost column ends at TABLE_WIDTH.
    lines.append(f"{('total ' + currency).strip():>{TABLE_WIDTH - 8}} {money(total):>7}")
    lines.extend(notes)
    lines.append("")
    events = [_fit(_verdict_line(v, marks), width) for v in story.verdicts]
    room = max(1, height - len(lines) - 1)
    if len(events) > room:
        events = events[-room:]
    lines.append("EXPECTED  (ready/desired replicas; load in GPU-% of demand; cost so far)")
    lines.extend(events)
    return [_fit(line, width) for line in lines[:height]]


def operator_line(snap: Snapshot) -> str:
    standbys = [name for name in snap.replicas if name != snap.leader]
    leads = f"{snap.leader} leads" if snap.leader else "no replica leads"
    return f"operator: {leads}; standing by: {', '.join(standbys) or 'none'}"


def changes(previous: Snapshot | None, snap: Snapshot) -> list[str]:
    """Plain-log lines for what changed since the previous snapshot."""
    out = []
    for name, view in snap.services.items():
        before = previous.services.get(name) if previous else None
        if before is not None and (before.desired, before.ready, before.reason) == (
            view.desired,
            view.ready,
            view.reason,
        ):
            continue
        util = "-" if view.utilization is None else f"{view.utilization:.0f}%"
        out.append(
            f"{name}: {view.ready}/{view.desired} ready/desired, "
            f"{reason_text(view.reason, view.limited_by)}, load {view.load:.0f}, GPU {util}, "
            f"cost {money(view.cost)} {view.currency}".rstrip()
        )
    return out


class LiveView:
    """Redraws the frame in place: cursor up over the previous frame, rewrite each line."""

    def __init__(self, out: TextIO, profile: str) -> None:
        self.out = out
        self.profile = profile
        self.marks = Marks.for_encoding(getattr(out, "encoding", None))
        self.drawn = 0

    def show(self, snap: Snapshot, story: Story) -> None:
        size = shutil.get_terminal_size((WIDTH, HEIGHT))
        lines = render_frame(
            snap,
            story,
            profile=self.profile,
            width=min(size.columns, 100),
            height=max(10, size.lines - 1),
            marks=self.marks,
        )
        buffer = f"\x1b[{self.drawn}F" if self.drawn else ""
        buffer += "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J"
        self.out.write("\x1b[?25l" + buffer)
        self.out.flush()
        self.drawn = len(lines)

    def log(self, message: str) -> None:
        """Said once the view is finished (the frame owns the screen until then)."""
        del message

    def close(self) -> None:
        self.out.write("\x1b[?25h")
        self.out.flush()


class PlainLog:
    """One line per event: phase starts, verdicts, changes of replicas or reason."""

    def __init__(self, out: TextIO, profile: str) -> None:
        self.out = out
        self.profile = profile
        self.previous: Snapshot | None = None
        self.phase: str | None = None
        self.reported: set[int] = set()

    def _line(self, t: float, text: str) -> None:
        self.out.write(f"[demo {clock(t):>5}] {text}\n")
        self.out.flush()

    def show(self, snap: Snapshot, story: Story) -> None:
        phase = story.phase
        if phase is not None and phase.name != self.phase:
            self.phase = phase.name
            self._line(snap.t, f"phase {phase.name}: {phase.caption}")
        if self.previous is None or self.previous.leader != snap.leader:
            self._line(snap.t, operator_line(snap))
        for line in changes(self.previous, snap):
            self._line(snap.t, line)
        for index, verdict in enumerate(story.verdicts):
            if verdict.met is not None and index not in self.reported:
                self.reported.add(index)
                self._line(snap.t, _verdict_line(verdict, Marks()).strip())
        self.previous = snap

    def log(self, message: str) -> None:
        self.out.write(f"[demo] {message}\n")
        self.out.flush()

    def close(self) -> None:
        self.out.flush()


def summary_lines(verdicts: Sequence[Verdict], marks: Marks | None = None) -> list[str]:
    marks = marks or Marks()
    return [_verdict_line(v, marks) for v in verdicts]
