"""``make demo``: gpuyard's whole story on a local cluster, in a few minutes.

Starts a local cluster named ``demo`` (two priced pools, Prometheus, the DCGM simulator),
the operator as a process with second-scale settings, and the services of
``examples/demo/``; then drives the load script of ``demo_story`` through the simulator
while a live view shows pools, services and the bill. At the end it writes a report (PNG
and HTML chart, the ``gpuyard usage`` table) and stops everything it started, unless asked
to keep the cluster. It exits 0 only if every expected event happened and the bill adds
up; otherwise it lists what did not happen and exits 1. See docs/demo.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final, TextIO

import psycopg

from gpuyard.api.formats import format_decimal, parse_time
from gpuyard.io.pgledger import ConnectionSource, SchemaError, read_usage
from gpuyard.logic.metering import UsageRecord, record_to_line
from gpuyard.logic.usage_report import ReportFilter
from gpuyard.report.figures import png_bytes
from localcluster.cluster import (
    GPU_EXPORTER_MATCHERS,
    REPO_ROOT,
    STATE_FILE,
    ClusterState,
    LocalCluster,
    binaries_dir,
    default_state_dir,
    free_port,
    process_alive,
)
from localcluster.demo_report import (
    BillingCheck,
    StatusUsage,
    check_billing,
    render_html,
    report_figure,
)
from localcluster.demo_story import (
    NAMESPACE,
    PROFILES,
    SERVICES,
    TOPOLOGY,
    PoolView,
    ServiceView,
    Snapshot,
    Story,
    Verdict,
    phases,
)
from localcluster.demo_view import LiveView, Marks, PlainLog, summary_lines

CLUSTER_NAME: Final = "demo"
OPERATOR: Final = "gpuyard-operator"
EXAMPLES: Final = REPO_ROOT / "examples"
TICK_SECONDS: Final = 1.0
#: Two replicas under one Lease, as the chart runs them.
REPLICAS: Final = ("replica-a", "replica-b")
#: Second-scale Lease timings, like the rest of the demo: a killed leader's Lease expires
#: in 6 s (the chart's default is 15 s).
LEASE_DURATION_SECONDS: Final = 6
LEASE_SETTINGS: Final = {
    "GPUYARD_LEASE_NAMESPACE": "default",
    "GPUYARD_LEASE_NAME": "gpuyard-demo",
    "GPUYARD_LEASE_DURATION_SECONDS": str(LEASE_DURATION_SECONDS),
    "GPUYARD_LEASE_RENEW_DEADLINE_SECONDS": "4",
    "GPUYARD_LEASE_RETRY_PERIOD_SECONDS": "1",
}
#: The leader is killed this many seconds into the spike, while chat scales up.
KILL_INTO_SPIKE: Final = 5.0
#: What the story expects of the failover: the issue's bound, the Lease duration plus 2 s,
#: plus the 1 s between two looks of the demo's loop.
FAILOVER_DEADLINE: Final = LEASE_DURATION_SECONDS + 2 + TICK_SECONDS
#: The operator's settings: decisions every second over 5 s of metrics, usage cut in 5 s
#: windows and billed every second, so that minutes of story show what hours would.
OPERATOR_SETTINGS: Final = {
    "GPUYARD_AUTOSCALE_INTERVAL": "1",
    "GPUYARD_METRICS_WINDOW_SECONDS": "5",
    "GPUYARD_USAGE_WINDOW_SECONDS": "5",
    "GPUYARD_METER_INTERVAL": "1",
    "GPUYARD_USAGE_STDOUT": "false",
    "GPUYARD_CLUSTER_ID": "demo",
    "GPUYARD_LOG_LEVEL": "INFO",
    **LEASE_SETTINGS,
}
API_GROUP_PATH: Final = "/apis/gpuyard.io/v1alpha1"
#: Seconds to wait for the meter to bill the story's last seconds (5 s windows, 5 s settle).
METER_CATCH_UP: Final = 40.0


class StopRequestedError(Exception):
    """SIGTERM or Ctrl-C: clean up as on any other ending."""


def say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the cluster


class Api:
    """GETs against the API server with the cluster's admin certificate; no client library
    in the loop, so a refresh costs two small requests."""

    def __init__(self, state: ClusterState) -> None:
        pki = Path(state.state_dir) / "pki"
        self.base = state.apiserver_url
        self.context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

    def get(self, path: str) -> Any:
        url = self.base + path
        with urllib.request.urlopen(url, context=self.context, timeout=5) as response:  # noqa: S310
            return json.load(response)


class Simulator:
    """The DCGM simulator's load API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.loads: dict[str, float] = {}

    def set_load(self, service: str, load: float) -> None:
        if self.loads.get(service) == load:
            return
        body = json.dumps({"load": load}).encode()
        request = urllib.request.Request(  # noqa: S310
            f"{self.url}/load/{NAMESPACE}/{service}", data=body, method="PUT"
        )
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=5):  # noqa: S310
            pass
        self.loads[service] = load


def prometheus_utilization(prometheus_url: str, services: list[str]) -> dict[str, float]:
    """Mean GPU utilisation of each service's pods, as the simulator exports it now."""
    query = f'avg by (pod) (DCGM_FI_DEV_GPU_UTIL{{namespace="{NAMESPACE}"}})'
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310
        body = json.load(response)
    values: dict[str, list[float]] = defaultdict(list)
    for item in body.get("data", {}).get("result", []):
        pod = item.get("metric", {}).get("pod", "")
        service = next((s for s in services if pod.startswith(f"{s}-")), None)
        if service is not None:
            values[service].append(float(item["value"][1]))
    return {service: sum(v) / len(v) for service, v in values.items()}


def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    found = next((c for c in status.get("conditions") or () if c.get("type") == kind), None)
    return found or {}


def _decimal(text: Any) -> Decimal:
    try:
        return Decimal(str(text)) if text is not None else Decimal(0)
    except InvalidOperation:
        return Decimal(0)


def service_view(item: Mapping[str, Any], load: float, utilization: float | None) -> ServiceView:
    spec, status = item.get("spec") or {}, item.get("status") or {}
    recommendation = status.get("recommendation") or {}
    usage = status.get("usage") or {}
    limited = _condition(status, "CapacityLimited")
    return ServiceView(
        name=item["metadata"]["name"],
        pool=str(spec.get("pool", "")),
        gpus_per_replica=int(spec.get("gpusPerReplica") or 1),
        load=load,
        utilization=utilization,
        desired=int(status.get("desiredReplicas") or 0),
        ready=int(status.get("readyReplicas") or 0),
        replicas=int(status.get("replicas") or 0),
        reason=recommendation.get("reason"),
        limited_by=recommendation.get("limitedBy"),
        capacity_limited=limited.get("status") == "True",
        capacity_message=str(limited.get("message") or ""),
        gpu_seconds=int(usage.get("gpuSeconds") or 0),
        cost=_decimal(usage.get("cost")),
        currency=str(usage.get("currency") or ""),
        reported_through=usage.get("reportedThrough"),
    )


def pool_view(item: Mapping[str, Any]) -> PoolView:
    spec, status = item.get("spec") or {}, item.get("status") or {}
    price = spec.get("price") or {}
    return PoolView(
        name=item["metadata"]["name"],
        gpu_type=str(spec.get("gpuType", "")),
        capacity=int(status.get("capacity") or 0),
        allocated=int(status.get("allocated") or 0),
        available=int(status.get("available") or 0),
        price=str(price.get("perGpuHour", "")),
        currency=str(price.get("currency", "")),
    )


def observe(
    api: Api, state: ClusterState, loads: Mapping[str, float], t: float
) -> tuple[Snapshot, dict[str, Any]]:
    """One look at the cluster: every service and pool (and the raw services, for usage)."""
    items = api.get(f"{API_GROUP_PATH}/namespaces/{NAMESPACE}/aiservices")["items"]
    pools = api.get(f"{API_GROUP_PATH}/gpupools")["items"]
    try:
        utilization = prometheus_utilization(state.prometheus_url, list(SERVICES))
    except (OSError, ValueError, KeyError):
        utilization = {}
    by_name = {item["metadata"]["name"]: item for item in items}
    services = {
        name: service_view(by_name[name], loads.get(name, 0.0), utilization.get(name))
        for name in SERVICES
        if name in by_name
    }
    snap = Snapshot(
        t=t,
        services=services,
        pools={p["metadata"]["name"]: pool_view(p) for p in sorted(pools, key=_name)},
    )
    return snap, by_name


def _name(item: Mapping[str, Any]) -> str:
    return str(item["metadata"]["name"])


# --------------------------------------------------------------------------- the operator


@dataclass
class OperatorProcess:
    name: str
    process: subprocess.Popen[bytes]
    health_url: str
    metrics_url: str
    log_path: Path

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.health_url, timeout=2) as response:  # noqa: S310
                return bool(response.status == 200)
        except OSError:
            return False

    def leads(self) -> bool:
        """Whether this replica holds the Lease, by its own gpuyard_leader gauge."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as response:  # noqa: S310
                return "gpuyard_leader 1.0" in response.read().decode().splitlines()
        except OSError:
            return False

    def exited(self) -> int | None:
        return self.process.poll()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            # Its own session (see start_operator): the signal reaches it and nothing else.
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def log_tail(self, chars: int = 3000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]


def start_operator(state: ClusterState, out: Path, dsn_file: Path, name: str) -> OperatorProcess:
    """``gpuyard run`` as a process, recorded in the cluster's state so that bringing the
    cluster down stops it too (which is how ``--keep-cluster`` leaves it running). It
    returns once the process answers its health check, leader or standby."""
    health_port, metrics_port = free_port(), free_port()
    # Settings from the caller's shell (a `make cluster-env` export, say) stay out: the
    # operator runs against this cluster with exactly the demo's settings.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("GPUYARD_")}
    env = {
        **inherited,
        **OPERATOR_SETTINGS,
        # As in a pod, the name is the replica's identity in the Lease and its user agent.
        "POD_NAME": name,
        "GPUYARD_KUBECONFIG": state.kubeconfig,
        "GPUYARD_PROMETHEUS_URL": state.prometheus_url,
        "GPUYARD_GPU_EXPORTER_MATCHERS": GPU_EXPORTER_MATCHERS,
        # The usage ledger is the cluster's PostgreSQL, shared by the replicas.
        "GPUYARD_USAGE_LEDGER_DSN_FILE": str(dsn_file),
        "GPUYARD_METRICS_ADDRESS": "127.0.0.1",
        "GPUYARD_METRICS_PORT": str(metrics_port),
        "GPUYARD_HEALTH_ADDRESS": "127.0.0.1",
        "GPUYARD_HEALTH_PORT": str(health_port),
    }
    command = [sys.executable, "-m", "gpuyard.cli", "run"]
    log_path = out / f"operator-{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=REPO_ROOT,
        )  # fmt: skip
    recorded = ClusterState.load(Path(state.state_dir))
    recorded.pids[f"{OPERATOR}-{name}"] = process.pid
    recorded.commands[f"{OPERATOR}-{name}"] = command
    recorded.save()
    operator = OperatorProcess(
        name,
        process,
        f"http://127.0.0.1:{health_port}/healthz",
        f"http://127.0.0.1:{metrics_port}/metrics",
        log_path,
    )
    deadline = time.monotonic() + 90
    while not operator.healthy():
        if operator.exited() is not None:
            raise RuntimeError(f"{name} exited; log tail:\n{operator.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} is not healthy after 90 s; see {log_path}")
        time.sleep(0.3)
    return operator


@dataclass
class Failover:
    """The leader's death in the middle of the story, and who led after it."""

    killed: str
    killed_monotonic: float
    verdict: Verdict
    successor: str = ""
    took: float | None = None


class Replicas:
    """The operator's replicas under one Lease, as a Deployment of two would run them."""

    def __init__(self, state: ClusterState, out: Path, dsn_file: Path) -> None:
        self.state, self.out, self.dsn_file = state, out, dsn_file
        self.members = {name: start_operator(state, out, dsn_file, name) for name in REPLICAS}
        self.failover: Failover | None = None

    def leader(self) -> str:
        return next((name for name, member in self.members.items() if member.leads()), "")

    def wait_for_leader(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not (leader := self.leader()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica leads after {timeout:.0f} s")
            time.sleep(0.3)
        return leader

    def kill_leader(self, phase: str) -> Failover:
        """SIGKILL the leader (no chance to release its Lease) and start it again, as the
        kubelet restarts a container: it comes back as the standby."""
        name = self.leader()
        if not name:
            raise RuntimeError("no replica leads, so none can be killed")
        self.members[name].stop(signal.SIGKILL)
        title = f"the leader {name} is killed; a replica leads within {FAILOVER_DEADLINE:.0f} s"
        self.failover = Failover(name, time.monotonic(), Verdict(phase, title))
        self.members[name] = start_operator(self.state, self.out, self.dsn_file, name)
        return self.failover

    def exited(self) -> str | None:
        """A replica that stopped without being told to, and its exit status."""
        for name, member in self.members.items():
            code = member.exited()
            if code is not None:
                return f"{name} exited with {code}; see {member.log_path}"
        return None

    def stop(self) -> None:
        for member in self.members.values():
            member.stop()


# --------------------------------------------------------------------------- the run


@dataclass
class Paths:
    out: Path
    #: The PostgreSQL ledger's records, exported as JSON lines once the story is billed
    #: (the database goes with the cluster).
    ledger: Path = field(init=False)
    #: The connection string of the cluster's PostgreSQL, as a Secret would mount it.
    dsn_file: Path = field(init=False)
    png: Path = field(init=False)
    html: Path = field(init=False)
    usage: Path = field(init=False)
    usage_json: Path = field(init=False)
    summary: Path = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = self.out / "ledger.jsonl"
        self.dsn_file = self.out / "postgres.dsn"
        self.png = self.out / "demo-report.png"
        self.html = self.out / "demo-report.html"
        self.usage = self.out / "usage.txt"
        self.usage_json = self.out / "usage.json"
        self.summary = self.out / "summary.json"

    def fresh(self) -> None:
        """An empty output directory for this run: an old ledger would mix two runs."""
        self.out.mkdir(parents=True, exist_ok=True)
        for path in (
            self.ledger, self.dsn_file, self.png, self.html, self.usage, self.usage_json,
            self.summary,
            *(self.out / f"operator-{name}.log" for name in REPLICAS),
        ):  # fmt: skip
            path.unlink(missing_ok=True)


@dataclass
class Timings:
    cluster_up: float = 0.0
    operator_ready: float = 0.0
    story: float = 0.0
    billing: float = 0.0
    total: float = 0.0


@dataclass
class Run:
    profile: str
    paths: Paths
    keep_cluster: bool
    state_dir: Path
    out: TextIO
    plain: bool
    timings: Timings = field(default_factory=Timings)
    snapshots: list[Snapshot] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: Set as soon as the story starts, so that an interrupted run reports how far it got.
    story: Story | None = None


def kubectl(state: ClusterState, *args: str) -> str:
    return LocalCluster.kubectl(binaries_dir(build=False), Path(state.kubeconfig), *args)


def install(state: ClusterState) -> None:
    """CRDs, the two priced pools, the namespace."""
    kubectl(state, "apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
    for name in ("aiservices.gpuyard.io", "gpupools.gpuyard.io"):
        kubectl(state, "wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    kubectl(state, "apply", "-f", str(EXAMPLES / "pools.yaml"))
    kubectl(state, "create", "namespace", NAMESPACE)


def run_story(
    run: Run, state: ClusterState, replicas: Replicas
) -> tuple[Story, datetime, datetime]:
    """Drive the load script until the story ends; return it with its start and end."""
    api, sim = Api(state), Simulator(state.dcgm_sim_url)
    story = run.story = Story(phases(PROFILES[run.profile]))
    view: LiveView | PlainLog = (
        PlainLog(run.out, run.profile) if run.plain else LiveView(run.out, run.profile)
    )
    # The wake metric must exist before the services do: silence is not zero demand.
    for service, step in story.phases[0].loads.items():
        sim.set_load(service, step.end)
    kubectl(state, "apply", "-n", NAMESPACE, "-f", str(EXAMPLES / "demo"))
    started_at = datetime.now(UTC)
    started = time.monotonic()
    try:
        while not story.done:
            tick = time.monotonic()
            snap, _ = observe(api, state, sim.loads, tick - started)
            snap = replace(snap, leader=replicas.leader(), replicas=tuple(replicas.members))
            run.snapshots.append(snap)
            for service, load in story.step(snap).items():
                sim.set_load(service, load)
            follow_failover(story, replicas, snap)
            view.show(snap, story)
            exited = replicas.exited()
            if exited is not None:
                run.problems.append(exited)
                break
            time.sleep(max(0.0, TICK_SECONDS - (time.monotonic() - tick)))
    finally:
        view.close()
    return story, started_at, datetime.now(UTC)


def follow_failover(story: Story, replicas: Replicas, snap: Snapshot) -> None:
    """Kill the leader once, a few seconds into the spike; then judge how soon a replica
    led again (an event in the story's list, failed past the deadline). Any replica that
    leads after the kill is a successor: the killed process is gone, and the one started
    in its place is a new candidate."""
    failover = replicas.failover
    phase = story.phase
    if failover is None:
        in_spike = phase is not None and phase.name == "spike"
        if in_spike and story.phase_elapsed(snap.t) >= KILL_INTO_SPIKE:
            failover = replicas.kill_leader("spike")
            story.record(failover.verdict)
        return
    if failover.verdict.met is not None:
        return
    took = time.monotonic() - failover.killed_monotonic
    if snap.leader:
        failover.successor, failover.took = snap.leader, took
        failover.verdict.met, failover.verdict.at = took <= FAILOVER_DEADLINE, snap.t
        failover.verdict.detail = f"{snap.leader} leads {took:.1f} s after the kill"
    elif took > FAILOVER_DEADLINE:
        failover.verdict.met, failover.verdict.at = False, snap.t
        failover.verdict.detail = f"no replica leads {took:.0f} s after the kill"


def wait_for_meter(api: Api, through: datetime) -> dict[str, Any]:
    """Until every service's usage is reported through ``through`` (or the deadline)."""
    deadline = time.monotonic() + METER_CATCH_UP
    while True:
        items = api.get(f"{API_GROUP_PATH}/namespaces/{NAMESPACE}/aiservices")["items"]
        marks = [((i.get("status") or {}).get("usage") or {}).get("reportedThrough") for i in items]
        if all(m is not None and parse_time(m) >= through for m in marks):
            return {i["metadata"]["name"]: i for i in items}
        if time.monotonic() > deadline:
            return {i["metadata"]["name"]: i for i in items}
        time.sleep(1.0)


def usage_report(paths: Paths, source: list[str]) -> Decimal | None:
    """``gpuyard usage`` on the ledger (``source``: its ``--from`` or ``--ledger``), as a
    person would run it: the table into usage.txt; its TOTAL cost (from the JSON form) is
    returned."""
    base = [sys.executable, "-m", "gpuyard.cli", "usage", *source]
    table = subprocess.run(
        [*base, "--format", "table"], capture_output=True, text=True, check=False, cwd=REPO_ROOT
    )
    paths.usage.write_text(table.stdout + table.stderr)
    as_json = subprocess.run(
        [*base, "--format", "json"], capture_output=True, text=True, check=False, cwd=REPO_ROOT
    )
    if as_json.returncode != 0:
        return None
    paths.usage_json.write_text(as_json.stdout)
    totals = json.loads(as_json.stdout).get("totals") or []
    if len(totals) != 1:
        return None
    return Decimal(totals[0]["cost"])


def status_usage(items: Mapping[str, Any]) -> dict[str, StatusUsage]:
    found = {}
    for name, item in items.items():
        usage = (item.get("status") or {}).get("usage")
        if usage:
            found[name] = StatusUsage(
                cost=_decimal(usage.get("cost")),
                gpu_seconds=int(usage.get("gpuSeconds") or 0),
                reported_through=usage.get("reportedThrough"),
                currency=str(usage.get("currency") or ""),
            )
    return found


def write_report(
    run: Run,
    story: Story,
    story_start: datetime,
    records: list[UsageRecord],
    billing: BillingCheck,
) -> None:
    paths = run.paths
    figure = report_figure(
        run.snapshots,
        records,
        story_start,
        story.starts,
        namespace=NAMESPACE,
        services=list(SERVICES),
        currency=billing.currency,
        title=f"gpuyard demo ({run.profile}): load, replicas and cost per service",
    )
    paths.png.write_bytes(png_bytes(figure))
    failures = story.failures
    headline = (
        f"Profile {run.profile}, {len(story.verdicts) - len(failures)} of "
        f"{len(story.verdicts)} expected events happened; story "
        f"{run.timings.story:.0f} s, started {story_start:%Y-%m-%d %H:%M:%S} UTC."
    )
    files = [
        ("chart (PNG)", paths.png.name),
        ("usage table", paths.usage.name),
        ("usage ledger (exported from PostgreSQL)", paths.ledger.name),
        *((f"operator log ({name})", f"operator-{name}.log") for name in REPLICAS),
        ("summary (JSON)", paths.summary.name),
    ]
    paths.html.write_text(
        render_html(
            figure,
            headline=headline,
            verdicts=story.verdicts,
            billing=billing,
            usage_table=paths.usage.read_text() if paths.usage.exists() else "",
            files=files,
        ),
        encoding="utf-8",
    )
    summary = {
        "ok": not failures and billing.ok and not run.problems,
        "profile": run.profile,
        "verdicts": [asdict(v) for v in story.verdicts],
        "problems": run.problems,
        "billing": {
            "ok": billing.ok,
            "currency": billing.currency,
            "ledger_total": format_decimal(billing.ledger_total),
            "report_total": None
            if billing.report_total is None
            else format_decimal(billing.report_total),
            "ledger_records": billing.ledger_records,
            "problems": list(billing.problems),
        },
        "timings": asdict(run.timings),
    }
    paths.summary.write_text(json.dumps(summary, indent=2) + "\n")


def bill_and_report(
    run: Run,
    state: ClusterState,
    replicas: Replicas,
    story: Story,
    span: tuple[datetime, datetime],
) -> BillingCheck:
    started = time.monotonic()
    story_start, story_end = span
    say("waiting for the meter to bill the last seconds")
    api = Api(state)
    items = wait_for_meter(api, story_end)
    if not run.keep_cluster:
        # Stopped first, so that the ledger and status.usage hold still while compared.
        replicas.stop()
        items = {
            i["metadata"]["name"]: i
            for i in api.get(f"{API_GROUP_PATH}/namespaces/{NAMESPACE}/aiservices")["items"]
        }
    # The marks were read first, and the meter moves a mark only once the records before
    # it are committed, so this read holds at least everything the marks count.
    try:
        records = list(read_usage(ConnectionSource(dsn=state.postgres_dsn), ReportFilter()).records)
    except (psycopg.Error, SchemaError) as error:
        raise RuntimeError(f"the PostgreSQL ledger cannot be read: {error}") from error
    run.paths.ledger.write_text("".join(f"{record_to_line(r)}\n" for r in records))
    # The report reads the database as a person would; with --keep-cluster the replicas
    # go on writing to it, so the report reads the export, which holds still.
    source = (
        ["--ledger", str(run.paths.ledger)] if run.keep_cluster else ["--from", state.postgres_dsn]
    )
    report_total = usage_report(run.paths, source)
    billing = check_billing(records, report_total, status_usage(items))
    run.timings.billing = time.monotonic() - started
    write_report(run, story, story_start, records, billing)
    return billing


def preflight(state_dir: Path) -> str | None:
    """Why the demo cannot start here, or None."""
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        state = ClusterState.load(state_dir)
        alive = any(process_alive(pid) for pid in state.pids.values())
    except (OSError, ValueError, TypeError):
        alive = False
    what = "already runs" if alive else "left its state behind (its processes are gone)"
    return (
        f"a {CLUSTER_NAME!r} cluster {what} in {state_dir}.\n"
        f"       Bring it down first:  {down_command(state_dir)}"
    )


def down_command(state_dir: Path) -> str:
    command = "PYTHONPATH=hack .venv/bin/python -m localcluster --name demo"
    if state_dir != default_state_dir(CLUSTER_NAME):
        command += f" --state-dir {state_dir}"
    return command + " down"


def _on_sigterm(signum: int, frame: types.FrameType | None) -> None:
    del signum, frame
    raise StopRequestedError


def execute(run: Run) -> int:
    """The whole run; returns the exit status."""
    begun = time.monotonic()
    cluster = LocalCluster(run.state_dir, name=CLUSTER_NAME)
    replicas: Replicas | None = None
    up = False
    billing: BillingCheck | None = None
    ctrl_c = False
    try:
        say(f"starting the local cluster {CLUSTER_NAME!r} ({TOPOLOGY}) in {run.state_dir}")
        state = cluster.up(topology=TOPOLOGY)
        up = True
        run.timings.cluster_up = time.monotonic() - begun
        install(state)
        mark = time.monotonic()
        if not state.postgres_dsn:
            raise RuntimeError(
                "the local cluster has no PostgreSQL for the usage ledger: install Debian's "
                "postgresql package (bash hack/install-system-deps.sh)"
            )
        run.paths.dsn_file.write_text(state.postgres_dsn + "\n")
        replicas = Replicas(state, run.paths.out, run.paths.dsn_file)
        leader = replicas.wait_for_leader(timeout=60)
        run.timings.operator_ready = time.monotonic() - mark
        say(
            f"cluster up in {run.timings.cluster_up:.0f} s, {len(REPLICAS)} operator replicas "
            f"ready in {run.timings.operator_ready:.0f} s ({leader} leads); the story begins "
            f"({run.profile} profile)"
        )
        mark = time.monotonic()
        story, story_start, story_end = run_story(run, state, replicas)
        run.timings.story = time.monotonic() - mark
        billing = bill_and_report(run, state, replicas, story, (story_start, story_end))
    except (StopRequestedError, KeyboardInterrupt) as stop:
        run.problems.append("interrupted")
        ctrl_c = isinstance(stop, KeyboardInterrupt)
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as error:
        run.problems.append(f"{type(error).__name__}: {error}")
    finally:
        if replicas is not None and not run.keep_cluster:
            replicas.stop()
        if up and not run.keep_cluster:
            cluster.down()
    run.timings.total = time.monotonic() - begun
    status = finish(run, run.story, billing, keep=up and run.keep_cluster)
    return 130 if ctrl_c else status


def finish(run: Run, story: Story | None, billing: BillingCheck | None, *, keep: bool) -> int:
    out = run.out
    marks = Marks.for_encoding(getattr(out, "encoding", None)) if not run.plain else Marks()
    failures = list(story.failures) if story else []
    print("", file=out)
    if story is not None:
        print("What was expected, and what happened:", file=out)
        for line in summary_lines(story.verdicts, marks):
            print(line, file=out)
    if billing is not None:
        print(billing.cost_line(), file=out)
    t = run.timings
    print(
        f"timings: cluster {t.cluster_up:.0f} s, operator {t.operator_ready:.0f} s, "
        f"story {t.story:.0f} s, billing and report {t.billing:.0f} s, total {t.total:.0f} s",
        file=out,
    )
    missed = [f"{v.phase}: {v.title}: {v.detail or 'never decided'}" for v in failures]
    missed += list(billing.problems) if billing is not None else ["no bill was checked"]
    missed += run.problems
    if story is None:
        missed.insert(0, "the story did not run")
    if missed:
        print("\nThe story did NOT happen as expected:", file=out)
        for line in missed:
            print(f"  - {line}", file=out)
    if keep:
        state = ClusterState.load(run.state_dir)
        print("\nThe cluster keeps running, and the operator with it:", file=out)
        print(f"  export KUBECONFIG={state.kubeconfig}", file=out)
        print(f"  kubectl get gpupools; kubectl get aiservices -n {NAMESPACE}", file=out)
        print(f"  bring it down:  {down_command(run.state_dir)}", file=out)
    if run.paths.html.exists():
        print("", file=out)
        for label, path in (
            ("report", run.paths.html),
            ("chart", run.paths.png),
            ("usage", run.paths.usage),
            ("ledger", run.paths.ledger),
        ):
            print(f"{label + ':':<8}{_shown(path)}", file=out)
    out.flush()
    return 1 if missed else 0


def _shown(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd()))
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="standard")
    parser.add_argument(
        "--keep-cluster",
        action="store_true",
        help="leave the cluster and the operator running at the end (prints the kubeconfig)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "out" / "demo", help="report directory"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="the demo cluster's files (default: ~/.cache/gpuyard/clusters/demo)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="log lines instead of the live view (the default when stdout is not a terminal)",
    )
    args = parser.parse_args(argv)
    state_dir = (args.state_dir or default_state_dir(CLUSTER_NAME)).resolve()
    refusal = preflight(state_dir)
    if refusal:
        say(refusal)
        return 1
    plain = args.plain or not sys.stdout.isatty() or os.environ.get("TERM") == "dumb"
    paths = Paths(args.out.resolve())
    paths.fresh()
    run = Run(args.profile, paths, args.keep_cluster, state_dir, sys.stdout, plain)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return execute(run)
    finally:
        signal.signal(signal.SIGTERM, previous)
