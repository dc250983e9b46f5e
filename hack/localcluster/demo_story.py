"""The demo's script: what load each service gets when, and what gpuyard must do about it.

Pure: the driver (``demo.py``) observes the cluster once a second into a ``Snapshot`` and
hands it to the ``Story``, which says which loads to set and which expected events have
happened. No clock, no I/O, so the script's logic is tested without a cluster.

The services are ``examples/demo/*.yaml``; the numbers below are derived from them:

- ``chat`` (a100, 2 GPUs per replica, GPU utilisation target 70 %, 1..6 replicas,
  scale-down window 20 s): one replica serves 140 units of load (2 GPUs x 70 %).
- ``embeddings`` (l4, 1 GPU, 0..4 replicas, one replica per request in flight, zero after
  20 s idle): load 100 is one request in flight.
- ``finetune`` (a100, 2 GPUs, 0..8 replicas, one replica per queued job): eight jobs ask for
  16 GPUs, the whole a100 pool, while ``chat`` holds 8 of them (4 replicas at load 480).
  Its first step from zero (4 replicas, the rate limit) already takes all that is left, so
  the pool's limit shows once the rate limit's 15 s period has passed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final, Protocol

NAMESPACE: Final = "demo"
SERVICES: Final = ("chat", "embeddings", "finetune")
#: Seconds of the chat service's scale-down window (examples/demo/chat.yaml).
CHAT_SCALE_DOWN_WINDOW: Final = 20
#: Two pools: a100 (two 8-GPU nodes), shared by chat and finetune; l4 (two 4-GPU nodes).
TOPOLOGY: Final = "a100=2x8:a100-80gb,l4=2x4:l4"
#: A phase lasts at least this long after its last expected event, so that the chart and
#: the view show the outcome before the next phase changes the load.
SETTLE_SECONDS: Final = 5.0


# --------------------------------------------------------------------------- observations


@dataclass(frozen=True)
class ServiceView:
    """One AIService as the demo saw it: spec, status, the load it was given."""

    name: str
    pool: str = ""
    gpus_per_replica: int = 1
    load: float = 0.0
    utilization: float | None = None
    desired: int = 0
    ready: int = 0
    replicas: int = 0
    reason: str | None = None
    limited_by: str | None = None
    capacity_limited: bool = False
    capacity_message: str = ""
    gpu_seconds: int = 0
    cost: Decimal = Decimal(0)
    currency: str = ""
    reported_through: str | None = None


@dataclass(frozen=True)
class PoolView:
    name: str
    gpu_type: str = ""
    capacity: int = 0
    allocated: int = 0
    available: int = 0
    price: str = ""
    currency: str = ""


@dataclass(frozen=True)
class Snapshot:
    """The cluster at one moment; ``t`` is seconds since the story began."""

    t: float
    services: dict[str, ServiceView]
    pools: dict[str, PoolView]
    #: The operator replica that holds the Lease ("" while none does).
    leader: str = ""
    #: Every replica that runs, the leader among them.
    replicas: tuple[str, ...] = ()

    def service(self, name: str) -> ServiceView:
        return self.services.get(name) or ServiceView(name)


# --------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Outcome:
    met: bool
    detail: str


class Expectation(Protocol):
    """Something gpuyard must do in a phase; ``observe`` returns an outcome once decided."""

    @property
    def title(self) -> str: ...

    def observe(self, snap: Snapshot, phase_start: float, /) -> Outcome | None: ...

    def last_seen(self, snap: Snapshot) -> str: ...


def _replicas(view: ServiceView) -> str:
    return f"{view.ready} ready / {view.desired} desired ({view.reason or 'no decision yet'})"


@dataclass
class ScalesUp:
    """The service reaches ``at_least`` ready replicas."""

    service: str
    at_least: int
    why: str
    start: int | None = None

    @property
    def title(self) -> str:
        return f"{self.service} scales up {self.why} (>= {self.at_least} ready)"

    def observe(self, snap: Snapshot, _phase_start: float) -> Outcome | None:
        view = snap.service(self.service)
        if self.start is None:
            self.start = view.ready
        if view.ready >= self.at_least and view.desired >= self.at_least:
            return Outcome(True, f"{self.start} -> {view.ready} ready replicas")
        return None

    def last_seen(self, snap: Snapshot) -> str:
        return _replicas(snap.service(self.service))


@dataclass
class ScalesDownAfterWindow:
    """The service keeps its size for the scale-down window, then shrinks to ``to``."""

    service: str
    to: int
    window: float
    # The driver's observations come a second apart and the load's 5 s average lags:
    # a first drop up to this early still shows the window held.
    slack: float = 2.0
    start: int | None = None
    first_drop: float | None = None

    @property
    def title(self) -> str:
        return (
            f"{self.service} holds {self.window:.0f} s (its window), then scales down to {self.to}"
        )

    def observe(self, snap: Snapshot, phase_start: float) -> Outcome | None:
        view = snap.service(self.service)
        if self.start is None:
            self.start = view.desired
        elapsed = snap.t - phase_start
        if self.first_drop is None and view.desired < self.start:
            self.first_drop = elapsed
            if elapsed < self.window - self.slack:
                return Outcome(
                    False, f"shrank after {elapsed:.0f} s, before its {self.window:.0f} s window"
                )
        if view.desired <= self.to and view.ready <= self.to and view.replicas <= self.to:
            held = self.first_drop if self.first_drop is not None else elapsed
            return Outcome(
                True, f"{self.start} -> {view.desired} replicas; held {held:.0f} s before shrinking"
            )
        return None

    def last_seen(self, snap: Snapshot) -> str:
        return _replicas(snap.service(self.service))


@dataclass
class ScalesToZero:
    service: str
    idle_seconds: float

    @property
    def title(self) -> str:
        return f"{self.service} scales to zero after {self.idle_seconds:.0f} s without demand"

    def observe(self, snap: Snapshot, phase_start: float) -> Outcome | None:
        view = snap.service(self.service)
        if view.desired == 0 and view.replicas == 0:
            return Outcome(True, f"0 replicas after {snap.t - phase_start:.0f} s ({view.reason})")
        return None

    def last_seen(self, snap: Snapshot) -> str:
        return _replicas(snap.service(self.service))


@dataclass
class WakesUp:
    service: str
    at_least: int = 1

    @property
    def title(self) -> str:
        return f"{self.service} wakes from zero on demand"

    def observe(self, snap: Snapshot, phase_start: float) -> Outcome | None:
        view = snap.service(self.service)
        if view.ready >= self.at_least:
            return Outcome(
                True, f"0 -> {view.ready} ready replicas in {snap.t - phase_start:.0f} s"
            )
        return None

    def last_seen(self, snap: Snapshot) -> str:
        return _replicas(snap.service(self.service))


@dataclass
class FillsPool:
    """The pool runs out: the service holds what fits and says ``CapacityLimited``; every
    replica it asked for is running (it asked for no GPU the pool does not have)."""

    service: str

    @property
    def title(self) -> str:
        return f"{self.service} fills its pool: CapacityLimited, no pod left Pending"

    def observe(self, snap: Snapshot, _phase_start: float) -> Outcome | None:
        view = snap.service(self.service)
        pool = snap.pools.get(view.pool)
        if not view.capacity_limited or pool is None or view.ready < 1:
            return None
        if view.ready != view.desired or pool.available >= view.gpus_per_replica:
            return None  # still placing what fits
        return Outcome(
            True,
            f"{view.ready} replicas ({view.ready * view.gpus_per_replica} GPUs) run, "
            f"{pool.name} {pool.allocated}/{pool.capacity} GPUs allocated: "
            f"{view.capacity_message}",
        )

    def last_seen(self, snap: Snapshot) -> str:
        view = snap.service(self.service)
        pool = snap.pools.get(view.pool)
        where = f", {pool.name} {pool.available} GPUs free" if pool else ""
        limited = "CapacityLimited" if view.capacity_limited else "not CapacityLimited"
        return f"{_replicas(view)}, {limited}{where}"


@dataclass
class Ready:
    """Set-up: the service runs ``replicas`` ready replicas."""

    service: str
    replicas: int

    @property
    def title(self) -> str:
        return f"{self.service} runs {self.replicas} ready replica(s)"

    def observe(self, snap: Snapshot, _phase_start: float) -> Outcome | None:
        view = snap.service(self.service)
        if view.ready >= self.replicas and view.desired >= self.replicas:
            return Outcome(True, f"{view.ready} ready")
        return None

    def last_seen(self, snap: Snapshot) -> str:
        return _replicas(snap.service(self.service))


# --------------------------------------------------------------------------- phases


@dataclass(frozen=True)
class LoadStep:
    """A service's load through a phase: from ``start`` (default: where it was) to ``end``
    linearly over the phase's ramp seconds, then ``end``."""

    end: float
    start: float | None = None


@dataclass(frozen=True)
class Phase:
    name: str
    caption: str
    loads: dict[str, LoadStep]
    expect: tuple[Expectation, ...]
    ramp_seconds: float = 0.0
    min_seconds: float = 0.0
    #: How long the expectations may take, counted from the phase's start.
    deadline_seconds: float = 60.0


@dataclass(frozen=True)
class Profile:
    name: str
    ramp: float
    spike: float
    quiet: float
    wake: float
    fill: float


PROFILES: Final = {
    # Story lengths on a 2-core machine: about 2, 4 1/2 and 10 minutes.
    "short": Profile("short", ramp=25, spike=20, quiet=10, wake=20, fill=20),
    "standard": Profile("standard", ramp=60, spike=50, quiet=30, wake=50, fill=60),
    "long": Profile("long", ramp=120, spike=120, quiet=90, wake=120, fill=120),
}


def phases(profile: Profile) -> list[Phase]:
    """The story: set-up, ramp, spike, quiet, wake-up, a full pool."""
    return [
        Phase(
            "setup",
            "chat starts at 1 replica, embeddings wakes for requests, finetune waits at 0",
            {"chat": LoadStep(80), "embeddings": LoadStep(150), "finetune": LoadStep(0)},
            (Ready("chat", 1), Ready("embeddings", 2)),
            deadline_seconds=90,
        ),
        Phase(
            "ramp",
            "chat's traffic climbs: GPU utilisation passes 70 % and replicas follow",
            {"chat": LoadStep(380), "embeddings": LoadStep(300)},
            (ScalesUp("chat", 3, "with its load"), ScalesUp("embeddings", 3, "with requests")),
            ramp_seconds=profile.ramp,
            min_seconds=profile.ramp + 3,
            deadline_seconds=profile.ramp + 60,
        ),
        Phase(
            "spike",
            "a traffic spike: chat jumps to its maximum within seconds",
            {"chat": LoadStep(1000)},
            (ScalesUp("chat", 6, "on the spike"),),
            min_seconds=profile.spike,
            deadline_seconds=profile.spike + 60,
        ),
        Phase(
            "quiet",
            "traffic stops: chat shrinks after its 20 s window, embeddings goes to zero",
            {"chat": LoadStep(0), "embeddings": LoadStep(0)},
            (
                ScalesDownAfterWindow("chat", 1, CHAT_SCALE_DOWN_WINDOW),
                ScalesToZero("embeddings", 20),
            ),
            min_seconds=profile.quiet,
            deadline_seconds=profile.quiet + 120,
        ),
        Phase(
            "wake",
            "requests return: embeddings wakes from zero, chat grows to 4 replicas",
            {"chat": LoadStep(480), "embeddings": LoadStep(250)},
            (WakesUp("embeddings"), ScalesUp("chat", 4, "again")),
            min_seconds=profile.wake,
            deadline_seconds=profile.wake + 60,
        ),
        Phase(
            "fill",
            "8 fine-tuning jobs want 16 A100s, chat holds 8 of them: the pool fills",
            {"finetune": LoadStep(800)},
            (FillsPool("finetune"),),
            min_seconds=profile.fill,
            deadline_seconds=profile.fill + 60,
        ),
    ]


# --------------------------------------------------------------------------- the story


@dataclass
class Verdict:
    phase: str
    title: str
    met: bool | None = None
    at: float | None = None
    detail: str = ""


@dataclass
class _Running:
    index: int
    started: float
    from_loads: dict[str, float]
    verdicts: list[Verdict]
    pending: list[tuple[Expectation, Verdict]]


@dataclass
class Story:
    """Steps through the phases; ``step`` takes a snapshot and returns the loads to set."""

    phases: list[Phase]
    loads: dict[str, float] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)
    #: (t, phase name) of every phase start, for the chart.
    starts: list[tuple[float, str]] = field(default_factory=list)
    _running: _Running | None = None
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def phase(self) -> Phase | None:
        return None if self._running is None else self.phases[self._running.index]

    def phase_elapsed(self, t: float) -> float:
        return 0.0 if self._running is None else t - self._running.started

    def deadline(self) -> float | None:
        """When the current phase's expectations fail, in story seconds."""
        if self._running is None:
            return None
        return self._running.started + self.phases[self._running.index].deadline_seconds

    def step(self, snap: Snapshot) -> dict[str, float]:
        if self.done:
            return dict(self.loads)
        if self._running is None:
            self._begin(0, snap.t)
        running = self._running
        assert running is not None
        phase = self.phases[running.index]
        elapsed = snap.t - running.started
        self._judge(snap, running, phase, elapsed)
        decided = max((v.at or 0.0 for v in running.verdicts), default=running.started)
        if (
            not running.pending
            and elapsed >= phase.min_seconds
            and snap.t - decided >= SETTLE_SECONDS
        ):
            if running.index + 1 < len(self.phases):
                self._begin(running.index + 1, snap.t)
                running = self._running
                assert running is not None
                phase, elapsed = self.phases[running.index], 0.0
            else:
                self.finished_at = snap.t
        for service, load in phase.loads.items():
            self.loads[service] = _load_at(
                load, running.from_loads.get(service, 0.0), phase.ramp_seconds, elapsed
            )
        return dict(self.loads)

    def _begin(self, index: int, t: float) -> None:
        phase = self.phases[index]
        verdicts = [Verdict(phase.name, e.title) for e in phase.expect]
        self.verdicts.extend(verdicts)
        self.starts.append((t, phase.name))
        self._running = _Running(
            index, t, dict(self.loads), verdicts, list(zip(phase.expect, verdicts, strict=True))
        )

    def _judge(self, snap: Snapshot, running: _Running, phase: Phase, elapsed: float) -> None:
        still = []
        for expectation, verdict in running.pending:
            outcome = expectation.observe(snap, running.started)
            if outcome is None and elapsed >= phase.deadline_seconds:
                outcome = Outcome(
                    False,
                    f"not within {phase.deadline_seconds:.0f} s; last seen: "
                    f"{expectation.last_seen(snap)}",
                )
            if outcome is None:
                still.append((expectation, verdict))
            else:
                verdict.met, verdict.at, verdict.detail = outcome.met, snap.t, outcome.detail
        running.pending = still

    def record(self, verdict: Verdict) -> None:
        """An event the story did not script (the demo's failover), judged by its caller."""
        self.verdicts.append(verdict)

    @property
    def failures(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.met is not True]


def _load_at(step: LoadStep, previous: float, ramp: float, elapsed: float) -> float:
    start = previous if step.start is None else step.start
    if ramp <= 0 or elapsed >= ramp:
        return step.end
    # Whole units: the simulator and the chart need no more precision than that.
    return float(math.floor(start + (step.end - start) * elapsed / ramp))
