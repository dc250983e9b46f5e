"""The demo's report chart, drawn by gpuyard.report.timeline from snapshots and records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from xml.etree import ElementTree

from matplotlib.axes import Axes

from gpuyard.logic.metering import UsageRecord
from gpuyard.report.figures import png_bytes, svg_text
from gpuyard.report.timeline import elapsed_label
from localcluster.demo_report import report_figure
from localcluster.demo_story import ServiceView, Snapshot

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SERVICES = ("chat", "embeddings")
PHASES = [(0.0, "setup"), (30.0, "ramp"), (90.0, "spike")]


def record(service: str, second: int, cost: str) -> UsageRecord:
    start = T0 + timedelta(seconds=second)
    return UsageRecord(
        id=f"{service}-{second}", cluster_id="demo", namespace="demo", service=service,
        pool="a100", gpu_type="a100-80gb", pod=f"{service}-1", pod_uid="u", gpus=1,
        start=start, end=start + timedelta(seconds=5), seconds=5, gpu_seconds=5,
        unit_price=Decimal("2.50"), cost=Decimal(cost), currency="USD",
    )  # fmt: skip


def snapshots() -> list[Snapshot]:
    return [
        Snapshot(
            float(t),
            {
                "chat": ServiceView("chat", load=min(t * 5.0, 600.0), ready=1 + t // 30),
                "embeddings": ServiceView("embeddings", load=150.0, ready=2),
            },
            {},
        )
        for t in range(0, 121, 5)
    ]


def drawn(axes: Axes) -> list[str]:
    """The labels of the data lines (matplotlib names unlabelled lines `_child...`)."""
    return [line.get_label() for line in axes.get_lines() if not line.get_label().startswith("_")]


def legend(axes: Axes) -> list[str]:
    return [text.get_text() for text in axes.get_legend().get_texts()]


def test_the_demo_chart_has_a_line_per_service_in_each_panel_and_the_phases_marked() -> None:
    records = [record("chat", s, "0.01") for s in range(0, 120, 5)] + [
        record("embeddings", 0, "0.02")
    ]
    figure = report_figure(
        snapshots(), records, T0, PHASES, namespace="demo", services=SERVICES, title="demo"
    )
    load, replicas, cost = figure.axes
    names = ["demo/chat", "demo/embeddings"]
    assert drawn(load) == legend(load) == names
    assert drawn(replicas) == legend(replicas) == names
    # Each service's cost line names its final amount; the total comes last.
    assert legend(cost) == ["demo/chat 0.2400", "demo/embeddings 0.0200", "total 0.2600"]
    assert [load.get_ylabel(), replicas.get_ylabel(), cost.get_ylabel()] == [
        "Load (GPU-% of demand)",
        "Ready replicas",
        "Cumulative cost (USD)",
    ]
    assert cost.get_xlabel() == "Time since the story began (m:ss)"
    # The top of each panel covers its highest line; time runs from 0 to the last point.
    assert load.get_ylim()[0] == 0
    assert 600 <= load.get_ylim()[1] <= 630
    assert 5 <= replicas.get_ylim()[1] <= 5.3
    assert cost.get_xlim() == (0.0, 120.0)
    # Phases after the first: a dashed line in every panel, the name above the top one.
    for axes in figure.axes:
        markers = [line for line in axes.get_lines() if line.get_label().startswith("_")]
        assert [line.get_xdata()[0] for line in markers] == [30.0, 90.0]
    assert [text.get_text() for text in load.texts] == ["ramp", "spike"]
    # 120 s: a tick every 15 s, in minutes and seconds.
    ticks = [t for t in cost.get_xticks() if 0 <= t <= 120]
    assert ticks == list(range(0, 121, 15))
    assert cost.xaxis.get_major_formatter()(75, 5) == "1:15"


def test_the_demo_chart_is_960_by_760_pixels_in_png_and_parses_as_svg() -> None:
    figure = report_figure(snapshots(), [], T0, PHASES, namespace="demo", services=SERVICES)
    png = png_bytes(figure)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(png[16:20]), int.from_bytes(png[20:24])) == (960, 760)
    root = ElementTree.fromstring(svg_text(figure))
    texts = {"".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert {"demo/chat", "demo/embeddings", "Ready replicas", "ramp"} <= texts


def test_elapsed_time_reads_as_minutes_and_seconds() -> None:
    assert [elapsed_label(s) for s in (0, 59.6, 61, 600, -3)] == [
        "0:00",
        "1:00",
        "1:01",
        "10:00",
        "0:00",
    ]
