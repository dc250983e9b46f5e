"""The pod surface of an AIService: what a real inference server needs, and nothing that
reaches the node.

A tenant with the `edit` role in a namespace may ask gpuyard for pods, so every field here
is one that role could set on a pod of its own without touching the host or another
namespace: environment from the namespace's Secrets and ConfigMaps, volumes of five kinds
(claims, empty directories such as a memory-backed `/dev/shm`, ConfigMaps, Secrets and
per-pod claims), probes, pull secrets, a ServiceAccount, and a security context that can
only take privilege away. What is absent cannot be asked for: the API server refuses an
unknown field for a client that validates strictly (kubectl does by default) and prunes
it, with a warning, for one that does not, so `hostPath`, `privileged`, added capabilities,
host namespaces, and a Secret of another namespace never reach a pod gpuyard builds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Final, Literal

from pydantic import Field, StringConstraints

from gpuyard.api.common import (
    ApiModel,
    CelRule,
    DnsLabel,
    DnsSubdomain,
    LabelKey,
    LabelValue,
)

#: Kubernetes quantity, restricted to plain decimals with a binary or decimal suffix.
QUANTITY_PATTERN = r"^[0-9]{1,12}([.][0-9]{1,9})?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
HTTP_PATH_PATTERN = r"^/[!-~]*$"
#: A key of a ConfigMap or Secret.
CONFIG_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
#: An absolute path inside the container; no colon, which the runtime reads as a separator.
MOUNT_PATH_PATTERN = r"^/[^:]*$"
#: A relative path: no leading slash; `..` segments are refused by a CEL rule.
RELATIVE_PATH_PATTERN = r"^[^/]"
_PARENT_SEGMENT = "(^|/)[.][.](/|$)"

Port = Annotated[int, Field(ge=1, le=65535)]
Quantity = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=QUANTITY_PATTERN)]
Argument = Annotated[str, StringConstraints(max_length=4096)]
ConfigKey = Annotated[
    str, StringConstraints(min_length=1, max_length=253, pattern=CONFIG_KEY_PATTERN)
]
RelativePath = Annotated[
    str, StringConstraints(min_length=1, max_length=1024, pattern=RELATIVE_PATH_PATTERN)
]
#: File mode bits of projected files, 0 to 0777 (the API takes them as a decimal integer).
FileMode = Annotated[int, Field(ge=0, le=0o777)]
#: A Linux user or group id. 0 is allowed (most inference images run as root); Pod Security
#: "restricted" refuses it where the namespace asks.
LinuxId = Annotated[int, Field(ge=0, le=2**31 - 1)]


# --- environment ---------------------------------------------------------------------------

#: Names the NVIDIA container toolkit reads from a container's environment to decide which
#: GPUs it sees, which driver libraries are mounted and which requirements are checked
#: (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES, NVIDIA_REQUIRE_*, NVIDIA_MIG_*, ...).
#: The whole prefix is refused rather than a list that each toolkit release extends.
GPU_RUNTIME_ENV_PREFIX: Final = "NVIDIA_"
#: Set without NVIDIA_REQUIRE_CUDA, it makes the toolkit treat the image as a legacy CUDA
#: image, which widens the default devices and driver capabilities.
GPU_RUNTIME_LEGACY_ENV: Final = "CUDA_VERSION"


def read_by_gpu_runtime(name: str) -> bool:
    """Whether the NVIDIA container toolkit reads an environment variable of this name."""
    return name.startswith(GPU_RUNTIME_ENV_PREFIX) or name == GPU_RUNTIME_LEGACY_ENV


def _not_read_by_gpu_runtime(variable: EnvVar) -> bool:
    return not read_by_gpu_runtime(variable.name)


def _value_or_source(variable: EnvVar) -> bool:
    return variable.value is None or variable.value_from is None


class SecretKeySelector(ApiModel):
    """One key of a Secret in the service's own namespace."""

    name: DnsSubdomain
    """Name of the Secret."""
    key: ConfigKey
    """Key within it."""
    optional: bool = False
    """Start the container even when the Secret or key is missing."""


class ConfigMapKeySelector(ApiModel):
    """One key of a ConfigMap in the service's own namespace."""

    name: DnsSubdomain
    """Name of the ConfigMap."""
    key: ConfigKey
    """Key within it."""
    optional: bool = False
    """Start the container even when the ConfigMap or key is missing."""


def _one_key_source(source: EnvVarSource) -> bool:
    return (source.secret_key_ref is None) != (source.config_map_key_ref is None)


class EnvVarSource(ApiModel):
    """Where a variable's value comes from: a key of a Secret or a ConfigMap."""

    cel_rules = (
        CelRule(
            rule="has(self.secretKeyRef) != has(self.configMapKeyRef)",
            message="valueFrom needs exactly one of secretKeyRef and configMapKeyRef",
            holds=_one_key_source,
        ),
    )

    secret_key_ref: SecretKeySelector | None = None
    """A key of a Secret, such as a Hugging Face token."""
    config_map_key_ref: ConfigMapKeySelector | None = None
    """A key of a ConfigMap."""


class EnvVar(ApiModel):
    """One environment variable of the container."""

    cel_rules = (
        CelRule(
            rule=f"!self.name.startsWith('{GPU_RUNTIME_ENV_PREFIX}') && "
            f"self.name != '{GPU_RUNTIME_LEGACY_ENV}'",
            message=f"env names starting with {GPU_RUNTIME_ENV_PREFIX} and "
            f"{GPU_RUNTIME_LEGACY_ENV} are reserved: the NVIDIA container toolkit reads them to "
            "decide which GPUs and driver features a container gets, and gpuyard assigns each "
            "replica its GPUs through the device plugin",
            holds=_not_read_by_gpu_runtime,
            field_path=".name",
        ),
        CelRule(
            rule="!has(self.value) || !has(self.valueFrom)",
            message="an env entry takes value or valueFrom, not both",
            holds=_value_or_source,
        ),
    )

    name: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=ENV_NAME_PATTERN)]
    """Variable name, a C identifier; not one the NVIDIA container toolkit reads."""
    value: Annotated[str, StringConstraints(max_length=32768)] | None = None
    """Literal value; empty when neither value nor valueFrom is given."""
    value_from: EnvVarSource | None = None
    """Value from a Secret or ConfigMap key of the service's namespace, so a token never
    sits in the spec."""


class EnvFromSecret(ApiModel):
    """A whole Secret of the service's own namespace."""

    name: DnsSubdomain
    """Name of the Secret."""
    optional: bool = False
    """Start the container even when the Secret is missing."""


class EnvFromConfigMap(ApiModel):
    """A whole ConfigMap of the service's own namespace."""

    name: DnsSubdomain
    """Name of the ConfigMap."""
    optional: bool = False
    """Start the container even when the ConfigMap is missing."""


def _one_whole_source(source: EnvFromSource) -> bool:
    return (source.secret_ref is None) != (source.config_map_ref is None)


def _prefix_cannot_reach_gpu_runtime(source: EnvFromSource) -> bool:
    prefix = source.prefix
    return not (
        read_by_gpu_runtime(prefix)
        or GPU_RUNTIME_ENV_PREFIX.startswith(prefix)
        or GPU_RUNTIME_LEGACY_ENV.startswith(prefix)
    )


class EnvFromSource(ApiModel):
    """Every key of a Secret or ConfigMap as a variable, each name behind a prefix.

    The prefix is required because the keys are not in the spec: without it, a ConfigMap
    key NVIDIA_VISIBLE_DEVICES=all would reach the NVIDIA container toolkit and show the
    replica every GPU of its node. A prefix that no reserved name can start with closes
    that door for every key the object may ever hold.
    """

    cel_rules = (
        CelRule(
            rule="has(self.secretRef) != has(self.configMapRef)",
            message="envFrom entries need exactly one of secretRef and configMapRef",
            holds=_one_whole_source,
        ),
        CelRule(
            rule=f"!self.prefix.startsWith('{GPU_RUNTIME_ENV_PREFIX}') && "
            f"!'{GPU_RUNTIME_ENV_PREFIX}'.startsWith(self.prefix) && "
            f"!'{GPU_RUNTIME_LEGACY_ENV}'.startsWith(self.prefix)",
            message=f"envFrom prefix must not let a key form a name starting with "
            f"{GPU_RUNTIME_ENV_PREFIX} or the name {GPU_RUNTIME_LEGACY_ENV}: the NVIDIA "
            "container toolkit reads those (use a prefix such as APP_, or valueFrom for "
            "single keys)",
            holds=_prefix_cannot_reach_gpu_runtime,
            field_path=".prefix",
        ),
    )

    prefix: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=ENV_NAME_PATTERN)]
    """Put before every key to form the variable's name, such as HF_."""
    secret_ref: EnvFromSecret | None = None
    """The Secret whose keys become variables."""
    config_map_ref: EnvFromConfigMap | None = None
    """The ConfigMap whose keys become variables."""


# --- resources -----------------------------------------------------------------------------


class ContainerResources(ApiModel):
    """CPU, memory and local disk of one replica, used as both request and limit."""

    cpu: Quantity | None = None
    """CPU, such as 4 or 500m."""
    memory: Quantity | None = None
    """Memory, such as 16Gi."""
    # Named as in a pod's resources, not camelCased: people paste it from there.
    ephemeral_storage: Quantity | None = Field(default=None, alias="ephemeral-storage")
    """Local disk for the container's writable layer, logs and disk-backed emptyDir
    volumes, such as 50Gi; the kubelet evicts a replica that exceeds it."""


# --- probes --------------------------------------------------------------------------------


class HTTPGetAction(ApiModel):
    """An HTTP GET that succeeds with a 2xx or 3xx status."""

    path: Annotated[
        str, StringConstraints(min_length=1, max_length=2048, pattern=HTTP_PATH_PATTERN)
    ] = "/"
    """Path to request, starting with a slash."""
    port: Port | None = None
    """Port to request; defaults to the container's port."""


class TCPSocketAction(ApiModel):
    """A TCP connection that succeeds once the port accepts it."""

    port: Port | None = None
    """Port to connect to; defaults to the container's port."""


class ExecAction(ApiModel):
    """A command run inside the container (never on the node) that succeeds with exit 0."""

    command: Annotated[list[Argument], Field(min_length=1, max_length=32)]
    """The command and its arguments, run without a shell."""


def _one_handler(probe: Probe) -> bool:
    handlers = (probe.http_get, probe.tcp_socket, probe.exec_action)
    return sum(handler is not None for handler in handlers) == 1


class Probe(ApiModel):
    """One check of a replica: an HTTP GET, a TCP connect, or a command in the container."""

    cel_rules = (
        CelRule(
            rule="[has(self.httpGet), has(self.tcpSocket), has(self.exec)]"
            ".filter(set, set).size() == 1",
            message="a probe needs exactly one of httpGet, tcpSocket and exec",
            holds=_one_handler,
        ),
    )

    http_get: HTTPGetAction | None = None
    """An HTTP GET to the replica."""
    tcp_socket: TCPSocketAction | None = None
    """A TCP connection to the replica."""
    exec_action: ExecAction | None = Field(default=None, alias="exec")
    """A command inside the container."""
    initial_delay_seconds: Annotated[int, Field(ge=0, le=3600)] = 0
    """Seconds after start before the first probe."""
    period_seconds: Annotated[int, Field(ge=1, le=300)] = 10
    """Seconds between probes."""
    timeout_seconds: Annotated[int, Field(ge=1, le=300)] = 1
    """Seconds a probe may take before it counts as failed."""
    failure_threshold: Annotated[int, Field(ge=1, le=1000)] = 3
    """Consecutive failures before the probe gives up; for a startup probe,
    periodSeconds x failureThreshold is the time a model may take to load."""

    def port(self) -> int | None:
        """The port the probe names, if it names one."""
        if self.http_get is not None:
            return self.http_get.port
        if self.tcp_socket is not None:
            return self.tcp_socket.port
        return None

    def needs_port(self) -> bool:
        """Whether the probe reaches the container over the network without naming a port."""
        return self.exec_action is None and self.port() is None


PROBE_FIELDS: Final = ("readinessProbe", "livenessProbe", "startupProbe")


# --- volumes -------------------------------------------------------------------------------


def _no_parent_segment(item: KeyToPath) -> bool:
    return re.search(_PARENT_SEGMENT, item.path) is None


class KeyToPath(ApiModel):
    """One key of a ConfigMap or Secret projected as a file."""

    cel_rules = (
        CelRule(
            rule=f"!self.path.matches('{_PARENT_SEGMENT}')",
            message="path may not contain a '..' segment",
            holds=_no_parent_segment,
            field_path=".path",
        ),
    )

    key: ConfigKey
    """The key."""
    path: RelativePath
    """Relative path of the file within the volume."""
    mode: FileMode | None = None
    """File mode bits, such as 0400 (given as the decimal 256)."""


KeyItems = Annotated[list[KeyToPath], Field(max_length=64)]


class PersistentVolumeClaimVolume(ApiModel):
    """A PersistentVolumeClaim of the service's namespace, such as a model cache."""

    claim_name: DnsSubdomain
    """Name of the claim."""
    read_only: bool = False
    """Mount the claim read-only (a shared cache that one job fills)."""


class EmptyDirVolume(ApiModel):
    """A directory that lives as long as the replica: scratch space, or with medium Memory a
    tmpfs such as the /dev/shm that tensor-parallel inference needs."""

    medium: Literal["", "Memory"] = ""
    """Memory for a tmpfs (counted against the container's memory limit); empty for the
    node's disk."""
    size_limit: Quantity | None = None
    """Most the directory may hold, such as 16Gi."""


class ConfigMapVolume(ApiModel):
    """A ConfigMap of the service's namespace as files."""

    name: DnsSubdomain
    """Name of the ConfigMap."""
    items: KeyItems | None = None
    """Keys to project; all of them when absent."""
    default_mode: FileMode | None = None
    """File mode bits of the files."""
    optional: bool = False
    """Start the replica even when the ConfigMap is missing."""


class SecretVolume(ApiModel):
    """A Secret of the service's namespace as files."""

    secret_name: DnsSubdomain
    """Name of the Secret."""
    items: KeyItems | None = None
    """Keys to project; all of them when absent."""
    default_mode: FileMode | None = None
    """File mode bits of the files."""
    optional: bool = False
    """Start the replica even when the Secret is missing."""


class StorageRequests(ApiModel):
    """The storage a claim asks for."""

    storage: Quantity
    """Size, such as 200Gi."""


class ClaimResources(ApiModel):
    """The resources of a claim."""

    requests: StorageRequests
    """What the claim asks for."""


AccessMode = Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]


class ClaimSpec(ApiModel):
    """The claim made for each replica."""

    access_modes: Annotated[list[AccessMode], Field(min_length=1, max_length=4)]
    """How the volume may be mounted, such as ReadWriteOnce."""
    storage_class_name: DnsSubdomain | None = None
    """StorageClass to provision from; the cluster's default when absent."""
    resources: ClaimResources
    """How much storage to ask for."""


class ClaimTemplate(ApiModel):
    """The template of a per-replica claim."""

    spec: ClaimSpec
    """The claim's spec."""


class EphemeralVolume(ApiModel):
    """A PersistentVolumeClaim made for each replica and deleted with it: fast local disk
    for a model copy that need not outlive the replica."""

    volume_claim_template: ClaimTemplate
    """The claim to make."""


VOLUME_KINDS: Final = ("persistentVolumeClaim", "emptyDir", "configMap", "secret", "ephemeral")


def _one_volume_kind(volume: Volume) -> bool:
    kinds = (
        volume.persistent_volume_claim,
        volume.empty_dir,
        volume.config_map,
        volume.secret,
        volume.ephemeral,
    )
    return sum(kind is not None for kind in kinds) == 1


class Volume(ApiModel):
    """A volume of every replica, of one of the five kinds that stay off the host."""

    cel_rules = (
        CelRule(
            rule="[" + ", ".join(f"has(self.{kind})" for kind in VOLUME_KINDS) + "]"
            ".filter(set, set).size() == 1",
            message=f"a volume needs exactly one of {', '.join(VOLUME_KINDS)} (kinds that "
            "reach the node, such as hostPath, are not available)",
            holds=_one_volume_kind,
        ),
    )

    name: DnsLabel
    """Name the volumeMounts refer to."""
    persistent_volume_claim: PersistentVolumeClaimVolume | None = None
    """An existing claim."""
    empty_dir: EmptyDirVolume | None = None
    """A scratch directory, or a tmpfs with medium Memory."""
    config_map: ConfigMapVolume | None = None
    """A ConfigMap's keys as files."""
    secret: SecretVolume | None = None
    """A Secret's keys as files."""
    ephemeral: EphemeralVolume | None = None
    """A claim made for each replica."""


def _sub_path_inside(mount: VolumeMount) -> bool:
    return mount.sub_path is None or re.search(_PARENT_SEGMENT, mount.sub_path) is None


class VolumeMount(ApiModel):
    """Where a volume appears in the container."""

    cel_rules = (
        CelRule(
            rule=f"!has(self.subPath) || !self.subPath.matches('{_PARENT_SEGMENT}')",
            message="subPath may not contain a '..' segment",
            holds=_sub_path_inside,
            field_path=".subPath",
        ),
    )

    name: DnsLabel
    """Name of a volume in spec.volumes."""
    mount_path: Annotated[
        str, StringConstraints(min_length=1, max_length=1024, pattern=MOUNT_PATH_PATTERN)
    ]
    """Absolute path in the container, such as /dev/shm or /root/.cache/huggingface."""
    sub_path: RelativePath | None = None
    """Path within the volume to mount instead of its root."""
    read_only: bool = False
    """Mount read-only."""


# --- security context ----------------------------------------------------------------------


class SeccompProfile(ApiModel):
    """The seccomp profile: the container runtime's default, the only one offered."""

    type: Literal["RuntimeDefault"] = "RuntimeDefault"
    """RuntimeDefault; gpuyard sets it on every pod whether asked or not."""


def _non_root_not_uid_zero(context: SecurityContext) -> bool:
    return not (context.run_as_non_root and context.run_as_user == 0)


class SecurityContext(ApiModel):
    """What a tenant may say about the identity the container runs as. Every field only
    takes privilege away: gpuyard always drops every capability and forbids privilege
    escalation, and offers no way to add either back."""

    cel_rules = (
        CelRule(
            rule="!(has(self.runAsNonRoot) && self.runAsNonRoot && has(self.runAsUser) && "
            "self.runAsUser == 0)",
            message="runAsNonRoot true contradicts runAsUser 0",
            holds=_non_root_not_uid_zero,
        ),
    )

    run_as_user: LinuxId | None = None
    """User id the container runs as; the image's when absent."""
    run_as_group: LinuxId | None = None
    """Primary group id the container runs as."""
    run_as_non_root: bool | None = None
    """Refuse to start the container as root; Pod Security "restricted" requires true."""
    fs_group: LinuxId | None = None
    """Group that owns the pod's volumes (set on the pod), so a non-root server can write
    its model cache."""
    read_only_root_filesystem: bool | None = None
    """Mount the image read-only; write only to volumes."""
    seccomp_profile: SeccompProfile | None = None
    """Seccomp profile: RuntimeDefault, which gpuyard applies anyway."""


# --- pod metadata --------------------------------------------------------------------------

#: Key prefixes whose meaning Kubernetes or gpuyard decide: a tenant's pod label or
#: annotation there could steer the scheduler, the ReplicaSet controller's choice of pods
#: to delete, or gpuyard's own bookkeeping.
RESERVED_KEY_PATTERN: Final = "^([^/]*[.])?(gpuyard[.]io|kubernetes[.]io|k8s[.]io)/"
RESERVED_DOMAINS: Final = ("gpuyard.io", "kubernetes.io", "k8s.io")
MAX_POD_METADATA_ENTRIES = 32


def outside_reserved_domains(keys: Mapping[str, object] | None) -> bool:
    """Whether no key lies in the gpuyard.io, kubernetes.io or k8s.io domains (or their
    subdomains)."""
    return not any(re.match(RESERVED_KEY_PATTERN, key) for key in keys or {})


def reserved_domains_rule(field: str) -> str:
    """The CEL rule `outside_reserved_domains` states for the map at `field`."""
    return f"!has(self.{field}) || self.{field}.all(k, !k.matches('{RESERVED_KEY_PATTERN}'))"


def reserved_domains_message(field: str) -> str:
    """The message of `reserved_domains_rule`."""
    return (
        f"{field} keys may not lie in the {', '.join(RESERVED_DOMAINS)} domains: Kubernetes "
        "and gpuyard give those keys their meaning"
    )


PodLabels = Annotated[
    dict[Annotated[LabelKey, Field(description="a label key")], LabelValue],
    Field(max_length=MAX_POD_METADATA_ENTRIES),
]
PodAnnotations = Annotated[
    dict[
        Annotated[LabelKey, Field(description="an annotation key")],
        Annotated[str, StringConstraints(max_length=4096)],
    ],
    Field(max_length=MAX_POD_METADATA_ENTRIES),
]


# --- disruption budget ---------------------------------------------------------------------


class DisruptionBudget(ApiModel):
    """The PodDisruptionBudget gpuyard keeps for a service of more than one replica, so a
    node drain takes replicas away one at a time."""

    enabled: bool = True
    """Keep the budget; false leaves evictions unlimited."""
    max_unavailable: Annotated[int, Field(ge=1, le=1000)] = 1
    """Replicas an eviction may leave unavailable at once. At least 1: a budget of 0 would
    stop every node drain of the pool, an outage for the platform team."""
