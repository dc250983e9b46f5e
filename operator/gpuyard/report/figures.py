"""One matplotlib Figure, exported as PNG bytes, SVG text or SVG to inline in HTML."""

from __future__ import annotations

import io
from typing import Final

import matplotlib as mpl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: Pixels per inch: a figure of `width` x `height` pixels is width/DPI x height/DPI inches.
DPI: Final = 100
#: The colours of matplotlib's default cycle ("C0" to "C9"), named by index so that one
#: service keeps its colour across the panels of a figure.
_CYCLE_LENGTH: Final = 10
#: No creation date nor tool version in the files: the same data gives the same bytes.
_SVG_METADATA: Final = {"Creator": None, "Date": None, "Format": None, "Type": None}
_PNG_METADATA: Final = {"Software": None}


def color_at(index: int) -> str:
    return f"C{index % _CYCLE_LENGTH}"


def new_figure(width: int, height: int) -> Figure:
    """A figure of exactly `width` x `height` pixels in PNG, on the Agg canvas."""
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata=_PNG_METADATA)
    return buffer.getvalue()


def svg_text(figure: Figure) -> str:
    """A standalone SVG document."""
    buffer = io.StringIO()
    # Text stays text (searchable, escaped like any XML text, a fraction of the size of
    # glyph outlines), and element ids come from a fixed salt, so the same figure gives the
    # same file. The SVG writer reads both from rcParams only; the context restores them.
    with mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": "gpuyard"}):
        figure.savefig(buffer, format="svg", metadata=_SVG_METADATA)
    return buffer.getvalue()


def inline_svg(figure: Figure) -> str:
    """The `<svg>` element alone, without the XML declaration and DOCTYPE that a
    standalone file carries and an HTML page must not."""
    document = svg_text(figure)
    return document[document.index("<svg") :]
