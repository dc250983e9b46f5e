"""Usage reports: filtering, grouping, renderings, charts and the `gpuyard usage` command."""

from __future__ import annotations

import csv
import io
import itertools
import json
import struct
import zlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from gpuyard.logic.metering import (
    PodLifetime,
    PricePoint,
    UsageRecord,
    cut_records,
    record_to_line,
    with_utilization,
)
from gpuyard.logic.usage_report import (
    ReportFilter,
    chart_model,
    cumulative_series,
    filter_records,
    parse_group_by,
    render_csv,
    render_html,
    render_json,
    render_png,
    render_table,
    summarize,
)
from gpuyard.usage_cli import usage_command

T0 = datetime(2024, 5, 1, 23, 0, tzinfo=UTC)


def pod_records(
    *,
    uid: str,
    namespace: str = "team-a",
    service: str = "llm",
    pool: str = "a100",
    gpus: int = 1,
    price: str = "2.40",
    currency: str = "USD",
    minutes: int = 120,
    start_minute: int = 0,
) -> list[UsageRecord]:
    life = PodLifetime(
        cluster_id="c1",
        pod_uid=uid,
        pod_name=f"{service}-{uid}",
        namespace=namespace,
        service=service,
        pool=pool,
        gpu_type=f"{pool}-gpu",
        gpus=gpus,
        bound_at=T0 + timedelta(minutes=start_minute),
        ended_at=T0 + timedelta(minutes=start_minute + minutes),
        prices=(PricePoint(T0, Decimal(price)),),
        currency=currency,
    )
    return cut_records(life, None, T0 + timedelta(days=2))


@pytest.fixture
def records() -> list[UsageRecord]:
    return [
        *pod_records(uid="a1", gpus=2),  # 23:00 to 01:00, two days
        *pod_records(uid="a2", service="sd", pool="h100", price="3.60", minutes=30),
        *pod_records(
            uid="b1", namespace="team-b", pool="h100", currency="EUR", price="1.80", minutes=60
        ),
    ]


# --------------------------------------------------------------------------- filter and group


def test_filter_by_namespace_service_pool_and_half_open_time_range(
    records: list[UsageRecord],
) -> None:
    assert {r.pod_uid for r in filter_records(records, ReportFilter(namespace="team-b"))} == {"b1"}
    assert {r.pod_uid for r in filter_records(records, ReportFilter(service="sd"))} == {"a2"}
    assert {r.pod_uid for r in filter_records(records, ReportFilter(pool="h100"))} == {"a2", "b1"}
    midnight = datetime(2024, 5, 2, tzinfo=UTC)
    before = filter_records(records, ReportFilter(until=midnight))
    after = filter_records(records, ReportFilter(since=midnight))
    assert len(before) + len(after) == len(records)
    assert all(r.start < midnight for r in before)
    assert {r.pod_uid for r in after} == {"a1"}


def test_summary_groups_and_never_adds_up_currencies(records: list[UsageRecord]) -> None:
    report = summarize(records, ("namespace",))
    rows = {(r.group, r.currency): r for r in report.rows}
    assert set(rows) == {(("team-a",), "USD"), (("team-b",), "EUR")}
    team_a = rows[("team-a",), "USD"]
    assert (team_a.gpu_seconds, team_a.records) == (2 * 7200 + 1800, 120 + 30)
    assert team_a.cost == Decimal("9.60") + Decimal("1.80")  # 4 GPU-h x 2.40 + 0.5 x 3.60
    assert team_a.gpu_hours == Decimal("4.500000")
    assert [(t.currency, t.cost) for t in report.totals] == [
        ("EUR", Decimal("1.80")),
        ("USD", Decimal("11.40")),
    ]


def test_summary_by_day_and_hour_uses_window_start_in_utc(records: list[UsageRecord]) -> None:
    usd = [r for r in records if r.currency == "USD"]
    by_day = summarize(usd, ("day",))
    assert [(r.group, r.gpu_seconds) for r in by_day.rows] == [
        (("2024-05-01",), 2 * 3600 + 1800),
        (("2024-05-02",), 2 * 3600),
    ]
    by_hour = summarize(usd, ("service", "hour"))
    assert [r.group for r in by_hour.rows] == [
        ("llm", "2024-05-01T23:00Z"),
        ("llm", "2024-05-02T00:00Z"),
        ("sd", "2024-05-01T23:00Z"),
    ]


def test_utilisation_is_weighted_by_gpu_seconds_and_idle_is_summed() -> None:
    big = pod_records(uid="x", gpus=3, minutes=1)[0]
    small = pod_records(uid="y", gpus=1, minutes=1)[0]
    unmeasured = pod_records(uid="z", gpus=1, minutes=1)[0]
    report = summarize(
        [with_utilization(big, Decimal(80)), with_utilization(small, Decimal(0)), unmeasured],
        ("namespace",),
    )
    (row,) = report.rows
    assert row.avg_utilization == Decimal("60.00")  # (180 x 80 + 60 x 0) / 240
    assert row.idle_gpu_seconds == 36 + 60
    assert summarize([unmeasured]).rows[0].avg_utilization is None


def test_group_by_is_validated() -> None:
    assert parse_group_by(" pool, day ") == ("pool", "day")
    with pytest.raises(ValueError, match="cannot group by colour"):
        parse_group_by("pool,colour")
    with pytest.raises(ValueError, match="repeat"):
        parse_group_by("pool,pool")


# --------------------------------------------------------------------------- renderings


def test_table_is_aligned_with_totals(records: list[UsageRecord]) -> None:
    text = render_table(summarize(records, ("namespace", "service")))
    lines = text.splitlines()
    assert lines[0].split() == [
        "namespace",
        "service",
        "currency",
        "records",
        "gpu_seconds",
        "gpu_hours",
        "cost",
        "idle_gpu_seconds",
        "avg_utilization",
    ]
    assert lines[2].split() == ["team-a", "llm", "USD", "120", "14400", "4.000000", "9.600000000"]
    assert [line.split()[0] for line in lines if line.startswith("TOTAL")] == ["TOTAL", "TOTAL"]
    # Numbers are right-aligned: the gpu_seconds column ends at the same offset.
    ends = {
        line.index(cell) + len(cell) for line, cell in ((lines[2], "14400"), (lines[3], "1800"))
    }
    assert len(ends) == 1
    assert render_table(summarize([])).endswith("(no usage records match)\n")


def test_csv_and_json_keep_exact_decimals(records: list[UsageRecord]) -> None:
    report = summarize(records, ("pool",))
    rows = list(csv.DictReader(io.StringIO(render_csv(report))))
    assert [(r["pool"], r["currency"], r["cost"]) for r in rows] == [
        ("a100", "USD", "9.600000000"),
        ("h100", "EUR", "1.800000000"),
        ("h100", "USD", "1.800000000"),
    ]
    assert rows[0]["start"] == "2024-05-01T23:00:00Z"
    document = json.loads(render_json(report))
    assert document["group_by"] == ["pool"]
    assert document["rows"][0]["gpu_hours"] == "4.000000"
    assert document["totals"][1] == document["totals"][1] | {
        "currency": "USD",
        "cost": "11.400000000",
    }


# --------------------------------------------------------------------------- charts


def test_cumulative_series_is_monotone_and_ends_at_the_totals(records: list[UsageRecord]) -> None:
    points = cumulative_series(records)
    assert points[0].gpu_seconds == 0
    assert points[0].time == T0
    assert all(a.gpu_seconds <= b.gpu_seconds for a, b in itertools.pairwise(points))
    assert points[-1].gpu_seconds == sum(r.gpu_seconds for r in records)
    assert dict(points[-1].cost) == {"EUR": Decimal("1.80"), "USD": Decimal("11.40")}
    thinned = cumulative_series(records, max_points=10)
    assert (len(thinned), thinned[0], thinned[-1]) == (10, points[0], points[-1])


def test_chart_model_keeps_lines_inside_their_panels(records: list[UsageRecord]) -> None:
    model = chart_model(records, width=800, height=500)
    assert [p.title for p in model.panels] == ["Cumulative GPU-hours", "Cumulative cost"]
    assert [s.name for s in model.panels[1].series] == ["cost EUR", "cost USD"]
    for panel in model.panels:
        for series in panel.series:
            for x, y in series.points:
                assert panel.left <= x <= panel.left + panel.width
                assert panel.top <= y <= panel.top + panel.height
        assert float(panel.y_ticks[-1][1]) >= 0
    gpu_hours = model.panels[0]
    # 5.5 GPU-hours in all: ticks on a 1/2/2.5/5 grid reach just past it.
    assert [label for _, label in gpu_hours.y_ticks] == ["0", "2", "4", "6"]
    assert gpu_hours.series[0].points[-1][1] == pytest.approx(gpu_hours.top + gpu_hours.height / 12)


def test_html_page_is_self_contained_and_escaped(records: list[UsageRecord]) -> None:
    hostile = [replace(r, service="<script>alert(1)</script>") for r in records[:3]]
    page = render_html([*records, *hostile])
    assert page.startswith("<!DOCTYPE html>")
    assert "<svg" in page
    assert "<polyline" in page
    assert "<script" not in page
    assert "&lt;script&gt;" in page
    # The only URL is the SVG namespace: nothing is fetched when the page opens.
    assert page.count("://") == 1
    assert "http://www.w3.org/2000/svg" in page
    assert "no usage" in render_html([])


def _png_pixels(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat, size = 8, b"", (0, 0)
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + body)
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
            assert body[8:] == bytes([8, 2, 0, 0, 0])  # 8-bit RGB
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    return size[0], size[1], zlib.decompress(idat)


def test_png_is_a_valid_rgb_image_with_the_series_drawn(records: list[UsageRecord]) -> None:
    model = chart_model(records, width=320, height=240)
    width, height, raw = _png_pixels(render_png(model))
    assert (width, height) == (320, 240)
    assert len(raw) == height * (1 + 3 * width)
    x, y = model.panels[0].series[0].points[-1]
    stride = 1 + 3 * width
    pixel = raw[round(y) * stride + 1 + round(x) * 3 : round(y) * stride + 4 + round(x) * 3]
    assert tuple(pixel) == model.panels[0].series[0].color


# --------------------------------------------------------------------------- command


def write_ledger(path: Path, records: list[UsageRecord], tail: str = "") -> None:
    path.write_text("".join(record_to_line(r) + "\n" for r in records) + tail)


def test_usage_command_reports_from_a_ledger(
    tmp_path: Path, records: list[UsageRecord], capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = tmp_path / "usage.jsonl"
    write_ledger(ledger, [*records, *records[:5]], tail='{"torn')
    chart, png = tmp_path / "usage.html", tmp_path / "usage.png"
    argv = ["--ledger", str(ledger), "--namespace", "team-a", "--group-by", "service,pool"]
    assert usage_command([*argv, "--format", "json", "--chart", str(chart)]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)["rows"]
    assert [(r["service"], r["pool"], r["cost"]) for r in rows] == [
        ("llm", "a100", "9.600000000"),
        ("sd", "h100", "1.800000000"),
    ]
    assert "incomplete last line" in err
    assert chart.read_text().startswith("<!DOCTYPE html>")
    assert usage_command([*argv, "--since", "2024-05-02", "--chart", str(png)]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines()[2].split()[:4] == ["llm", "a100", "USD", "60"]
    assert png.read_bytes().startswith(b"\x89PNG")


def test_usage_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert usage_command(["--ledger", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        usage_command(["--ledger", "x", "--group-by", "colour"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        usage_command(["--ledger", "x", "--since", "yesterday"])
