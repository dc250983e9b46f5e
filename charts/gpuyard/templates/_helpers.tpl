{{/*
The chart name, or nameOverride; a DNS label, so at most 63 characters.
*/}}
{{- define "gpuyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: fullnameOverride, else "<release>-<name>", or the release
name alone when it already contains the chart name (release "gpuyard" gives "gpuyard").
*/}}
{{- define "gpuyard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, as the helm.sh/chart label wants them.
*/}}
{{- define "gpuyard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object the chart makes.
*/}}
{{- define "gpuyard.labels" -}}
helm.sh/chart: {{ include "gpuyard.chart" . }}
{{ include "gpuyard.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gpuyard
{{- end }}

{{/*
Labels that select the operator pod. They never change between upgrades: a Deployment's
selector is immutable.
*/}}
{{- define "gpuyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpuyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount the operator runs as.
*/}}
{{- define "gpuyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gpuyard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The user name the API server gives the operator: its ServiceAccount's.
*/}}
{{- define "gpuyard.operatorUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "gpuyard.serviceAccountName" .) }}
{{- end }}

{{/*
A list of strings as a CEL list literal. The strings hold no quote or backslash (user
names; values.schema.json refuses both in admissionPolicy.exemptUsers).
*/}}
{{- define "gpuyard.celStrings" -}}
[{{ range $index, $item := . }}{{ if $index }}, {{ end }}'{{ $item }}'{{ end }}]
{{- end }}

{{/*
The operator image: repository@digest when a digest is given, else repository:tag with the
tag defaulting to the chart's appVersion.
*/}}
{{- define "gpuyard.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The name of the metrics Service (also the `job` label a ServiceMonitor gives its targets).
*/}}
{{- define "gpuyard.metricsServiceName" -}}
{{- printf "%s-metrics" (include "gpuyard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The PromQL label matchers that pick this release's operator out of a shared Prometheus:
the scrape job (as the ServiceMonitor or PodMonitor names it, or prometheusRule.job) and
the namespace.
*/}}
{{- define "gpuyard.promSelector" -}}
{{- $job := .Values.prometheusRule.job }}
{{- if not $job }}
{{- if and .Values.podMonitor.enabled (not .Values.serviceMonitor.enabled) }}
{{- $job = printf "%s/%s" .Release.Namespace (include "gpuyard.fullname" .) }}
{{- else }}
{{- $job = include "gpuyard.metricsServiceName" . }}
{{- end }}
{{- end }}
{{- printf "job=%q, namespace=%q" $job .Release.Namespace }}
{{- end }}

{{/*
The operator's settings as GPUYARD_* environment variables (see operator/gpuyard/config.py),
then extraEnv.
*/}}
{{- define "gpuyard.env" -}}
- name: GPUYARD_CLUSTER_ID
  value: {{ .Values.operator.clusterId | quote }}
# The pod's name (with a random suffix) is its identity in the Lease and its user agent.
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: GPUYARD_LEASE_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: GPUYARD_LEASE_NAME
  value: {{ include "gpuyard.fullname" . | quote }}
- name: GPUYARD_LEASE_DURATION_SECONDS
  value: {{ .Values.leaderElection.leaseDurationSeconds | quote }}
- name: GPUYARD_LEASE_RENEW_DEADLINE_SECONDS
  value: {{ .Values.leaderElection.renewDeadlineSeconds | quote }}
- name: GPUYARD_LEASE_RETRY_PERIOD_SECONDS
  value: {{ .Values.leaderElection.retryPeriodSeconds | quote }}
{{- with .Values.operator.prometheusUrl }}
- name: GPUYARD_PROMETHEUS_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.operator.gpuExporterMatchers }}
- name: GPUYARD_GPU_EXPORTER_MATCHERS
  value: {{ . | quote }}
{{- end }}
- name: GPUYARD_TENANT_NAMESPACE_LABEL
  value: {{ .Values.operator.tenantNamespaceLabel | quote }}
- name: GPUYARD_AUTOSCALE_INTERVAL
  value: {{ .Values.operator.autoscaleIntervalSeconds | quote }}
- name: GPUYARD_RESYNC_SECONDS
  value: {{ .Values.operator.resyncSeconds | quote }}
- name: GPUYARD_WORKERS
  value: {{ .Values.operator.workers | quote }}
- name: GPUYARD_NODE_LOST_GRACE_SECONDS
  value: {{ .Values.operator.nodeLostGraceSeconds | quote }}
- name: GPUYARD_METER_CONCURRENCY
  value: {{ .Values.operator.meterConcurrency | quote }}
- name: GPUYARD_METER_MAX_RECORDS_PER_BATCH
  value: {{ .Values.operator.meterMaxRecordsPerBatch | quote }}
- name: GPUYARD_LOG_LEVEL
  value: {{ .Values.operator.logLevel | quote }}
- name: GPUYARD_LOG_FORMAT
  value: {{ .Values.operator.logFormat | quote }}
- name: GPUYARD_METRICS_PORT
  value: {{ .Values.operator.metricsPort | quote }}
- name: GPUYARD_HEALTH_PORT
  value: {{ .Values.operator.healthPort | quote }}
- name: GPUYARD_USAGE_STDOUT
  value: {{ .Values.usage.stdout | quote }}
{{- with .Values.usage.http }}
{{- if .url }}
- name: GPUYARD_USAGE_HTTP_URL
  value: {{ .url | quote }}
- name: GPUYARD_USAGE_HTTP_ALLOW_INSECURE
  value: {{ .allowInsecure | quote }}
- name: GPUYARD_USAGE_HTTP_MAX_ATTEMPTS
  value: {{ .maxAttempts | quote }}
- name: GPUYARD_USAGE_HTTP_TIMEOUT_SECONDS
  value: {{ .timeoutSeconds | quote }}
- name: GPUYARD_USAGE_HTTP_MAX_CONNECTIONS
  value: {{ .maxConnections | quote }}
{{- if .headersSecret.name }}
- name: GPUYARD_USAGE_HTTP_HEADERS_FILE
  value: {{ include "gpuyard.usageHttpHeadersFile" $ | quote }}
{{- end }}
{{- if or .caConfigMap.name .caSecret.name }}
- name: GPUYARD_USAGE_HTTP_CA_FILE
  value: {{ include "gpuyard.usageHttpCaFile" $ | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.usage.ledger.enabled }}
- name: GPUYARD_USAGE_LEDGER
  value: {{ include "gpuyard.ledgerFile" . | quote }}
{{- end }}
{{- with .Values.usage.postgres }}
{{- if .enabled }}
{{- if .dsnSecret.name }}
- name: GPUYARD_USAGE_LEDGER_DSN_FILE
  value: {{ include "gpuyard.postgresDsnFile" $ | quote }}
{{- else }}
- name: GPUYARD_USAGE_LEDGER_POSTGRES_ENV
  value: "true"
{{- end }}
- name: GPUYARD_USAGE_LEDGER_MIGRATE
  value: {{ .migrate | quote }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Where the usage sinks' files are mounted. Whole volumes, never subPath: the kubelet
updates a Secret or ConfigMap volume by swapping a symlink, which a subPath mount never
sees, and the operator reads a rotated headers file or CA bundle without a restart.
*/}}
{{- define "gpuyard.postgresDsnFile" -}}
/etc/gpuyard/usage-postgres/dsn
{{- end }}
{{- define "gpuyard.usageHttpHeadersFile" -}}
/etc/gpuyard/usage-http-headers/headers
{{- end }}
{{- define "gpuyard.usageHttpCaFile" -}}
/etc/gpuyard/usage-http-ca/ca.crt
{{- end }}
{{- define "gpuyard.ledgerDir" -}}
/var/lib/gpuyard
{{- end }}
{{- define "gpuyard.ledgerFile" -}}
{{ include "gpuyard.ledgerDir" . }}/usage.jsonl
{{- end }}

{{/*
The ledger's PersistentVolumeClaim: the user's, or the one the chart creates.
*/}}
{{- define "gpuyard.ledgerClaimName" -}}
{{- with .Values.usage.ledger.persistence.existingClaim }}
{{- . }}
{{- else }}
{{- printf "%s-ledger" (include "gpuyard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
Usage values that the schema cannot relate to each other, refused with what to change.
*/}}
{{- define "gpuyard.checkUsage" -}}
{{- if and .Values.usage.ledger.enabled (gt (int .Values.replicaCount) 1) }}
{{- fail "usage.ledger (a file on a ReadWriteOnce claim) takes one operator pod: set replicaCount=1, or keep the ledger in PostgreSQL" }}
{{- end }}
{{- $lease := .Values.leaderElection }}
{{- if not (lt (float64 $lease.renewDeadlineSeconds) (float64 $lease.leaseDurationSeconds)) }}
{{- fail "leaderElection.renewDeadlineSeconds must be shorter than leaseDurationSeconds: a leader must stop writing before its Lease can expire" }}
{{- end }}
{{- if not (lt (float64 $lease.retryPeriodSeconds) (float64 $lease.renewDeadlineSeconds)) }}
{{- fail "leaderElection.retryPeriodSeconds must be shorter than renewDeadlineSeconds" }}
{{- end }}
{{- $pg := .Values.usage.postgres }}
{{- if and $pg.enabled (eq (empty $pg.dsnSecret.name) (empty $pg.envSecret)) }}
{{- fail "usage.postgres.enabled needs exactly one of usage.postgres.dsnSecret.name and usage.postgres.envSecret" }}
{{- end }}
{{- if and (not $pg.enabled) (or $pg.dsnSecret.name $pg.envSecret) }}
{{- fail "usage.postgres.dsnSecret and envSecret take effect only with usage.postgres.enabled=true" }}
{{- end }}
{{- $http := .Values.usage.http }}
{{- if and (hasPrefix "http://" $http.url) (not $http.allowInsecure) }}
{{- fail "usage.http.url is http://, so usage records and headers would cross the network unencrypted: use https://, or set usage.http.allowInsecure=true" }}
{{- end }}
{{- if and (not $http.url) (or $http.headersSecret.name $http.caConfigMap.name $http.caSecret.name) }}
{{- fail "usage.http.headersSecret, caConfigMap and caSecret need usage.http.url" }}
{{- end }}
{{- if and $http.caConfigMap.name $http.caSecret.name }}
{{- fail "set usage.http.caConfigMap or usage.http.caSecret, not both" }}
{{- end }}
{{- if and (hasPrefix "http://" $http.url) (or $http.caConfigMap.name $http.caSecret.name) }}
{{- fail "a CA bundle (usage.http.caConfigMap, caSecret) needs an https:// usage.http.url" }}
{{- end }}
{{- end }}
