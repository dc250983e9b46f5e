"""AIService: one GPU service of a team, run by the operator as a Deployment (and a Service).

The spec never holds a raw pod spec: the operator creates pods on a tenant's behalf, so the
tenant chooses only what is safe to choose (the pod surface of `gpuyard.api.workload`:
image, environment, volumes that stay off the host, probes, identity) and the operator
fills in the rest (GPU requests, node placement, the privilege it takes away). Replica
bounds sit at the top of the spec, HPA-style, because `spec.replicas` belongs to the scale
subresource.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Final, Literal

from pydantic import Field, StringConstraints, field_validator

from gpuyard.api.common import (
    CURRENCY_PATTERN,
    DEFAULT_EMPTY_OBJECT,
    DNS1035_LABEL_PATTERN,
    DNS_LABEL_MAX_LENGTH,
    AmountString,
    ApiModel,
    ApiObject,
    CamelCaseWord,
    CelRule,
    ConditionList,
    CurrencyCode,
    DecimalString,
    DnsLabel,
    DnsSubdomain,
    Generation,
    MeasurementString,
    ObjectMeta,
    Timestamp,
)
from gpuyard.api.formats import parse_decimal
from gpuyard.api.names import RESERVED_PROMETHEUS_LABELS
from gpuyard.api.reasons import LimitingFactor, Reason, word_list
from gpuyard.api.workload import (
    PROBE_FIELDS,
    Argument,
    ContainerResources,
    DisruptionBudget,
    EnvFromSource,
    EnvVar,
    PodAnnotations,
    PodLabels,
    Port,
    Probe,
    SecurityContext,
    Volume,
    VolumeMount,
    outside_reserved_domains,
    reserved_domains_message,
    reserved_domains_rule,
)

KIND: Final = "AIService"
PLURAL = "aiservices"
MAX_REPLICAS = 1000
MAX_GPUS_PER_REPLICA = 16

#: A service's name is also the name of its Kubernetes Service (an RFC 1035 label: it must
#: start with a letter) and a label value on every child: at most 63 characters.
SERVICE_NAME_PATTERN = DNS1035_LABEL_PATTERN
SERVICE_NAME_MAX_LENGTH = DNS_LABEL_MAX_LENGTH

#: Image reference: [registry[:port]/]path[:tag][@digest], as the distribution spec has it.
_DOMAIN = r"[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?([.][a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?)*"
_PATH_COMPONENT = r"[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*"
_TAG = r"[A-Za-z0-9_][-A-Za-z0-9_.]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_NAME = rf"({_DOMAIN}(:[0-9]+)?/)?{_PATH_COMPONENT}(/{_PATH_COMPONENT})*"
IMAGE_PATTERN = rf"^{_NAME}(:{_TAG})?(@{_DIGEST})?$"
IMAGE_MAX_LENGTH = 512

PROMETHEUS_METRIC_PATTERN = r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"
PROMETHEUS_LABEL_PATTERN = r"^[a-zA-Z_][a-zA-Z0-9_]*$"

ReplicaCount = Annotated[int, Field(ge=0, le=MAX_REPLICAS)]


# --- spec.container ------------------------------------------------------------------------


def _probes_have_ports(container: ContainerSpec) -> bool:
    probes = (container.readiness_probe, container.liveness_probe, container.startup_probe)
    return container.port is not None or not any(
        probe is not None and probe.needs_port() for probe in probes
    )


def _probe_port_rule(field: str) -> str:
    return (
        f"!has(self.{field}) || has(self.{field}.exec) || "
        f"(has(self.{field}.httpGet) && has(self.{field}.httpGet.port)) || "
        f"(has(self.{field}.tcpSocket) && has(self.{field}.tcpSocket.port))"
    )


def _list_map(key: str, max_length: int) -> Any:
    return Field(
        max_length=max_length,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]},
    )


class ContainerSpec(ApiModel):
    """The one container of each replica: what a tenant may choose, nothing more."""

    cel_rules = (
        CelRule(
            rule="has(self.port) || ("
            + " && ".join(_probe_port_rule(field) for field in PROBE_FIELDS)
            + ")",
            message="a probe's httpGet.port or tcpSocket.port is required when the container "
            "has no port",
            holds=_probes_have_ports,
        ),
    )

    image: Annotated[
        str, StringConstraints(min_length=1, max_length=IMAGE_MAX_LENGTH, pattern=IMAGE_PATTERN)
    ]
    """Container image reference, such as vllm/vllm-openai:v0.11.0 (a digest pins it)."""
    command: Annotated[list[Argument], Field(max_length=32)] | None = None
    """Entrypoint; the image's own when absent."""
    args: Annotated[list[Argument], Field(max_length=64)] | None = None
    """Arguments to the entrypoint."""
    env: Annotated[list[EnvVar], _list_map("name", 64)] | None = None
    """Environment variables: literal values, or keys of the namespace's Secrets and
    ConfigMaps."""
    env_from: Annotated[list[EnvFromSource], Field(max_length=8)] | None = None
    """Whole Secrets or ConfigMaps of the namespace as variables, each behind a prefix."""
    port: Port | None = None
    """Port the container serves on; a ClusterIP Service named after the AIService is
    created when set."""
    resources: ContainerResources | None = None
    """CPU, memory and local disk per replica; the GPUs come from gpusPerReplica."""
    readiness_probe: Probe | None = None
    """When a replica may receive traffic; without a probe a replica is ready once running."""
    startup_probe: Probe | None = None
    """Whether the server has started (its model loaded); the other probes wait for it, so
    periodSeconds x failureThreshold is the longest a model may take to load."""
    liveness_probe: Probe | None = None
    """When the kubelet restarts a hung server."""
    volume_mounts: Annotated[list[VolumeMount], _list_map("mountPath", 32)] | None = None
    """Where the volumes of spec.volumes appear in the container."""
    security_context: SecurityContext | None = None
    """The user and group the container runs as, and a read-only image; privilege is never
    added."""

    @field_validator("env")
    @classmethod
    def _env_names_unique(cls, env: list[EnvVar] | None) -> list[EnvVar] | None:
        # The API server refuses duplicates through the list-map keyed by name; this gives
        # the operator the same answer.
        _refuse_repeats("env names", [variable.name for variable in env or ()])
        return env

    @field_validator("volume_mounts")
    @classmethod
    def _mount_paths_unique(cls, mounts: list[VolumeMount] | None) -> list[VolumeMount] | None:
        _refuse_repeats("volumeMounts mount paths", [mount.mount_path for mount in mounts or ()])
        return mounts


def _refuse_repeats(what: str, values: list[str]) -> None:
    duplicates = sorted({value for value in values if values.count(value) > 1})
    if duplicates:
        msg = f"{what} must be unique; repeated: {', '.join(duplicates)}"
        raise ValueError(msg)


class LocalObjectReference(ApiModel):
    """An object of the service's own namespace, by name."""

    name: DnsSubdomain
    """Its name."""


# --- spec.autoscaling ----------------------------------------------------------------------


def _is_positive(source: PrometheusMetricSource) -> bool:
    return source.target_per_replica_decimal > 0


def _no_reserved_labels(source: PrometheusMetricSource) -> bool:
    return not any(
        name in RESERVED_PROMETHEUS_LABELS or name.startswith("__") for name in source.labels or {}
    )


class PrometheusMetricSource(ApiModel):
    """A Prometheus series that measures the service's demand. The operator builds the query
    itself from these fields, always scoped to the service's namespace."""

    cel_rules = (
        CelRule(
            rule="self.targetPerReplica.matches('[1-9]')",
            message="targetPerReplica must be greater than zero",
            holds=_is_positive,
            field_path=".targetPerReplica",
        ),
        CelRule(
            rule="!has(self.labels) || self.labels.all(k, !k.startsWith('__') && "
            f"!(k in {list(RESERVED_PROMETHEUS_LABELS)}))",
            message=f"labels may not match {', '.join(RESERVED_PROMETHEUS_LABELS)} (the operator "
            "scopes every query to the service itself) nor names starting with __",
            holds=_no_reserved_labels,
            field_path=".labels",
        ),
    )

    metric: Annotated[
        str, StringConstraints(min_length=1, max_length=200, pattern=PROMETHEUS_METRIC_PATTERN)
    ]
    """Metric name, such as vllm:num_requests_waiting."""
    labels: (
        Annotated[
            dict[
                Annotated[
                    str,
                    StringConstraints(max_length=128, pattern=PROMETHEUS_LABEL_PATTERN),
                    Field(description="a Prometheus label name"),
                ],
                Annotated[str, StringConstraints(max_length=256)],
            ],
            Field(max_length=8),
        ]
        | None
    ) = None
    """Exact-match label filters, label name to value."""
    aggregation: Literal["sum", "avg", "max"] = "sum"
    """How the series of the namespace combine into one value."""
    target_per_replica: DecimalString
    """Value one replica is sized for: desired replicas = value / targetPerReplica."""
    activation_value: DecimalString = "0"
    """Demand above this value wakes a service scaled to zero."""

    @property
    def target_per_replica_decimal(self) -> Decimal:
        """targetPerReplica as an exact decimal."""
        return parse_decimal(self.target_per_replica)

    @property
    def activation_value_decimal(self) -> Decimal:
        """activationValue as an exact decimal."""
        return parse_decimal(self.activation_value)


def _prometheus_iff_type_prometheus(metric: AutoscalingMetric) -> bool:
    return (metric.type == "Prometheus") == (metric.prometheus is not None)


def _target_percent_iff_gpu_type(metric: AutoscalingMetric) -> bool:
    return (metric.type != "Prometheus") == (metric.target_percent is not None)


class AutoscalingMetric(ApiModel):
    """One signal the autoscaler sizes the service by."""

    cel_rules = (
        CelRule(
            rule="(self.type == 'Prometheus') == has(self.prometheus)",
            message="prometheus is required when type is Prometheus and not allowed otherwise",
            holds=_prometheus_iff_type_prometheus,
        ),
        CelRule(
            rule="(self.type != 'Prometheus') == has(self.targetPercent)",
            message="targetPercent is required for types GPUUtilization and GPUMemory and not "
            "allowed for Prometheus (which uses prometheus.targetPerReplica)",
            holds=_target_percent_iff_gpu_type,
        ),
    )

    type: Literal["GPUUtilization", "GPUMemory", "Prometheus"]
    """GPUUtilization and GPUMemory read the DCGM exporter; Prometheus reads any series."""
    target_percent: Annotated[int, Field(ge=1, le=100)] | None = None
    """For GPU types: the average percentage per GPU to keep the service at."""
    prometheus: PrometheusMetricSource | None = None
    """For type Prometheus: which series, and the value one replica handles."""


class ScalingRules(ApiModel):
    """How fast the service may change size in one direction."""

    stabilization_window_seconds: Annotated[int, Field(ge=0, le=3600)] = 0
    """Recommendations of this many past seconds are considered, damping flapping."""
    max_step_percent: Annotated[int, Field(ge=0, le=1000)] = 100
    """Most replicas added or removed per period, as a percentage of the current count."""
    max_step_replicas: Annotated[int, Field(ge=0, le=MAX_REPLICAS)] = 4
    """Most replicas added or removed per period; the larger of the two step limits applies."""
    period_seconds: Annotated[int, Field(ge=1, le=1800)] = 15
    """Length of the period the step limits count over."""


class ScaleUpRules(ScalingRules):
    """How fast the service may grow: at once by default."""


class ScaleDownRules(ScalingRules):
    """How fast the service may shrink: after five quiet minutes by default, as the HPA."""

    stabilization_window_seconds: Annotated[int, Field(ge=0, le=3600)] = 300
    """Recommendations of this many past seconds are considered, damping flapping."""


def _fallback_iff_policy_fallback(policy: MetricsUnavailablePolicy) -> bool:
    return (policy.policy == "Fallback") == (policy.fallback_replicas is not None)


class MetricsUnavailablePolicy(ApiModel):
    """What the autoscaler does while a metric cannot be read."""

    cel_rules = (
        CelRule(
            # has(): the API server checks this rule against the `{}` default of the parent
            # field before nested defaults apply, so policy may be absent (meaning Hold).
            rule="(has(self.policy) && self.policy == 'Fallback') == has(self.fallbackReplicas)",
            message="fallbackReplicas is required when policy is Fallback and not allowed "
            "otherwise",
            holds=_fallback_iff_policy_fallback,
        ),
    )

    policy: Literal["Hold", "ScaleUpOnly", "Fallback"] = "Hold"
    """Hold keeps the current size; ScaleUpOnly lets the other metrics grow the service but
    not shrink it; Fallback moves to fallbackReplicas."""
    fallback_replicas: ReplicaCount | None = None
    """Replicas to run while metrics are unavailable, with policy Fallback."""


def _gpu_metrics_once(autoscaling: AutoscalingSpec) -> bool:
    types = [metric.type for metric in autoscaling.metrics or ()]
    return types.count("GPUUtilization") <= 1 and types.count("GPUMemory") <= 1


class AutoscalingSpec(ApiModel):
    """How the service's size follows its load."""

    cel_rules = (
        CelRule(
            rule="!has(self.metrics) || (self.metrics.filter(m, m.type == 'GPUUtilization')"
            ".size() <= 1 && self.metrics.filter(m, m.type == 'GPUMemory').size() <= 1)",
            message="metrics may hold each of GPUUtilization and GPUMemory at most once",
            holds=_gpu_metrics_once,
            field_path=".metrics",
        ),
    )

    mode: Literal["Auto", "Recommend", "Off"] = "Auto"
    """Auto resizes the service; Recommend only writes status.recommendation; Off leaves
    spec.replicas to a person, an HPA or KEDA through the scale subresource."""
    tolerance_percent: Annotated[int, Field(ge=0, le=100)] = 10
    """Changes smaller than this percentage of the target are ignored."""
    metrics: Annotated[list[AutoscalingMetric], Field(max_length=8)] | None = None
    """Signals to size by; the largest resulting replica count wins."""
    scale_up: ScaleUpRules = Field(
        default_factory=ScaleUpRules, json_schema_extra=DEFAULT_EMPTY_OBJECT
    )
    """Limits on growing."""
    scale_down: ScaleDownRules = Field(
        default_factory=ScaleDownRules, json_schema_extra=DEFAULT_EMPTY_OBJECT
    )
    """Limits on shrinking."""
    scale_to_zero_after_seconds: Annotated[int, Field(ge=0, le=86400)] = 300
    """With minReplicas 0: seconds without demand before the service scales to zero."""
    on_metrics_unavailable: MetricsUnavailablePolicy = Field(
        default_factory=MetricsUnavailablePolicy, json_schema_extra=DEFAULT_EMPTY_OBJECT
    )
    """What to do while a metric cannot be read."""


class Budget(ApiModel):
    """A spending cap that limits scaling."""

    max_cost_per_hour: DecimalString
    """Most the service may cost per hour, in the pool's currency; the autoscaler never
    exceeds it."""

    @property
    def max_cost_per_hour_decimal(self) -> Decimal:
        """maxCostPerHour as an exact decimal."""
        return parse_decimal(self.max_cost_per_hour)


# --- spec ----------------------------------------------------------------------------------


def _min_not_above_max(spec: AIServiceSpec) -> bool:
    return spec.min_replicas <= spec.max_replicas


def _fallback_within_bounds(spec: AIServiceSpec) -> bool:
    fallback = spec.autoscaling.on_metrics_unavailable.fallback_replicas
    return fallback is None or spec.min_replicas <= fallback <= spec.max_replicas


def _has_metrics_when_it_can_scale(spec: AIServiceSpec) -> bool:
    return (
        spec.min_replicas == spec.max_replicas
        or spec.autoscaling.mode == "Off"
        or bool(spec.autoscaling.metrics)
    )


def _mounts_name_volumes(spec: AIServiceSpec) -> bool:
    volumes = {volume.name for volume in spec.volumes or ()}
    return all(mount.name in volumes for mount in spec.container.volume_mounts or ())


def _memory_volumes_bounded(spec: AIServiceSpec) -> bool:
    in_memory = any(
        volume.empty_dir is not None and volume.empty_dir.medium == "Memory"
        for volume in spec.volumes or ()
    )
    resources = spec.container.resources
    return not in_memory or (resources is not None and resources.memory is not None)


def _pod_labels_unreserved(spec: AIServiceSpec) -> bool:
    return outside_reserved_domains(spec.pod_labels)


def _pod_annotations_unreserved(spec: AIServiceSpec) -> bool:
    return outside_reserved_domains(spec.pod_annotations)


def _can_wake_from_zero(spec: AIServiceSpec) -> bool:
    return (
        spec.min_replicas > 0
        or spec.autoscaling.mode != "Auto"
        or any(metric.type == "Prometheus" for metric in spec.autoscaling.metrics or ())
    )


class AIServiceSpec(ApiModel):
    """A GPU service: a container, how many GPUs each replica gets, from which pool, and how
    the replica count follows load and budget."""

    cel_rules = (
        CelRule(
            rule="self.minReplicas <= self.maxReplicas",
            message="minReplicas must not exceed maxReplicas",
            holds=_min_not_above_max,
            field_path=".minReplicas",
        ),
        CelRule(
            rule="!has(self.autoscaling.onMetricsUnavailable.fallbackReplicas) || "
            "(self.autoscaling.onMetricsUnavailable.fallbackReplicas >= self.minReplicas && "
            "self.autoscaling.onMetricsUnavailable.fallbackReplicas <= self.maxReplicas)",
            message="autoscaling.onMetricsUnavailable.fallbackReplicas must lie between "
            "minReplicas and maxReplicas",
            holds=_fallback_within_bounds,
            field_path=".autoscaling.onMetricsUnavailable.fallbackReplicas",
        ),
        CelRule(
            rule="self.minReplicas == self.maxReplicas || self.autoscaling.mode == 'Off' || "
            "(has(self.autoscaling.metrics) && size(self.autoscaling.metrics) > 0)",
            message="autoscaling.metrics needs at least one metric when minReplicas < "
            "maxReplicas and mode is Auto or Recommend",
            holds=_has_metrics_when_it_can_scale,
            field_path=".autoscaling.metrics",
        ),
        CelRule(
            rule="self.minReplicas > 0 || self.autoscaling.mode != 'Auto' || "
            "(has(self.autoscaling.metrics) && "
            "self.autoscaling.metrics.exists(m, m.type == 'Prometheus'))",
            message="minReplicas 0 with mode Auto needs a Prometheus metric: GPU metrics "
            "vanish with the last replica, so nothing else could wake the service",
            holds=_can_wake_from_zero,
            field_path=".minReplicas",
        ),
        CelRule(
            rule="!has(self.container.volumeMounts) || self.container.volumeMounts.all(m, "
            "has(self.volumes) && self.volumes.exists(v, v.name == m.name))",
            message="every container.volumeMounts entry must name a volume of spec.volumes",
            holds=_mounts_name_volumes,
            field_path=".container.volumeMounts",
        ),
        CelRule(
            rule="!has(self.volumes) || !self.volumes.exists(v, has(v.emptyDir) && "
            "has(v.emptyDir.medium) && v.emptyDir.medium == 'Memory') || "
            "(has(self.container.resources) && has(self.container.resources.memory))",
            message="an emptyDir of medium Memory needs container.resources.memory: the tmpfs "
            "counts against the memory limit, and without one it could take the memory of "
            "the node's other pods",
            holds=_memory_volumes_bounded,
            field_path=".volumes",
        ),
        CelRule(
            rule=reserved_domains_rule("podLabels"),
            message=reserved_domains_message("podLabels"),
            holds=_pod_labels_unreserved,
            field_path=".podLabels",
        ),
        CelRule(
            rule=reserved_domains_rule("podAnnotations"),
            message=reserved_domains_message("podAnnotations"),
            holds=_pod_annotations_unreserved,
            field_path=".podAnnotations",
        ),
    )

    pool: DnsLabel
    """Name of the GPUPool to run on."""
    gpus_per_replica: Annotated[int, Field(ge=1, le=MAX_GPUS_PER_REPLICA)] = 1
    """GPUs (of the pool's resource) each replica requests."""
    container: ContainerSpec
    """The container every replica runs."""
    min_replicas: ReplicaCount = 1
    """Fewest replicas; 0 allows scaling to zero."""
    max_replicas: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] = 1
    """Most replicas."""
    replicas: ReplicaCount | None = None
    """Replica count set through the scale subresource (kubectl scale, an HPA, KEDA); used
    when autoscaling.mode is Off."""
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec, json_schema_extra=DEFAULT_EMPTY_OBJECT
    )
    """How the replica count follows load."""
    budget: Budget | None = None
    """Optional cap on the service's cost per hour."""
    volumes: Annotated[list[Volume], _list_map("name", 32)] | None = None
    """Volumes of every replica: claims, empty directories (a memory-backed /dev/shm),
    ConfigMaps, Secrets and per-replica claims of the service's namespace."""
    image_pull_secrets: Annotated[list[LocalObjectReference], _list_map("name", 8)] | None = None
    """Secrets of the namespace holding credentials for a private registry."""
    service_account_name: DnsSubdomain | None = None
    """ServiceAccount of the namespace the replicas run as; the namespace's default when
    absent."""
    automount_service_account_token: bool = False
    """Mount the ServiceAccount's API token; off, since an inference server seldom calls
    the Kubernetes API."""
    termination_grace_period_seconds: Annotated[int, Field(ge=0, le=3600)] | None = None
    """Seconds a replica has to finish in-flight requests after SIGTERM; 30 when absent."""
    priority_class_name: DnsSubdomain | None = None
    """PriorityClass of the replicas; must be one the pool lists in
    spec.priorityClassNames, since a higher priority may preempt other teams' replicas."""
    pod_labels: PodLabels | None = None
    """Extra labels on the replicas' pods, outside the gpuyard.io and kubernetes.io
    domains."""
    pod_annotations: PodAnnotations | None = None
    """Extra annotations on the replicas' pods, outside the gpuyard.io and kubernetes.io
    domains."""
    disruption_budget: DisruptionBudget = Field(
        default_factory=DisruptionBudget, json_schema_extra=DEFAULT_EMPTY_OBJECT
    )
    """The PodDisruptionBudget kept while maxReplicas is above 1."""


# --- status --------------------------------------------------------------------------------


class RecommendationStatus(ApiModel):
    """The autoscaler's last decision and why it made it."""

    replicas: ReplicaCount
    """Replicas the autoscaler recommends."""
    reason: CamelCaseWord = Field(
        description=f"Why the autoscaler recommends replicas: {word_list(Reason)}."
    )
    metric: Annotated[str, StringConstraints(max_length=256)] | None = None
    """The metric that decided, such as GPUUtilization or a Prometheus metric name."""
    current_value: MeasurementString | None = None
    """Its value when the decision was made."""
    target_value: MeasurementString | None = None
    """Its target."""
    limited_by: CamelCaseWord | None = Field(
        default=None,
        description=f"The limit that cut the raw recommendation: {word_list(LimitingFactor)}.",
    )
    time: Timestamp
    """When the decision was made."""


#: A currency code as a map key (the CRD's key check allows a pattern and a length only).
CurrencyKey = Annotated[
    str,
    StringConstraints(max_length=3, pattern=CURRENCY_PATTERN),
    Field(description="an ISO 4217 currency code"),
]


class UsageTotals(ApiModel):
    """What the service has consumed since it was created."""

    gpu_seconds: Annotated[int, Field(ge=0, le=2**53)]
    """GPU-seconds held by the service's pods."""
    cost: AmountString
    """Their cost, a decimal string in currency."""
    currency: CurrencyCode
    """ISO 4217 code of cost: the currency of the latest billed window."""
    cost_by_currency: Annotated[dict[CurrencyKey, AmountString], Field(max_length=16)] | None = None
    """The total in each currency, once the service was billed in more than one (it moved
    to a pool of another currency)."""
    reported_through: Timestamp
    """Usage up to this moment is included."""


class StartupStatus(ApiModel):
    """How long the service's replicas took to start: from binding to a node (when their
    GPUs start to be billed) to Ready, in whole seconds (pod condition times are)."""

    last_seconds: Annotated[int, Field(ge=0, le=2**31 - 1)]
    """The start of the replica that turned Ready last."""
    median_seconds: Annotated[int, Field(ge=0, le=2**31 - 1)]
    """The median of the recent starts (the lower middle one of an even count)."""
    samples: Annotated[int, Field(ge=1, le=100)]
    """How many recent starts the median covers."""


class AIServiceStatus(ApiModel):
    """The service as the operator last observed and decided it."""

    observed_generation: Generation | None = None
    """The metadata.generation this status was computed from."""
    replicas: ReplicaCount | None = None
    """Replicas that exist (the scale subresource's status replicas)."""
    ready_replicas: ReplicaCount | None = None
    """Replicas ready to serve."""
    desired_replicas: ReplicaCount | None = None
    """Replicas the operator asks the Deployment for."""
    selector: Annotated[str, StringConstraints(max_length=1024)] | None = None
    """Label selector of the replicas' pods, in string form (for the scale subresource)."""
    gpu_type: DnsLabel | None = None
    """GPU type of the pool the service runs on."""
    recommendation: RecommendationStatus | None = None
    """The autoscaler's last recommendation."""
    last_scale_time: Timestamp | None = None
    """When the operator last changed desiredReplicas."""
    usage: UsageTotals | None = None
    """GPU-seconds and cost so far."""
    conditions: ConditionList | None = None
    """Ready, Accepted, CapacityLimited, QuotaLimited, BudgetLimited, MetricsAvailable,
    UsageReported and, once a scale request went unapplied, ScaleRequestIgnored; Reconciling
    and Stalled say Ready as kstatus (Flux) reads it."""
    startup: StartupStatus | None = None
    """The observed time to ready of the replicas (absent until one has started)."""


# --- the whole object ----------------------------------------------------------------------


class ServiceMeta(ObjectMeta):
    """AIService metadata, with the name restricted to what a Service name can hold."""

    name: Annotated[
        str,
        StringConstraints(
            min_length=1, max_length=SERVICE_NAME_MAX_LENGTH, pattern=SERVICE_NAME_PATTERN
        ),
    ]
    namespace: DnsLabel


class AIService(ApiObject):
    """A whole AIService object as the API returns it."""

    kind: Literal["AIService"] = KIND
    metadata: ServiceMeta
    spec: AIServiceSpec

    @property
    def namespace(self) -> str:
        """The service's namespace."""
        return self.metadata.namespace
