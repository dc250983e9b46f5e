"""PromQL for the autoscaler: the constant set of GPU queries per tick, the tenant metric
query, and the parser of Prometheus's instant-query responses.

Every query is assembled from values the operator derives or validates; a label value is
always emitted through :func:`quote_label_value`, so no tenant string can end a string
literal or add a matcher. docs/autoscaling.md describes the scoping rules.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from enum import StrEnum
from typing import Any, TypeVar

from gpuyard.api.names import RESERVED_PROMETHEUS_LABELS, ServiceKey

__all__ = [
    "DEFAULT_WINDOW_SECONDS",
    "MAX_TENANT_LABELS",
    "MAX_TENANT_LABEL_VALUE_LENGTH",
    "Aggregation",
    "GpuSeries",
    "PodKey",
    "PrometheusResponseError",
    "gpu_memory_query",
    "gpu_queries",
    "gpu_utilization_query",
    "parse_grouped_response",
    "parse_matrix_response",
    "parse_vector_by_owner",
    "parse_vector_response",
    "prometheus_metric_group_query",
    "quote_label_value",
    "validate_tenant_selector",
]

# dcgm-exporter collects every 30 s by default; a shorter window would often hold no sample.
DEFAULT_WINDOW_SECONDS = 30

# The AIService schema allows 8 label matchers of at most 256 characters per metric.
MAX_TENANT_LABELS = 8
MAX_TENANT_LABEL_VALUE_LENGTH = 256

# Series are keyed by these labels; an exporter matcher on them would break the keying.
_KEY_LABELS = frozenset({"namespace", "pod", "exported_namespace", "exported_pod"})
# The names a label takes when Prometheus does not honour the exporter's (read per series).
_EXPORTED_LABEL = {name: f"exported_{name}" for name in ("namespace", "pod", "service")}

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_MAX_METRIC_NAME_LENGTH = 200
_MAX_WINDOW_SECONDS = 86_400

# Prometheus formats sample values with Go's strconv.FormatFloat: a plain decimal number or
# one of NaN, +Inf, -Inf. Python's float() is laxer ("1_0", " 1", "infinity"); held to these
# characters it accepts exactly Go's grammar, [+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?, and
# one str.strip per sample costs far less than a regex match.
_SAMPLE_CHARACTERS = "0123456789.eE+-"
_SAMPLE_SPECIALS = {"NaN": math.nan, "+Inf": math.inf, "-Inf": -math.inf}

T = TypeVar("T")
K = TypeVar("K")

PodKey = tuple[str, str]
"""(namespace, pod) of the workload a GPU series belongs to."""


class Aggregation(StrEnum):
    """How a tenant metric's series are combined into the service's total."""

    SUM = "sum"
    AVG = "avg"
    MAX = "max"


class GpuSeries(StrEnum):
    """The per-pod GPU series the autoscaler reads every tick, in percent (0..100)."""

    GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"
    GR_ENGINE_ACTIVE = "DCGM_FI_PROF_GR_ENGINE_ACTIVE"
    MEMORY = "GPUMemory"


class PrometheusResponseError(ValueError):
    """A response that carries no usable result; ``reason`` is CamelCase for a condition."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def quote_label_value(value: str) -> str:
    """Return ``value`` as a PromQL double-quoted string literal.

    PromQL strings use Go's escape rules. Only printable ASCII is emitted raw; every other
    character becomes a ``\\u``/``\\U`` escape, so the query is plain ASCII whatever the
    input: no raw newline (which ends a PromQL string with an error), no bidi control or
    look-alike character for a human reading the query in a log.
    """
    out = ['"']
    for char in value:
        code = ord(char)
        if char in {'"', "\\"}:
            out.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif 0xD800 <= code <= 0xDFFF:
            # A lone surrogate is not a Unicode scalar value: Go rejects its escape and it
            # cannot be encoded as UTF-8 either, so no series can carry it.
            raise ValueError(f"label value contains a lone surrogate U+{code:04X}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _matchers(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{name}={quote_label_value(value)}" for name, value in pairs) + "}"


def _window(window_seconds: int) -> str:
    if isinstance(window_seconds, bool) or not 1 <= window_seconds <= _MAX_WINDOW_SECONDS:
        raise ValueError(f"window must be 1..{_MAX_WINDOW_SECONDS} seconds, got {window_seconds!r}")
    return f"[{window_seconds}s]"


def _exporter_selector(metric: str, exporter_matchers: Mapping[str, str] | None) -> str:
    pairs = sorted((exporter_matchers or {}).items())
    for name, _ in pairs:
        if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
            raise ValueError(f"invalid exporter label name {name!r}")
        if name in _KEY_LABELS:
            raise ValueError(f"exporter matchers cannot constrain the key label {name!r}")
    return metric + (_matchers(pairs) if pairs else "")


def _keyed_by_pod(expression: str) -> str:
    """Average ``expression`` per (namespace, pod) of the workload holding the GPU.

    When Prometheus does not honour the exporter's labels, dcgm-exporter's ``namespace`` and
    ``pod`` arrive as ``exported_namespace``/``exported_pod`` and the plain names hold the
    exporter's own pod. ``label_replace`` with ``(.+)`` copies an exported label over the
    plain one only where it is non-empty (an absent label reads as ""), so the same query
    yields the workload's keys in both set-ups. Idle GPUs keep the exporter's key (or an
    empty pod) and match no service.
    """
    relabelled = (
        f'label_replace(label_replace({expression}, "namespace", "$1", "exported_namespace", '
        f'"(.+)"), "pod", "$1", "exported_pod", "(.+)")'
    )
    return f"avg by (namespace, pod) ({relabelled})"


def gpu_utilization_query(
    source: GpuSeries = GpuSeries.GPU_UTIL,
    *,
    window_seconds: int = DEFAULT_WINDOW_SECONDS,
    exporter_matchers: Mapping[str, str] | None = None,
) -> str:
    """Average GPU utilisation per pod, in percent.

    ``DCGM_FI_DEV_GPU_UTIL`` is already a percentage; ``DCGM_FI_PROF_GR_ENGINE_ACTIVE`` (the
    one that works on MIG slices) is a 0..1 ratio and is scaled by 100. ``exporter_matchers``
    are operator settings such as ``{"job": "dcgm-exporter"}`` that keep other jobs from
    posing as the exporter.
    """
    window = _window(window_seconds)
    if source is GpuSeries.GPU_UTIL:
        inner = f"avg_over_time({_exporter_selector(source.value, exporter_matchers)}{window})"
    elif source is GpuSeries.GR_ENGINE_ACTIVE:
        selector = _exporter_selector(source.value, exporter_matchers)
        inner = f"100 * avg_over_time({selector}{window})"
    else:
        raise ValueError(f"{source} is not a utilisation series")
    return _keyed_by_pod(inner)


def gpu_memory_query(
    *,
    window_seconds: int = DEFAULT_WINDOW_SECONDS,
    exporter_matchers: Mapping[str, str] | None = None,
) -> str:
    """Framebuffer memory in use per pod, in percent: ``100 * used / (used + free)``.

    The two series of one GPU carry the same labels, so the division matches them one to
    one; a GPU that reports 0 used and 0 free yields NaN, which the parser keeps and the
    decision drops.
    """
    window = _window(window_seconds)
    used = f"avg_over_time({_exporter_selector('DCGM_FI_DEV_FB_USED', exporter_matchers)}{window})"
    free = f"avg_over_time({_exporter_selector('DCGM_FI_DEV_FB_FREE', exporter_matchers)}{window})"
    return _keyed_by_pod(f"100 * {used} / ({used} + {free})")


def gpu_queries(
    *,
    window_seconds: int = DEFAULT_WINDOW_SECONDS,
    exporter_matchers: Mapping[str, str] | None = None,
) -> dict[GpuSeries, str]:
    """The GPU queries of one tick: always these three, whatever the number of services."""
    return {
        GpuSeries.GPU_UTIL: gpu_utilization_query(
            GpuSeries.GPU_UTIL, window_seconds=window_seconds, exporter_matchers=exporter_matchers
        ),
        GpuSeries.GR_ENGINE_ACTIVE: gpu_utilization_query(
            GpuSeries.GR_ENGINE_ACTIVE,
            window_seconds=window_seconds,
            exporter_matchers=exporter_matchers,
        ),
        GpuSeries.MEMORY: gpu_memory_query(
            window_seconds=window_seconds, exporter_matchers=exporter_matchers
        ),
    }


def validate_tenant_selector(metric: str, labels: Mapping[str, str]) -> None:
    """Raise ``ValueError`` unless a tenant's metric name and label matchers are acceptable."""
    if len(metric) > _MAX_METRIC_NAME_LENGTH or not _METRIC_NAME.fullmatch(metric):
        raise ValueError(f"invalid metric name {metric!r}")
    if len(labels) > MAX_TENANT_LABELS:
        raise ValueError(f"at most {MAX_TENANT_LABELS} label matchers, got {len(labels)}")
    for name, value in labels.items():
        if not _LABEL_NAME.fullmatch(name):
            raise ValueError(f"invalid label name {name!r}")
        if name.startswith("__") or name in RESERVED_PROMETHEUS_LABELS:
            raise ValueError(f"label {name!r} is reserved: the operator sets the scope")
        if len(value) > MAX_TENANT_LABEL_VALUE_LENGTH:
            raise ValueError(f"value of label {name!r} exceeds {MAX_TENANT_LABEL_VALUE_LENGTH}")


def prometheus_metric_group_query(
    metric: str,
    labels: Mapping[str, str],
    aggregation: Aggregation,
    *,
    window_seconds: int = DEFAULT_WINDOW_SECONDS,
) -> str:
    """One query for every service that declares the same tenant metric.

    ``sum by (namespace, service) (avg_over_time({__name__="m",k="v"}[30s]))`` answers for
    all of them at once, so a tick sends one query per distinct metric declaration, not one
    per service. Scope comes from the grouping: a service reads only the series keyed by
    its own namespace and name (see :func:`parse_grouped_response`), so one tenant's
    matchers can never show it another namespace's values. The scope is namespace plus
    service, never pod: a service at zero replicas has no pods, and a request-level metric
    (from a gateway or a queue exporter that keeps running) is what wakes it.

    The metric name goes in a ``__name__`` matcher so that a name such as ``sum`` or ``inf``
    cannot be read as a keyword. Tenant matchers follow in name order, so equal specs give
    byte-equal queries that the caller de-duplicates by their text.
    """
    validate_tenant_selector(metric, labels)
    pairs = [("__name__", metric), *sorted(labels.items())]
    selector = _matchers(pairs) + _window(window_seconds)
    return f"{Aggregation(aggregation).value} by (namespace, service) (avg_over_time({selector}))"


def parse_grouped_response(body: str | bytes | Mapping[str, Any]) -> dict[ServiceKey, float]:
    """Map a :func:`prometheus_metric_group_query` result to ``{(namespace, service): value}``.

    Series without both labels belong to no service and are skipped.
    """
    return _keyed_vector(_load(body), "service")


def _load(body: str | bytes | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(body, Mapping):
        payload: Any = body
    else:
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise PrometheusResponseError("MalformedResponse", f"not JSON: {error}") from error
    if not isinstance(payload, Mapping):
        raise PrometheusResponseError("MalformedResponse", "the response is not a JSON object")
    status = payload.get("status")
    if status == "error":
        kind = payload.get("errorType", "unknown")
        raise PrometheusResponseError("PrometheusError", f"{kind}: {payload.get('error', '')}")
    if status != "success":
        raise PrometheusResponseError("MalformedResponse", f"unexpected status {status!r}")
    data = payload.get("data")
    if not isinstance(data, Mapping):
        raise PrometheusResponseError("MalformedResponse", "no data object")
    return data


def _sample_value(value: Any) -> float:
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], str)):
        raise PrometheusResponseError("MalformedResponse", f"bad sample {value!r}")
    text = value[1]
    if text in _SAMPLE_SPECIALS:
        return _SAMPLE_SPECIALS[text]
    if text.strip(_SAMPLE_CHARACTERS):
        raise PrometheusResponseError("MalformedResponse", f"bad sample value {text!r}")
    try:
        return float(text)
    except ValueError:
        raise PrometheusResponseError("MalformedResponse", f"bad sample value {text!r}") from None


def _series(data: Mapping[str, Any], kind: str, field: str) -> list[tuple[dict[str, Any], Any]]:
    """Each series of a ``kind`` ("vector" or "matrix") result as (labels, its ``field``)."""
    if data.get("resultType") != kind:
        raise PrometheusResponseError(
            "UnexpectedResultType", f"expected a {kind}, got {data.get('resultType')!r}"
        )
    result = data.get("result")
    if not isinstance(result, list):
        raise PrometheusResponseError("MalformedResponse", "the result is not a list")
    series = []
    for item in result:
        # Per series, so `dict` (what JSON decodes to) rather than the slower ABC check.
        if not (isinstance(item, dict) and isinstance(labels := item.get("metric"), dict)):
            raise PrometheusResponseError("MalformedResponse", f"bad series {item!r}")
        series.append((labels, item.get(field)))
    return series


def _vector_series(data: Mapping[str, Any], name: str) -> Iterator[tuple[str, str, float]]:
    """Each series of a vector as (namespace, its ``name`` label, value), by the rules of
    :func:`_label`; series without both labels belong to no workload and are skipped (after
    their value is checked). One pass and no intermediate list: the autoscaler parses tens
    of thousands of GPU series on every tick."""
    if data.get("resultType") != "vector":
        raise PrometheusResponseError(
            "UnexpectedResultType", f"expected a vector, got {data.get('resultType')!r}"
        )
    result = data.get("result")
    if not isinstance(result, list):
        raise PrometheusResponseError("MalformedResponse", "the result is not a list")
    exported = _EXPORTED_LABEL[name]
    for item in result:
        if not (isinstance(item, dict) and isinstance(labels := item.get("metric"), dict)):
            raise PrometheusResponseError("MalformedResponse", f"bad series {item!r}")
        value = _sample_value(item.get("value"))
        # _label's rule, inline: the exported label wins where it is a non-empty string.
        namespace = labels.get("exported_namespace")
        if not (isinstance(namespace, str) and namespace):
            namespace = labels.get("namespace")
        workload = labels.get(exported)
        if not (isinstance(workload, str) and workload):
            workload = labels.get(name)
        if isinstance(namespace, str) and namespace and isinstance(workload, str) and workload:
            yield namespace, workload, value


def _keyed_vector(data: Mapping[str, Any], name: str) -> dict[tuple[str, str], float]:
    keyed: dict[tuple[str, str], float] = {}
    for namespace, workload, value in _vector_series(data, name):
        size = len(keyed)
        keyed[namespace, workload] = value
        if len(keyed) == size:
            raise PrometheusResponseError(
                "DuplicateSeries", f"two series for {(namespace, workload)}"
            )
    return keyed


def parse_vector_by_owner(
    body: str | bytes | Mapping[str, Any], owners: Mapping[PodKey, tuple[K, str]]
) -> dict[K, dict[str, float]]:
    """Group a per-pod instant vector by the owner of each pod: ``{owner: {pod: value}}``.

    ``owners`` maps ``(namespace, pod)`` to the pod's owner and name; series of other pods
    are skipped (their values still checked). The rules and errors of
    :func:`parse_vector_response` apply, except that two series are a ``DuplicateSeries``
    only for an owned pod. The autoscaler groups its GPU answers so, without building the
    map of every series first.
    """
    grouped: dict[K, dict[str, float]] = {}
    for namespace, pod, value in _vector_series(_load(body), "pod"):
        owned = owners.get((namespace, pod))
        if owned is None:
            continue
        owner, name = owned
        values = grouped.get(owner)
        if values is None:
            grouped[owner] = values = {}
        size = len(values)
        values[name] = value
        if len(values) == size:
            raise PrometheusResponseError("DuplicateSeries", f"two series for {(namespace, pod)}")
    return grouped


def _matrix(data: Mapping[str, Any]) -> list[tuple[dict[str, Any], list[Any]]]:
    series = _series(data, "matrix", "values")
    for item in series:
        if not isinstance(item[1], list):
            raise PrometheusResponseError("MalformedResponse", f"bad values {item[1]!r}")
    return series


def _label(labels: Mapping[str, Any], name: str) -> str:
    # The exporter's own value moves to exported_<name> when Prometheus does not honour it;
    # where both exist, the exported one names the workload.
    exported = labels.get(_EXPORTED_LABEL[name])
    if isinstance(exported, str) and exported:
        return exported
    value = labels.get(name)
    return value if isinstance(value, str) else ""


def parse_vector_response(body: str | bytes | Mapping[str, Any]) -> dict[PodKey, float]:
    """Map an instant-query vector to ``{(namespace, pod): value}``.

    Values are returned as Prometheus sent them, NaN and infinities included: judging them is
    the decision's job. Series without a namespace or pod (idle GPUs) are skipped. Raises
    :class:`PrometheusResponseError` for an error status, a non-vector result, a malformed
    body, or two series with the same key (the queries here aggregate by the key, so that
    means the query was not one of them).
    """
    return _keyed_vector(_load(body), "pod")


def parse_matrix_response(
    body: str | bytes | Mapping[str, Any],
) -> dict[PodKey, dict[int, float]]:
    """Map a range-query matrix of a per-pod query to ``{(namespace, pod): {t: value}}``,
    ``t`` in whole epoch seconds (the evaluation times of a query whose start and step are
    whole seconds). The same rules as :func:`parse_vector_response` apply per series.
    """
    return {key: _points(samples) for key, samples in _keyed(_matrix(_load(body)), "pod").items()}


def _points(samples: list[Any]) -> dict[int, float]:
    points: dict[int, float] = {}
    for sample in samples:
        when = sample[0] if isinstance(sample, list) and sample else None
        if isinstance(when, bool) or not isinstance(when, int | float):
            raise PrometheusResponseError("MalformedResponse", f"bad sample {sample!r}")
        points[round(when)] = _sample_value(sample)
    return points


def _keyed(series: list[tuple[dict[str, Any], T]], name: str) -> dict[tuple[str, str], T]:
    """Series by (namespace, ``name``) of the workload; series without both belong to no
    workload (idle GPUs, other jobs) and are skipped; two with one key mean the query was
    not one of ours, which aggregate by the key."""
    keyed: dict[tuple[str, str], T] = {}
    for labels, payload in series:
        key = (_label(labels, "namespace"), _label(labels, name))
        if not all(key):
            continue
        if key in keyed:
            raise PrometheusResponseError("DuplicateSeries", f"two series for {key}")
        keyed[key] = payload
    return keyed
