"""Panels of lines over elapsed time, with phases marked: the demo's report chart.

The caller says what each panel shows (plain data: a label and (seconds, value) points
per line); this module only draws it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MultipleLocator

from gpuyard.report.figures import color_at, new_figure

#: Time-axis steps in seconds: the first that needs at most _MAX_X_TICKS ticks.
_X_STEPS: Final = (10, 15, 30, 60, 120, 300, 600, 1800, 3600)
_MAX_X_TICKS: Final = 10
_MARKER_COLOR: Final = "0.55"


@dataclass(frozen=True)
class Line:
    label: str
    points: Sequence[tuple[float, float]]
    """(seconds since the start, value)."""
    color: str | None = None
    """None: the panel's next colour in matplotlib's cycle."""


@dataclass(frozen=True)
class Panel:
    ylabel: str
    """What the panel shows, with its unit."""
    lines: Sequence[Line]


def elapsed_label(seconds: float) -> str:
    whole = max(0, round(seconds))
    return f"{whole // 60}:{whole % 60:02d}"


def timeline_figure(
    panels: Sequence[Panel],
    *,
    title: str,
    phase_starts: Sequence[tuple[float, str]] = (),
    xlabel: str = "Time since the start (m:ss)",
    width: int = 960,
    height: int = 760,
) -> Figure:
    """Stacked panels over one time axis. Each phase after the first gets a dashed line
    in every panel and its name above the top panel (the first phase starts the axis)."""
    figure = new_figure(width, height)
    figure.suptitle(title)
    every_axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    last = max([t for panel in panels for line in panel.lines for t, _ in line.points] + [60.0])
    for axes, panel in zip(every_axes, panels, strict=True):
        for index, line in enumerate(panel.lines):
            axes.plot(
                [t for t, _ in line.points],
                [value for _, value in line.points],
                color=line.color or color_at(index),
                label=line.label,
            )
        for t, _ in phase_starts[1:]:
            axes.axvline(t, color=_MARKER_COLOR, linestyle="--", linewidth=0.8)
        axes.set_ylabel(panel.ylabel)
        axes.set_ylim(bottom=0)
        axes.grid(axis="y", color="0.9")
        axes.legend(loc="upper left", fontsize="small")
    top = every_axes[0]
    for t, name in phase_starts[1:]:
        # x in data units, y just above the axes' frame.
        top.text(t, 1.02, name, transform=top.get_xaxis_transform(), color="0.3", fontsize="small")
    bottom = every_axes[-1]
    step = next((s for s in _X_STEPS if last / s <= _MAX_X_TICKS), _X_STEPS[-1])
    bottom.xaxis.set_major_locator(MultipleLocator(step))
    bottom.xaxis.set_major_formatter(FuncFormatter(lambda t, _: elapsed_label(t)))
    bottom.set_xlim(0, last)
    bottom.set_xlabel(xlabel)
    return figure
