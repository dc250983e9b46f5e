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
import string
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from gpuyard.api.names import RESERVED_PROMETHEUS_LABELS, ServiceKey

__all__ = [
    "DEFAULT_TENANT_NAMESPACE_LABEL",
    "DEFAULT_WINDOW_SECONDS",
    "MAX_EXPORTER_MATCHERS",
    "MAX_EXPORTER_VALUE_LENGTH",
    "MAX_TENANT_LABELS",
    "MAX_TENANT_LABEL_VALUE_LENGTH",
    "UNIDENTIFIED_EXPORTER",
    "Aggregation",
    "GpuExporter",
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
    "validate_tenant_namespace_label",
    "validate_tenant_selector",
]

# dcgm-exporter collects every 30 s by default; a shorter window would often hold no sample.
DEFAULT_WINDOW_SECONDS = 30

# The AIService schema allows 8 label matchers of at most 256 characters per metric.
MAX_TENANT_LABELS = 8
MAX_TENANT_LABEL_VALUE_LENGTH = 256

# The names a label takes when Prometheus does not honour the exporter's (read per series).
_EXPORTED_LABEL = {name: f"exported_{name}" for name in ("namespace", "pod")}

#: Where a tenant metric's series carry their scrape target's namespace unless the operator
#: is told otherwise: the label Kubernetes service discovery relabelling and the Prometheus
#: Operator attach to a target.
DEFAULT_TENANT_NAMESPACE_LABEL = "namespace"
# A Kubernetes namespace name is a DNS label (RFC 1123).
_NAMESPACE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")

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


# An operator setting, not a tenant's input, but parsed as strictly: it decides whose series
# may name a tenant's pods.
MAX_EXPORTER_MATCHERS = 8
MAX_EXPORTER_VALUE_LENGTH = 256
_STRING_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}
_HEX_ESCAPE_DIGITS = {"u": 4, "U": 8}


@dataclass(frozen=True)
class GpuExporter:
    """Which series are the real DCGM exporter's: ``matchers`` on the labels that
    Prometheus gives its scrape target, such as ``job`` or ``namespace`` and ``service``.

    Every GPU query reads only series that carry all of them, and only then are their
    ``exported_namespace``/``exported_pod`` labels trusted to name the workload. Without
    matchers (:data:`UNIDENTIFIED_EXPORTER`) nothing is trusted beyond the plain
    ``namespace`` and ``pod`` labels. Matchers are exact and ``(name, value)`` pairs in name
    order, so equal settings give byte-equal queries.
    """

    matchers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if len(self.matchers) > MAX_EXPORTER_MATCHERS:
            raise ValueError(f"at most {MAX_EXPORTER_MATCHERS} exporter matchers")
        names = [name for name, _ in self.matchers]
        if names != sorted(set(names)):
            raise ValueError("exporter matchers must name each label once, in name order")
        for name, value in self.matchers:
            _check_exporter_matcher(name, value)

    @classmethod
    def parse(cls, text: str) -> GpuExporter:
        """Parse a PromQL label-matcher list such as ``job="dcgm-exporter"`` or
        ``{namespace="gpu-operator", service="nvidia-dcgm-exporter"}`` (braces optional,
        Go string escapes in the values); empty text means no exporter is identified."""
        body = text.strip()
        if body.startswith("{") != body.endswith("}") or body == "}":
            raise ValueError("exporter matchers: unbalanced braces")
        if body.startswith("{"):
            body = body[1:-1]
        pairs: dict[str, str] = {}
        position = _skip_spaces(body, 0)
        while position < len(body):
            name_match = _LABEL_NAME.match(body, position)
            if name_match is None:
                raise ValueError(f"exporter matchers: expected a label name at {position}")
            name = name_match.group()
            position = _skip_spaces(body, name_match.end())
            operator = body[position : position + 2]
            if operator in {"=~", "!=", "!~"}:
                raise ValueError(
                    f"exporter matcher {name}{operator}: only = is accepted, as a regex or a "
                    "negative matcher can also match targets nobody meant to trust"
                )
            if not operator.startswith("="):
                raise ValueError(f"exporter matchers: expected = after {name!r}")
            value, position = _parse_string(body, _skip_spaces(body, position + 1))
            if name in pairs:
                raise ValueError(f"exporter matchers: label {name!r} given twice")
            pairs[name] = value
            position = _skip_spaces(body, position)
            if position < len(body):
                if body[position] != ",":
                    raise ValueError(f"exporter matchers: expected , at {position}")
                position = _skip_spaces(body, position + 1)
        return cls(tuple(sorted(pairs.items())))

    @property
    def trusts_exported_labels(self) -> bool:
        """Whether ``exported_*`` labels name the workload: only for an identified exporter."""
        return bool(self.matchers)

    def selector(self) -> str:
        """The matchers as a PromQL selector body (``{job="x"}``), or "" without any."""
        return _matchers(list(self.matchers)) if self.matchers else ""

    def __str__(self) -> str:
        return self.selector().removeprefix("{").removesuffix("}")


#: No exporter identified: plain labels only.
UNIDENTIFIED_EXPORTER = GpuExporter()


def _check_exporter_matcher(name: str, value: str) -> None:
    if not _LABEL_NAME.fullmatch(name):
        raise ValueError(f"invalid exporter label name {name!r}")
    if name.startswith("__"):
        raise ValueError(f"exporter label {name!r}: names starting with __ belong to Prometheus")
    if name.startswith("exported_"):
        raise ValueError(
            f"exporter label {name!r}: exported_* labels come from the scraped series, so any "
            "target can set them; match the exporter's target labels (job, namespace, service)"
        )
    if not value:
        raise ValueError(
            f"exporter label {name!r}: an empty value matches series without the label"
        )
    if len(value) > MAX_EXPORTER_VALUE_LENGTH:
        raise ValueError(f"exporter label {name!r}: value over {MAX_EXPORTER_VALUE_LENGTH}")
    quote_label_value(value)  # refuses what no series can carry (a lone surrogate)


def _skip_spaces(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\n\r":
        position += 1
    return position


def _parse_string(text: str, position: int) -> tuple[str, int]:
    """A double-quoted PromQL string starting at ``position``: its value and the position
    after it. Accepts the escapes :func:`quote_label_value` emits and \\n, \\t, \\r."""
    if position >= len(text) or text[position] != '"':
        raise ValueError(f"exporter matchers: expected a double-quoted value at {position}")
    out: list[str] = []
    index = position + 1
    while index < len(text):
        char = text[index]
        if char == '"':
            return "".join(out), index + 1
        if ord(char) < 0x20 or ord(char) == 0x7F:
            raise ValueError(f"exporter matchers: control character at {index}; escape it")
        if char != "\\":
            out.append(char)
            index += 1
            continue
        escape = text[index + 1 : index + 2]
        if escape in _STRING_ESCAPES:
            out.append(_STRING_ESCAPES[escape])
            index += 2
        elif escape in _HEX_ESCAPE_DIGITS:
            digits = text[index + 2 : index + 2 + _HEX_ESCAPE_DIGITS[escape]]
            if len(digits) != _HEX_ESCAPE_DIGITS[escape] or digits.strip(string.hexdigits):
                raise ValueError(f"exporter matchers: bad \\{escape} escape at {index}")
            code = int(digits, 16)
            if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise ValueError(f"exporter matchers: \\{escape}{digits} is no character")
            out.append(chr(code))
            index += 2 + len(digits)
        else:
            raise ValueError(f"exporter matchers: unsupported escape at {index}")
    raise ValueError("exporter matchers: unterminated string")


def _window(window_seconds: int) -> str:
    if isinstance(window_seconds, bool) or not 1 <= window_seconds <= _MAX_WINDOW_SECONDS:
        raise ValueError(f"window must be 1..{_MAX_WINDOW_SECONDS} seconds, got {window_seconds!r}")
    return f"[{window_seconds}s]"


def _exporter_selector(metric: str, exporter: GpuExporter) -> str:
    return metric + exporter.selector()


def _keyed_by_pod(expression: str, exporter: GpuExporter) -> str:
    """Average ``expression`` per (namespace, pod) of the workload holding the GPU.

    When Prometheus does not honour the exporter's labels, dcgm-exporter's ``namespace`` and
    ``pod`` arrive as ``exported_namespace``/``exported_pod`` and the plain names hold the
    exporter's own pod. Any scrape target can publish ``exported_*`` labels, so they are
    read only when ``exporter`` restricts the series to the real exporter's: then
    ``label_replace`` with ``(.+)`` copies an exported label over the plain one where it is
    non-empty (an absent label reads as ""), and the same query yields the workload's keys
    in both set-ups. Without an exporter the plain labels alone key the series, which a
    target whose labels Prometheus does not honour can only set to its own namespace. Idle
    GPUs keep the exporter's key (or an empty pod) and match no service.
    """
    if not exporter.trusts_exported_labels:
        return f"avg by (namespace, pod) ({expression})"
    relabelled = (
        f'label_replace(label_replace({expression}, "namespace", "$1", "exported_namespace", '
        f'"(.+)"), "pod", "$1", "exported_pod", "(.+)")'
    )
    return f"avg by (namespace, pod) ({relabelled})"


def gpu_utilization_query(
    source: GpuSeries = GpuSeries.GPU_UTIL,
    *,
    window_seconds: int = DEFAULT_WINDOW_SECONDS,
    exporter: GpuExporter = UNIDENTIFIED_EXPORTER,
) -> str:
    """Average GPU utilisation per pod, in percent.

    ``DCGM_FI_DEV_GPU_UTIL`` is already a percentage; ``DCGM_FI_PROF_GR_ENGINE_ACTIVE`` (the
    one that works on MIG slices) is a 0..1 ratio and is scaled by 100. ``exporter`` (the
    operator's setting, never a tenant's) says which series are the real exporter's.
    """
    window = _window(window_seconds)
    if source is GpuSeries.GPU_UTIL:
        inner = f"avg_over_time({_exporter_selector(source.value, exporter)}{window})"
    elif source is GpuSeries.GR_ENGINE_ACTIVE:
        inner = f"100 * avg_over_time({_exporter_selector(source.value, exporter)}{window})"
    else:
        raise ValueError(f"{source} is not a utilisation series")
    return _keyed_by_pod(inner, exporter)


def gpu_utilization_by_uuid_query(
    source: GpuSeries = GpuSeries.GPU_UTIL,
    *,
    window_seconds: int = DEFAULT_WINDOW_SECONDS,
    exporter: GpuExporter,
) -> str | None:
    """Average GPU utilisation per GPU, by the exporter's ``UUID`` label: how records of a
    pod on DRA devices are measured (the meter knows each device's UUID from its
    ResourceSlice, so the join needs no pod label at all).

    None unless ``exporter`` identifies the real exporter: any scrape target can publish a
    ``UUID`` label, and without the exporter's matchers a tenant's target could publish
    another team's GPU with the numbers it likes. The query carries no value of any tenant
    or device: every GPU's series comes back, and the meter picks the UUIDs it knows.
    """
    if not exporter.matchers:
        return None
    window = _window(window_seconds)
    selector = _exporter_selector(source.value, exporter)
    if source is GpuSeries.GPU_UTIL:
        return f"avg by (UUID) (avg_over_time({selector}{window}))"
    if source is GpuSeries.GR_ENGINE_ACTIVE:
        return f"avg by (UUID) (100 * avg_over_time({selector}{window}))"
    raise ValueError(f"{source} is not a utilisation series")


def parse_uuid_matrix_response(
    body: str | bytes | Mapping[str, Any],
) -> dict[str, dict[int, float]]:
    """Map a range-query matrix of :func:`gpu_utilization_by_uuid_query` to
    ``{uuid: {t: value}}``; series without a UUID are skipped."""
    readings: dict[str, dict[int, float]] = {}
    for labels, samples in _matrix(_load(body)):
        uuid = labels.get("UUID")
        if not isinstance(uuid, str) or not uuid:
            continue
        if uuid in readings:
            raise PrometheusResponseError("DuplicateSeries", f"two series for GPU {uuid}")
        readings[uuid] = _points(samples)
    return readings


def gpu_memory_query(
    *,
    window_seconds: int = DEFAULT_WINDOW_SECONDS,
    exporter: GpuExporter = UNIDENTIFIED_EXPORTER,
) -> str:
    """Framebuffer memory in use per pod, in percent: ``100 * used / (used + free)``.

    The two series of one GPU carry the same labels, so the division matches them one to
    one; a GPU that reports 0 used and 0 free yields NaN, which the parser keeps and the
    decision drops.
    """
    window = _window(window_seconds)
    used = f"avg_over_time({_exporter_selector('DCGM_FI_DEV_FB_USED', exporter)}{window})"
    free = f"avg_over_time({_exporter_selector('DCGM_FI_DEV_FB_FREE', exporter)}{window})"
    return _keyed_by_pod(f"100 * {used} / ({used} + {free})", exporter)


def gpu_queries(
    *,
    window_seconds: int = DEFAULT_WINDOW_SECONDS,
    exporter: GpuExporter = UNIDENTIFIED_EXPORTER,
) -> dict[GpuSeries, str]:
    """The GPU queries of one tick: always these three, whatever the number of services."""
    return {
        GpuSeries.GPU_UTIL: gpu_utilization_query(
            GpuSeries.GPU_UTIL, window_seconds=window_seconds, exporter=exporter
        ),
        GpuSeries.GR_ENGINE_ACTIVE: gpu_utilization_query(
            GpuSeries.GR_ENGINE_ACTIVE, window_seconds=window_seconds, exporter=exporter
        ),
        GpuSeries.MEMORY: gpu_memory_query(window_seconds=window_seconds, exporter=exporter),
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


def validate_tenant_namespace_label(name: str) -> str:
    """Return ``name`` if it can be the label that carries a tenant metric's scrape target
    namespace (the operator's setting), else raise ``ValueError``.

    It must be a label that Prometheus attaches to the target, which is why the
    ``exported_*`` names are refused: Prometheus gives them to the series' own labels when
    they collide with the target's, so any target can fill them. Names starting with ``__``
    never reach a stored series, and ``service`` is the other half of the key.
    """
    if not _LABEL_NAME.fullmatch(name) or len(name) > _MAX_METRIC_NAME_LENGTH:
        raise ValueError(f"invalid tenant namespace label {name!r}")
    if name.startswith("__"):
        raise ValueError(f"tenant namespace label {name!r}: __ names never reach a series")
    if name.startswith("exported_"):
        raise ValueError(
            f"tenant namespace label {name!r}: exported_* labels are the scraped series' own, "
            "which any target can set; name the target label (namespace, or the Prometheus "
            "Operator's enforcedNamespaceLabel)"
        )
    if name == "service":
        raise ValueError("tenant namespace label 'service': that label names the service")
    return name


def _namespace_scope(label: str, namespaces: Iterable[str]) -> tuple[str, str, str]:
    """The matcher that keeps a tenant metric query to ``namespaces``: ``(label, "=~", regex)``.

    Each name is held to Kubernetes's rule for a namespace (a DNS label: lower-case letters,
    digits and ``-``), so the alternation holds no regex metacharacter; PromQL anchors a
    regex matcher at both ends, so ``a|b`` matches exactly ``a`` or ``b``.
    """
    names = sorted(set(namespaces))
    if not names:
        raise ValueError("a tenant metric query needs the namespaces that declare the metric")
    for name in names:
        if not _NAMESPACE_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a Kubernetes namespace name")
    return label, "=~", "|".join(names)


def prometheus_metric_group_query(
    metric: str,
    labels: Mapping[str, str],
    aggregation: Aggregation,
    namespaces: Iterable[str],
    *,
    window_seconds: int = DEFAULT_WINDOW_SECONDS,
    namespace_label: str = DEFAULT_TENANT_NAMESPACE_LABEL,
) -> str:
    """One query for every service that declares the same tenant metric.

    ``sum by (namespace, service) (avg_over_time({__name__="m",namespace=~"a|b",k="v"}[30s]))``
    answers for all of them at once, so a tick sends one query per distinct metric
    declaration, not one per service. ``namespaces`` are those of the services that declare
    it: the query reads that metric's series of those namespaces and no others, which bounds
    its cost whatever else the shared Prometheus holds.

    Scope comes from ``namespace_label``, the label Prometheus attaches to the *scrape
    target* (see docs/autoscaling.md for the configuration that makes it the target's own
    namespace), and ``service``: a service reads only the series keyed by its own namespace
    and name (see :func:`parse_grouped_response`). Grouping by exactly these two drops every
    other label, ``exported_namespace`` included, so a series' claim about another namespace
    never reaches a key. The scope is namespace plus service, never pod: a service at zero
    replicas has no pods, and a request-level metric (from a gateway or a queue exporter that
    keeps running) is what wakes it.

    The metric name goes in a ``__name__`` matcher so that a name such as ``sum`` or ``inf``
    cannot be read as a keyword. The namespaces follow in name order, then the tenant
    matchers in name order, so equal declarations give byte-equal queries that the caller
    de-duplicates by their text. A tenant matcher can only narrow the selection: matchers
    are ANDed, and the scope matcher is always there.
    """
    validate_tenant_selector(metric, labels)
    validate_tenant_namespace_label(namespace_label)
    scope_label, operator, alternation = _namespace_scope(namespace_label, namespaces)
    body = ",".join(
        [
            f"__name__={quote_label_value(metric)}",
            f"{scope_label}{operator}{quote_label_value(alternation)}",
            *(f"{name}={quote_label_value(value)}" for name, value in sorted(labels.items())),
        ]
    )
    selector = "{" + body + "}" + _window(window_seconds)
    return (
        f"{Aggregation(aggregation).value} by ({namespace_label}, service) "
        f"(avg_over_time({selector}))"
    )


def parse_grouped_response(
    body: str | bytes | Mapping[str, Any],
    *,
    namespace_label: str = DEFAULT_TENANT_NAMESPACE_LABEL,
) -> dict[ServiceKey, float]:
    """Map a :func:`prometheus_metric_group_query` result to ``{(namespace, service): value}``.

    The namespace is read from ``namespace_label`` and nothing else: unlike the GPU parsers,
    no ``exported_*`` label ever stands in for it, as that is the label a series claiming
    another namespace arrives with. Series without both labels belong to no service and are
    skipped; two series with one key mean the answer is not one of these queries'.
    """
    data = _load(body)
    if data.get("resultType") != "vector":
        raise PrometheusResponseError(
            "UnexpectedResultType", f"expected a vector, got {data.get('resultType')!r}"
        )
    result = data.get("result")
    if not isinstance(result, list):
        raise PrometheusResponseError("MalformedResponse", "the result is not a list")
    totals: dict[ServiceKey, float] = {}
    for item in result:
        if not (isinstance(item, dict) and isinstance(labels := item.get("metric"), dict)):
            raise PrometheusResponseError("MalformedResponse", f"bad series {item!r}")
        value = _sample_value(item.get("value"))
        namespace, service = labels.get(namespace_label), labels.get("service")
        if not (isinstance(namespace, str) and namespace and isinstance(service, str) and service):
            continue
        if (namespace, service) in totals:
            raise PrometheusResponseError(
                "DuplicateSeries", f"two series for {(namespace, service)}"
            )
        totals[namespace, service] = value
    return totals


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
