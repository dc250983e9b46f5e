"""The operator's own Prometheus metrics, on a registry made at start-up (not at import)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class OperatorMetrics:
    """Everything gpuyard exports about itself; one instance per running operator."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reconciles = Counter(
            "gpuyard_reconciles_total",
            "Reconciles run, by kind and result.",
            ["kind", "result"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "gpuyard_reconcile_duration_seconds",
            "Time one reconcile took, by kind.",
            ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.kubernetes_writes = Counter(
            "gpuyard_kubernetes_writes_total",
            "Write calls made to the Kubernetes API, by verb and resource.",
            ["verb", "resource"],
            registry=self.registry,
        )
        self.fenced_writes = Counter(
            "gpuyard_fenced_writes_total",
            "Writes refused before they were sent because this replica did not lead.",
            registry=self.registry,
        )
        self.leader = Gauge(
            "gpuyard_leader",
            "1 on the replica that holds the leader election's Lease, 0 on a standby.",
            registry=self.registry,
        )
        self.leader_transitions = Counter(
            "gpuyard_leader_transitions_total",
            "Times this replica started or stopped leading.",
            ["to"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "gpuyard_workqueue_depth",
            "Keys waiting for a reconcile, by queue.",
            ["queue"],
            registry=self.registry,
        )
        self.pool_gpus = Gauge(
            "gpuyard_pool_gpus",
            "GPUs of a pool, by state (capacity, allocated, available).",
            ["pool", "gpu_type", "state"],
            registry=self.registry,
        )
        self.autoscaler_tick_seconds = Histogram(
            "gpuyard_autoscaler_tick_duration_seconds",
            "Wall time of one autoscaler tick (queries and decisions for every service).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.autoscaler_last_tick = Gauge(
            "gpuyard_autoscaler_last_tick_timestamp_seconds",
            "Unix time the last autoscaler tick ended (alert when it stops moving).",
            registry=self.registry,
        )
        self.autoscaler_errors = Counter(
            "gpuyard_autoscaler_errors_total",
            "Autoscaler failures, by stage (query, tick).",
            ["stage"],
            registry=self.registry,
        )
        self.autoscaler_services = Gauge(
            "gpuyard_autoscaler_tick_services",
            "Services in the last autoscaler tick: decided, or repeating their last decision "
            "(at target or asleep at zero, reading what they read before).",
            ["decision"],
            registry=self.registry,
        )
        self.autoscaler_decisions = Counter(
            "gpuyard_autoscaler_decisions_total",
            "Decisions that changed what a service's status shows, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.autoscaler_desired_replicas = Gauge(
            "gpuyard_autoscaler_desired_replicas",
            "Replicas the autoscaler decided for a service.",
            ["namespace", "service"],
            registry=self.registry,
        )
        self.prometheus_queries = Counter(
            "gpuyard_prometheus_queries_total",
            "PromQL queries sent (a constant number per tick).",
            registry=self.registry,
        )
        self.prometheus_query_seconds = Histogram(
            "gpuyard_prometheus_query_duration_seconds",
            "Wall time of one tick's concurrent PromQL queries.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.meter_tick_seconds = Histogram(
            "gpuyard_meter_tick_duration_seconds",
            "Wall time of one metering tick (cut, deliver, advance marks).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.meter_errors = Counter(
            "gpuyard_meter_errors_total",
            "Metering failures, by stage (sink, mark, unpriced, utilization, tick).",
            ["stage"],
            registry=self.registry,
        )
        self.ledger_duplicates = Counter(
            "gpuyard_ledger_duplicates_total",
            "Records the PostgreSQL ledger already held with the same billed fields "
            "(re-emitted after a restart or a retry): nothing written.",
            registry=self.registry,
        )
        self.ledger_conflicts = Counter(
            "gpuyard_ledger_conflicts_total",
            "Records whose id the PostgreSQL ledger held with different billed fields: the "
            "stored copy kept, the new one set aside in gpuyard_usage_conflicts.",
            registry=self.registry,
        )
        self.metering_lag = Gauge(
            "gpuyard_metering_lag_seconds",
            "How far a service's reported usage trails the present (alert when it grows).",
            ["namespace", "service"],
            registry=self.registry,
        )
        self.service_replicas = Gauge(
            "gpuyard_service_replicas",
            "Replicas of an AIService, by state (desired, ready).",
            ["namespace", "service", "state"],
            registry=self.registry,
        )
        self.services_not_accepted = Gauge(
            "gpuyard_services_not_accepted",
            "AIServices whose spec the operator refuses (Accepted=False), by reason.",
            ["reason"],
            registry=self.registry,
        )
