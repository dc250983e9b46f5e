"""Operator configuration: ``GPUYARD_*`` environment variables, overridden by CLI flags.

Read once at start-up (``gpuyard run``), never at import, and handed to the handlers
through Kopf's memo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, PlainSerializer, PlainValidator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gpuyard.logic.leadership import LeaseTimings
from gpuyard.logic.promql import (
    DEFAULT_TENANT_NAMESPACE_LABEL,
    UNIDENTIFIED_EXPORTER,
    GpuExporter,
    validate_tenant_namespace_label,
)


def _gpu_exporter(value: object) -> GpuExporter:
    if isinstance(value, GpuExporter):
        return value
    if isinstance(value, str):
        return GpuExporter.parse(value)
    raise ValueError('exporter matchers must be a string such as job="dcgm-exporter"')


#: A PromQL label-matcher list in the environment, a :class:`GpuExporter` once read.
#: NoDecode: pydantic-settings would otherwise try the text as JSON.
GpuExporterSetting = Annotated[
    GpuExporter, NoDecode, PlainValidator(_gpu_exporter), PlainSerializer(str)
]

#: A label name that Prometheus attaches to scrape targets (never an exported_* one).
TenantNamespaceLabel = Annotated[str, AfterValidator(validate_tenant_namespace_label)]


class Settings(BaseSettings):
    """Every knob of a running operator, with the defaults a production install wants."""

    # Inputs stay out of validation errors: a mistyped URL may carry a credential.
    model_config = SettingsConfigDict(
        env_prefix="GPUYARD_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    kubeconfig: Path | None = Field(
        default=None,
        description="kubeconfig to use out of cluster; in cluster the ServiceAccount is used",
    )
    cluster_id: str = Field(
        default="default",
        min_length=1,
        max_length=63,
        description="names this cluster in usage records and their ids",
    )
    metrics_address: str = Field(default="0.0.0.0", description="address of /metrics")  # noqa: S104
    metrics_port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port")
    health_address: str = Field(default="0.0.0.0", description="address of /healthz")  # noqa: S104
    health_port: int = Field(default=8081, ge=0, le=65535, description="0 picks a free port")
    workers: int = Field(default=8, ge=1, le=64, description="concurrent reconciles")
    resync_seconds: float = Field(
        default=300.0,
        ge=5,
        description="every object is reconciled at least this often, events or not",
    )
    prometheus_url: str | None = Field(default=None, description="Prometheus for GPU metrics")
    autoscale_interval: float = Field(
        default=5.0, ge=0.5, le=300, description="seconds between autoscaler ticks"
    )
    gpu_exporter_matchers: GpuExporterSetting = Field(
        default=UNIDENTIFIED_EXPORTER,
        description=(
            "PromQL label matchers that identify the real DCGM exporter's series by its scrape "
            'target, such as job="dcgm-exporter" or namespace="gpu-operator",'
            'service="nvidia-dcgm-exporter"; every GPU query reads only those series, and '
            "only theirs may name the workload through exported_namespace/exported_pod. "
            "Empty: every series is read by its plain namespace and pod labels"
        ),
    )
    tenant_namespace_label: TenantNamespaceLabel = Field(
        default=DEFAULT_TENANT_NAMESPACE_LABEL,
        description=(
            "the label that carries the namespace of a tenant metric's scrape target, as "
            "Kubernetes service discovery relabelling or the Prometheus Operator's "
            "enforcedNamespaceLabel sets it; a Prometheus-type metric is read only from "
            "series whose label names the service's own namespace. Never an exported_* label"
        ),
    )
    metrics_window_seconds: int = Field(
        default=30,
        ge=1,
        le=3600,
        description=(
            "GPU metrics are averaged over this window; at least dcgm-exporter's collection "
            "interval (30 s by default), or a window can hold no sample at all"
        ),
    )
    usage_window_seconds: int = Field(
        default=60, ge=1, le=3600, description="usage records are cut per pod per window"
    )
    meter_interval: float = Field(default=5.0, ge=0.5, le=300, description="seconds between ticks")
    meter_concurrency: int = Field(
        default=8,
        ge=1,
        le=256,
        description="usage deliveries in flight at once; each account has at most one",
    )
    meter_max_records_per_batch: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description=(
            "most records one delivery carries while catching up; one whole window always "
            "goes, however many pods it has"
        ),
    )
    node_lost_grace_seconds: int = Field(
        default=300,
        ge=0,
        le=86_400,
        description=(
            "a node not Ready for this long is lost: its pods' billing ends when it left "
            "Ready (300 s, the default toleration of an unreachable node)"
        ),
    )
    usage_stdout: bool = Field(default=True, description="print usage records as JSON lines")
    usage_ledger: Path | None = Field(
        default=None, description="append usage records to this file (fsync'ed)"
    )
    usage_ledger_dsn_file: Path | None = Field(
        default=None,
        description=(
            "write usage records to PostgreSQL, connecting with the connection string in "
            "this file (mount it from a Secret); read again at every reconnect, so a "
            "rotated password takes effect without a restart"
        ),
    )
    usage_ledger_postgres_env: bool = Field(
        default=False,
        description=(
            "write usage records to PostgreSQL, connecting with libpq's environment "
            "variables alone (PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD or PGPASSFILE, "
            "PGSSLMODE, ...); not together with GPUYARD_USAGE_LEDGER_DSN_FILE"
        ),
    )
    usage_ledger_migrate: bool = Field(
        default=True,
        description=(
            "create or upgrade the PostgreSQL ledger's tables at start-up and on each "
            "connect; off: run `gpuyard db migrate` yourself, and the operator only "
            "checks the schema version"
        ),
    )
    usage_http_url: str | None = Field(
        default=None, description="POST usage records as CloudEvents batches to this URL"
    )
    usage_http_headers_file: Path | None = Field(
        default=None,
        description=(
            "'Name: value' lines sent as headers with every POST (mount it from a Secret); "
            "read again when the file changes"
        ),
    )
    usage_http_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle that verifies the receiver, instead of the system's",
    )
    usage_http_allow_insecure: bool = Field(
        default=False, description="allow an http:// usage sink URL (unencrypted)"
    )
    usage_http_max_attempts: int = Field(
        default=4, ge=1, le=20, description="attempts per batch before a delivery fails"
    )
    usage_http_timeout_seconds: float = Field(
        default=10.0, gt=0, le=300, description="timeout of each socket operation of a POST"
    )
    usage_http_max_connections: int = Field(
        default=8, ge=1, le=64, description="POSTs the HTTP sink makes at the same time"
    )
    leader_election: bool = Field(
        default=True,
        description="run as one of several replicas: only the holder of the Lease writes",
    )
    lease_name: str = Field(default="gpuyard", min_length=1, max_length=253)
    lease_namespace: str | None = Field(
        default=None,
        description="namespace of the Lease; default: the pod's own (POD_NAMESPACE or the "
        "ServiceAccount's), else default",
    )
    lease_duration_seconds: int = Field(
        default=15, ge=2, le=300, description="a Lease not renewed this long may be taken"
    )
    lease_renew_deadline_seconds: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="a leader that has not renewed this long stops writing",
    )
    lease_retry_period_seconds: float = Field(
        default=2.0, gt=0, le=60, description="seconds between renewals and attempts"
    )
    instance_id: str | None = Field(
        default=None,
        max_length=128,
        description="this replica's identity in the Lease and the user agent; default: "
        "POD_NAME (else the host name) and a random suffix",
    )
    log_format: Literal["plain", "json"] = "plain"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _check_lease_timings(self) -> Settings:
        self.lease_timings()  # raises with the reason when they do not fit together
        return self

    def lease_timings(self) -> LeaseTimings:
        return LeaseTimings(
            duration_seconds=self.lease_duration_seconds,
            renew_deadline_seconds=self.lease_renew_deadline_seconds,
            retry_period_seconds=self.lease_retry_period_seconds,
        )

    @model_validator(mode="after")
    def _check_usage_postgres(self) -> Settings:
        # Both a file ledger and PostgreSQL may be on (two sinks, each idempotent by id);
        # two ways to reach the one database may not, since only one would be used.
        if self.usage_ledger_dsn_file is not None and self.usage_ledger_postgres_env:
            raise ValueError(
                "set GPUYARD_USAGE_LEDGER_DSN_FILE or GPUYARD_USAGE_LEDGER_POSTGRES_ENV, "
                "not both: they are two ways to reach the same PostgreSQL ledger"
            )
        return self

    @property
    def usage_postgres_enabled(self) -> bool:
        return self.usage_ledger_dsn_file is not None or self.usage_ledger_postgres_env

    @model_validator(mode="after")
    def _check_usage_http(self) -> Settings:
        url = self.usage_http_url
        if not url:
            if self.usage_http_headers_file or self.usage_http_ca_file:
                raise ValueError(
                    "GPUYARD_USAGE_HTTP_HEADERS_FILE and GPUYARD_USAGE_HTTP_CA_FILE need "
                    "GPUYARD_USAGE_HTTP_URL"
                )
            return self
        if not url.startswith(("https://", "http://")):
            # The URL is not quoted back: a mistyped one may carry a credential.
            raise ValueError("GPUYARD_USAGE_HTTP_URL must start with https://")
        if url.startswith("http://") and not self.usage_http_allow_insecure:
            raise ValueError(
                "GPUYARD_USAGE_HTTP_URL is http://: usage records and headers would cross "
                "the network unencrypted. Use https://, or set "
                "GPUYARD_USAGE_HTTP_ALLOW_INSECURE=true (chart value "
                "usage.http.allowInsecure) to allow it"
            )
        return self
