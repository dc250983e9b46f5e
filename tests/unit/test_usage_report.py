"""Usage reports: filtering, grouping, renderings, charts and the `gpuyard usage` command."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import struct
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from xml.etree import ElementTree

import pytest
from matplotlib.dates import num2date

from gpuyard.logic.metering import (
    UsageRecord,
    record_to_line,
    with_utilization,
)
from gpuyard.logic.usage_report import (
    ReportFilter,
    cumulative_series,
    filter_records,
    parse_group_by,
    render_csv,
    render_json,
    render_table,
    service_series,
    summarize,
)
from gpuyard.report.figures import png_bytes, svg_text
from gpuyard.report.usage import render_html, usage_figure
from gpuyard.usage_cli import usage_command
from localcluster import sample_report
from record_support import T0, pod_records


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


def test_starting_gpu_seconds_are_summed() -> None:
    cold = replace(pod_records(uid="x", gpus=2, minutes=1)[0], starting_gpu_seconds=50)
    warm = pod_records(uid="y", gpus=1, minutes=1)[0]
    (row,) = summarize([cold, warm], ("namespace",)).rows
    assert row.starting_gpu_seconds == 50
    assert json.loads(render_json(summarize([cold])))["rows"][0]["starting_gpu_seconds"] == 50


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
        "starting_gpu_seconds",
    ]
    assert lines[2].split() == [
        "team-a", "llm", "USD", "120", "14400", "4.000000", "9.600000000", "0",
    ]  # fmt: skip
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


#: The fixture's services, as the legends name them (namespace/name, sorted).
SERVICES = ["team-a/llm", "team-a/sd", "team-b/llm"]


def test_service_series_has_one_cumulative_series_per_service(records: list[UsageRecord]) -> None:
    series = service_series(records)
    assert [s.name for s in series] == SERVICES
    # Each starts at zero at its own first window and ends at its own total.
    assert [(s.points[0].time, s.points[0].gpu_seconds) for s in series] == [(T0, 0)] * 3
    assert [s.points[-1].gpu_seconds for s in series] == [2 * 7200, 1800, 3600]
    assert dict(series[2].points[-1].cost) == {"EUR": Decimal("1.80")}
    later = pod_records(uid="c1", namespace="team-c", minutes=10, start_minute=30)
    assert service_series(later)[0].points[0].time == T0 + timedelta(minutes=30)


def test_usage_figure_draws_a_line_per_service_with_units(records: list[UsageRecord]) -> None:
    figure = usage_figure(records)
    usage_axes, cost_axes = figure.axes
    assert len(usage_axes.get_lines()) == len(SERVICES)
    assert [t.get_text() for t in usage_axes.get_legend().get_texts()] == SERVICES
    assert usage_axes.get_ylabel() == "GPU-hours"
    assert cost_axes.get_xlabel() == "Time (UTC)"
    # Two currencies: the cost axis names none, each cost line names its own.
    assert cost_axes.get_ylabel() == "Cost"
    assert [t.get_text() for t in cost_axes.get_legend().get_texts()] == [
        "team-a/llm (USD)",
        "team-a/sd (USD)",
        "team-b/llm (EUR)",
    ]
    # Each line ends at its service's GPU-hours: 2 GPUs x 2 h, 1 x 0.5 h, 1 x 1 h.
    assert [line.get_ydata()[-1] for line in usage_axes.get_lines()] == [4.0, 0.5, 1.0]
    assert [line.get_ydata()[-1] for line in cost_axes.get_lines()] == [9.6, 1.8, 1.8]
    # The y axis starts at zero and its top covers the highest line, with little room
    # to spare (matplotlib's 5 % margin).
    bottom, top = usage_axes.get_ylim()
    assert bottom == 0
    assert 4.0 < top <= 4.2 + 1e-9
    # The time axis spans the first window's start to the last window's end.
    first, last = (num2date(x) for x in cost_axes.get_xlim())
    assert first <= T0 < T0 + timedelta(hours=2) <= last


def test_usage_figure_of_one_currency_names_it_on_the_cost_axis(
    records: list[UsageRecord],
) -> None:
    usd = [r for r in records if r.currency == "USD"]
    _, cost_axes = usage_figure(usd).axes
    assert cost_axes.get_ylabel() == "Cost (USD)"
    assert [t.get_text() for t in cost_axes.get_legend().get_texts()] == SERVICES[:2]


def test_png_and_svg_come_from_the_same_figure(records: list[UsageRecord]) -> None:
    figure = usage_figure(records, width=800, height=500)
    png = png_bytes(figure)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (800, 500)
    root = ElementTree.fromstring(svg_text(figure))
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = {"".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert {*SERVICES, "GPU-hours", "Time (UTC)", "GPU usage"} <= texts
    # The same data gives the same files: no date, no random ids.
    assert png_bytes(usage_figure(records, width=800, height=500)) == png
    first, second = (svg_text(usage_figure(records, width=800, height=500)) for _ in range(2))
    assert first == second


def test_usage_figure_without_records_says_so() -> None:
    figure = usage_figure([])
    assert figure.axes == []
    assert [t.get_text() for t in figure.texts] == ["GPU usage", "no usage records match"]


def test_html_page_is_self_contained_and_escaped(records: list[UsageRecord]) -> None:
    hostile = [replace(r, service="<script>alert(1)</script>") for r in records[:3]]
    page = render_html([*records, *hostile])
    assert page.startswith("<!DOCTYPE html>")
    assert "<svg" in page
    assert "<path" in page
    assert "<?xml" not in page  # the SVG is inline, not a document of its own
    assert "<script" not in page
    assert "&lt;script&gt;" in page
    # The only URLs are the SVG's XML namespaces: nothing is fetched when the page opens.
    assert set(re.findall(r'([\w:]+)="(\w+://[^"]*)"', page)) == {
        ("xmlns", "http://www.w3.org/2000/svg"),
        ("xmlns:xlink", "http://www.w3.org/1999/xlink"),
    }
    assert page.count("://") == 2
    assert "no usage" in render_html([])


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
    svg = tmp_path / "usage.svg"
    assert usage_command([*argv, "--chart", str(svg)]) == 0
    legend = {
        "".join(t.itertext()) for t in ElementTree.parse(svg).iter() if t.tag.endswith("text")
    }
    assert {"team-a/llm", "team-a/sd"} <= legend


def test_a_chart_without_the_report_extra_is_a_one_line_error(
    tmp_path: Path,
    records: list[UsageRecord],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ledger, png = tmp_path / "usage.jsonl", tmp_path / "usage.png"
    write_ledger(ledger, records)
    # None in sys.modules is how Python says a module cannot be imported.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert usage_command(["--ledger", str(ledger), "--chart", str(png)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "pip install 'gpuyard[report]'" in err
    assert not png.exists()
    # Without --chart the report needs no plotting library.
    assert usage_command(["--ledger", str(ledger)]) == 0


def test_usage_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert usage_command(["--ledger", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        usage_command(["--ledger", "x", "--group-by", "colour"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        usage_command(["--ledger", "x", "--since", "yesterday"])


def test_the_readme_picture_is_what_make_report_image_draws(tmp_path: Path) -> None:
    drawn = tmp_path / "usage-report.png"
    assert sample_report.main(["--out", str(drawn)]) == 0
    assert drawn.read_bytes() == sample_report.IMAGE.read_bytes(), "run `make report-image`"
