"""``make demo`` end to end, in its short form, plus the demo's pure parts.

The end-to-end test runs ``hack/demo.py --profile short`` as a subprocess: it brings up a
cluster of its own, named ``demo`` but kept in a temporary state directory, so it collides
neither with a developer's running demo nor with the test session's cluster (which it does
not use). It checks the exit status and the report: a valid PNG, the HTML page, the usage
table, and a cost line that equals the ledger's total.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from gpuyard.api.formats import format_decimal
from gpuyard.api.service import AIService
from gpuyard.io.ledger import read_ledger
from gpuyard.logic.metering import UsageRecord
from localcluster.cluster import REPO_ROOT
from localcluster.demo_report import StatusUsage, check_billing, cost_curves
from localcluster.demo_story import (
    PROFILES,
    SERVICES,
    PoolView,
    ScalesDownAfterWindow,
    ServiceView,
    Snapshot,
    Story,
    phases,
)
from localcluster.demo_view import render_frame

# --- the whole demo --------------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG whose chunks and image data are all intact."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks, idat = 8, [], b""
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append(kind)
        if kind == b"IDAT":
            idat += body
        offset += 12 + length
    assert chunks[0] == b"IHDR"
    assert chunks[-1] == b"IEND"
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    assert (depth, color) == (8, 6)  # 8-bit RGBA, as matplotlib's Agg writes it
    assert len(zlib.decompress(idat)) == height * (1 + 4 * width)
    return width, height


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_short_demo_tells_the_whole_story(tmp_path: Path) -> None:
    out, state_dir = tmp_path / "out", tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "hack")}
    result = subprocess.run(
        [
            sys.executable, str(REPO_ROOT / "hack" / "demo.py"), "--profile", "short",
            "--out", str(out), "--state-dir", str(state_dir), "--plain",
        ],
        env=env, capture_output=True, text=True, timeout=840, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    log = f"stdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 0, log
    # It stopped everything it started: the cluster's state directory is gone.
    assert not state_dir.exists(), log

    width, height = png_size((out / "demo-report.png").read_bytes())
    assert (width, height) == (960, 760)
    page = (out / "demo-report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<svg" in page
    assert "MISSED" not in page

    ledger = read_ledger(out / "ledger.jsonl")
    assert not ledger.conflicts
    total = format_decimal(sum((r.cost for r in ledger.records), Decimal(0)))
    assert {r.service for r in ledger.records} == {"chat", "embeddings", "finetune"}
    table = (out / "usage.txt").read_text()
    total_line = next(line for line in table.splitlines() if line.startswith("TOTAL"))
    assert total in total_line.split(), table
    assert f"cost: report {total} USD, ledger {total} USD" in result.stdout, log

    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True
    assert all(v["met"] for v in summary["verdicts"])
    # Two replicas: the leader was killed in the spike, and the other one took over.
    [failover] = [v for v in summary["verdicts"] if "is killed" in v["title"]]
    assert failover["phase"] == "spike"
    killed = failover["title"].split()[2]
    successor = failover["detail"].split()[0]
    assert {killed, successor} == {"replica-a", "replica-b"}, failover
    assert f"operator: {killed} leads; standing by: {successor}" in result.stdout, log
    assert f"operator: {successor} leads; standing by: {killed}" in result.stdout, log
    # The report's paths are the last lines.
    last = result.stdout.strip().splitlines()[-4:]
    assert [line.split(":")[0] for line in last] == ["report", "chart", "usage", "ledger"]


def test_a_second_demo_on_the_same_state_dir_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(
        json.dumps({
            "name": "demo", "state_dir": str(tmp_path), "kubeconfig": "k",
            "apiserver_url": "", "prometheus_url": "", "dcgm_sim_url": "",
            "prometheus_targets_dir": "", "topology": "", "kubernetes_version": "",
            "pids": {"etcd": os.getpid()},
        })
    )  # fmt: skip
    result = subprocess.run(
        [
            sys.executable, str(REPO_ROOT / "hack" / "demo.py"), "--plain",
            "--state-dir", str(tmp_path), "--out", str(tmp_path / "out"),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "hack")},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "'demo' cluster already runs" in result.stderr
    assert f"--state-dir {tmp_path} down" in result.stderr


# --- the pure parts: script, view, bill ------------------------------------------------------


def snapshot(t: float, **replicas: int) -> Snapshot:
    services = {
        name: ServiceView(name, pool="a100", desired=count, ready=count, replicas=count)
        for name, count in replicas.items()
    }
    return Snapshot(t, services, {"a100": PoolView("a100", capacity=16)})


def test_a_scale_down_before_the_window_is_a_failure() -> None:
    expectation = ScalesDownAfterWindow("chat", 1, window=20)
    assert expectation.observe(snapshot(100, chat=6), 100) is None
    outcome = expectation.observe(snapshot(105, chat=3), 100)
    assert outcome is not None
    assert not outcome.met
    assert "before its 20 s window" in outcome.detail


def test_a_scale_down_after_the_window_is_met() -> None:
    expectation = ScalesDownAfterWindow("chat", 1, window=20)
    assert expectation.observe(snapshot(100, chat=6), 100) is None
    assert expectation.observe(snapshot(119, chat=6), 100) is None
    outcome = expectation.observe(snapshot(121, chat=1), 100)
    assert outcome is not None
    assert outcome.met
    assert "6 -> 1" in outcome.detail


def test_an_expectation_not_met_by_its_deadline_fails_and_the_story_goes_on() -> None:
    story = Story(phases(PROFILES["short"]))
    t = 0.0
    while not story.done and t < 1000:
        story.step(snapshot(t, chat=1, embeddings=0, finetune=0))
        t += 1
    assert story.done
    failed = {v.title for v in story.failures}
    assert "chat runs 1 ready replica(s)" not in failed
    assert any(title.startswith("embeddings runs 2") for title in failed)
    # Every phase ran, each with its loads.
    assert [name for _, name in story.starts] == ["setup", "ramp", "spike", "quiet", "wake", "fill"]
    assert story.loads["finetune"] == 800


def test_the_live_view_names_the_leader_and_the_standbys() -> None:
    story = Story(phases(PROFILES["short"]))
    snap = Snapshot(1.0, {}, {}, leader="replica-b", replicas=("replica-a", "replica-b"))
    lines = render_frame(snap, story, profile="short")
    assert "operator: replica-b leads; standing by: replica-a" in lines
    leaderless = render_frame(replace(snap, leader=""), story, profile="short")
    assert "operator: no replica leads; standing by: replica-a, replica-b" in leaderless


def test_the_live_view_fits_an_80x24_terminal() -> None:
    story = Story(phases(PROFILES["short"]))
    reasons = ["MetricBelowTarget", "DemandWakesFromZero", "MetricAboveTarget"]
    views = {
        name: ServiceView(
            name,
            pool="a100",
            load=1000,
            utilization=83.4,
            desired=6,
            ready=5,
            reason=reason,
            limited_by="StabilizationWindow",
            capacity_limited=True,
            capacity_message="x" * 200,
            gpu_seconds=123456,
            cost=Decimal("12.345678"),
            currency="USD",
        )
        for name, reason in zip(("chat", "embeddings", "finetune"), reasons, strict=True)
    }
    pools = {name: PoolView(name, "a100-80gb", 16, 12, 4, "2.50", "USD") for name in ("a100", "l4")}
    for t in range(200):
        story.step(Snapshot(float(t), {}, {}))
    lines = render_frame(Snapshot(200, views, pools), story, profile="standard")
    assert len(lines) <= 24
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    header = next(line for line in lines if line.startswith("SERVICE"))
    row = next(line for line in lines if line.startswith("chat"))
    total = next(line for line in lines if line.strip().startswith("total"))
    # The cost column lines up, its total under it.
    assert header.rstrip().endswith("COST")
    assert len(row.rstrip()) == len(header.rstrip()) == len(total.rstrip())
    assert "MetricBelowTarget (window)" in row


def record(service: str, start: datetime, cost: str, seconds: int = 5) -> UsageRecord:
    return UsageRecord(
        id=f"{service}-{start.timestamp():.0f}", cluster_id="demo", namespace="demo",
        service=service, pool="a100", gpu_type="a100-80gb", pod=f"{service}-1",
        pod_uid="u", gpus=1, start=start, end=start + timedelta(seconds=seconds),
        seconds=seconds, gpu_seconds=seconds, unit_price=Decimal("2.50"),
        cost=Decimal(cost), currency="USD",
    )  # fmt: skip


def test_the_bill_compares_status_with_the_ledger_up_to_each_mark() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    records = [
        record("chat", t0, "0.003472222"),
        record("chat", t0 + timedelta(seconds=5), "0.003472222"),
        # Delivered after the mark was read: not yet in status, not a mismatch.
        record("chat", t0 + timedelta(seconds=10), "0.003472222"),
    ]
    marked = StatusUsage(Decimal("0.006944444"), 10, "2026-01-01T00:00:10Z", "USD")
    check = check_billing(records, Decimal("0.010416666"), {"chat": marked})
    assert check.ok, check.problems
    assert check.services[0].records_after == 1
    assert "match" in check.cost_line()

    wrong = check_billing(records, Decimal("0.01"), {"chat": marked})
    assert not wrong.ok
    assert "report total 0.01 != ledger total 0.010416666" in wrong.problems


def test_cost_curves_are_cumulative_per_service_and_in_total() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    later = t0 + timedelta(seconds=5)
    records = [record("chat", t0, "1"), record("embeddings", t0, "2"), record("chat", later, "3")]
    curves = cost_curves(records, t0)
    assert curves["chat"] == [(0.0, 0.0), (5.0, 1.0), (10.0, 4.0)]
    assert curves["embeddings"][-1] == (5.0, 2.0)
    assert curves["total"][-1] == (10.0, 6.0)


def test_the_demo_services_are_valid_aiservices() -> None:
    names = set()
    for path in sorted((REPO_ROOT / "examples" / "demo").glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        body["metadata"]["namespace"] = "demo"
        names.add(AIService.from_mapping(body).name)
    assert names == set(SERVICES)
