"""PromQL builders and the response parser.

The tenant query is checked by a strict tokenizer and parser written here, independent of
the builder: every generated query must parse back to exactly the intended matchers, with
hostile label values round-tripping byte for byte, and its answer must give each service
its own series and nobody else's. When promtool is installed, the real
PromQL engine also evaluates the queries against synthetic series.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuyard.logic.promql import (
    MAX_EXPORTER_MATCHERS,
    MAX_EXPORTER_VALUE_LENGTH,
    MAX_TENANT_LABEL_VALUE_LENGTH,
    UNIDENTIFIED_EXPORTER,
    Aggregation,
    GpuExporter,
    GpuSeries,
    PrometheusResponseError,
    gpu_memory_query,
    gpu_queries,
    gpu_utilization_query,
    parse_grouped_response,
    parse_matrix_response,
    parse_vector_by_owner,
    parse_vector_response,
    prometheus_metric_group_query,
    quote_label_value,
    validate_tenant_namespace_label,
    validate_tenant_selector,
)

# --- a strict PromQL tokenizer for the shapes the builder emits ------------------------------

_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
}
_HEX = set("0123456789abcdefABCDEF")


def _unquote(text: str, start: int) -> tuple[str, int]:
    """Read the double-quoted literal at ``text[start]``; return its value and the index after.

    Go's rules for interpreted string literals: named escapes, \\x hex byte, \\u and \\U code
    points (no surrogates, nothing above U+10FFFF), three-digit octal. A raw newline or an
    unknown escape is an error, as in Prometheus's lexer.
    """
    assert text[start] == '"'
    out: list[str] = []
    i = start + 1
    while True:
        if i >= len(text):
            raise ValueError("unterminated string")
        char = text[i]
        if char == '"':
            return "".join(out), i + 1
        if char == "\n":
            raise ValueError("raw newline in string")
        if char != "\\":
            out.append(char)
            i += 1
            continue
        kind = text[i + 1 : i + 2]
        if kind in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[kind])
            i += 2
        elif kind in {"x", "u", "U"}:
            width = {"x": 2, "u": 4, "U": 8}[kind]
            digits = text[i + 2 : i + 2 + width]
            if len(digits) != width or not set(digits) <= _HEX:
                raise ValueError(f"bad \\{kind} escape")
            code = int(digits, 16)
            if kind != "x" and (code > 0x10FFFF or 0xD800 <= code <= 0xDFFF):
                raise ValueError("escape is not a Unicode scalar value")
            out.append(chr(code))
            i += 2 + width
        elif kind and kind in "01234567":
            digits = text[i + 1 : i + 4]
            if len(digits) != 3 or not set(digits) <= set("01234567") or int(digits, 8) > 255:
                raise ValueError("bad octal escape")
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            raise ValueError(f"unknown escape \\{kind}")


_TOKEN = re.compile(
    r"(?P<space> +)|(?P<duration>[0-9]+[smhdwy])|(?P<number>[0-9]+)"
    r"|(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)|(?P<op>=~|!~|!=|=)|(?P<arithmetic>[*/+])"
    r"|(?P<punct>[(){}\[\],])"
)


def tokenize(query: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    i = 0
    while i < len(query):
        if query[i] == '"':
            value, i = _unquote(query, i)
            tokens.append(("string", value))
            continue
        match = _TOKEN.match(query, i)
        if match is None:
            raise ValueError(f"unexpected character {query[i]!r} at {i}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, match.group()))
        i = match.end()
    return tokens


def parse_tenant_query(query: str) -> tuple[str, list[str], list[tuple[str, str, str]], str]:
    """Parse ``agg by (labels) (avg_over_time({matchers}[window]))`` strictly:
    (agg, grouping labels, matchers, window)."""
    tokens = tokenize(query)
    position = 0

    def take(kind: str, text: str | None = None) -> str:
        nonlocal position
        if position >= len(tokens):
            raise ValueError(f"expected {kind}, got the end")
        got_kind, got_text = tokens[position]
        if got_kind != kind or (text is not None and got_text != text):
            raise ValueError(f"expected {kind} {text or ''}, got {got_kind} {got_text!r}")
        position += 1
        return got_text

    def peek() -> tuple[str, str] | None:
        return tokens[position] if position < len(tokens) else None

    aggregation = take("ident")
    take("ident", "by")
    take("punct", "(")
    grouping = [take("ident")]
    while peek() == ("punct", ","):
        take("punct", ",")
        grouping.append(take("ident"))
    take("punct", ")")
    take("punct", "(")
    take("ident", "avg_over_time")
    take("punct", "(")
    take("punct", "{")
    matchers = []
    while True:
        name = take("ident")
        op = take("op")
        value = take("string")
        matchers.append((name, op, value))
        if peek() == ("punct", "}"):
            break
        take("punct", ",")
    take("punct", "}")
    take("punct", "[")
    window = take("duration")
    take("punct", "]")
    take("punct", ")")
    take("punct", ")")
    if position != len(tokens):
        raise ValueError(f"trailing tokens {tokens[position:]}")
    return aggregation, grouping, matchers, window


def test_the_test_parser_rejects_what_promql_rejects() -> None:
    # The parser must be able to fail, or the property test below proves nothing.
    for broken in [
        'sum by (namespace) (avg_over_time({a="x"}[30s])) or vector(1)',
        'sum by (namespace) (avg_over_time({a="x\n"}[30s]))',
        'sum by (namespace) (avg_over_time({a="x\\q"}[30s]))',
        'sum by (namespace) (avg_over_time({a="\\ud800"}[30s]))',
        'sum by (namespace) (avg_over_time({a="x"}[30s])',
        'sum by (namespace) (avg_over_time({a="x",}[30s]))',
        'sum by (namespace) (avg_over_time({a="x"} [30s]) # )',
        'sum by (namespace) (avg_over_time({a="unterminated}[30s]))',
        'sum by (namespace,) (avg_over_time({a="x"}[30s]))',
        'sum(avg_over_time({a="x"}[30s]))',
    ]:
        with pytest.raises(ValueError):  # noqa: PT011 - any parse error will do
            parse_tenant_query(broken)
    parsed = parse_tenant_query(
        'max by (namespace, service) (avg_over_time({a="\\x41\\101\\u00e9\\"",b!~"c"}[1m]))'
    )
    assert parsed == ("max", ["namespace", "service"], [("a", "=", 'AAé"'), ("b", "!~", "c")], "1m")


# --- label value quoting -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("plain", '"plain"'),
        ("", '""'),
        ('say "hi"', '"say \\"hi\\""'),
        ("C:\\dir", '"C:\\\\dir"'),
        ("line\nbreak", '"line\\u000abreak"'),
        ("tab\tcr\r", '"tab\\u0009cr\\u000d"'),
        ("nul\x00", '"nul\\u0000"'),
        ("del\x7f", '"del\\u007f"'),
        ("é", '"\\u00e9"'),
        ("😀", '"\\U0001f600"'),
        ("\u202e", '"\\u202e"'),
        ("} or vector(1)", '"} or vector(1)"'),
    ],
)
def test_quote_label_value(value: str, literal: str) -> None:
    assert quote_label_value(value) == literal
    assert _unquote(literal, 0) == (value, len(literal))


def test_quote_rejects_lone_surrogates() -> None:
    with pytest.raises(ValueError, match="surrogate"):
        quote_label_value("a\ud800b")


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"])))
def test_quote_round_trips_and_emits_printable_ascii(value: str) -> None:
    literal = quote_label_value(value)
    assert all(0x20 <= ord(c) < 0x7F for c in literal)
    assert _unquote(literal, 0) == (value, len(literal))


def _vector(*series: tuple[dict[str, str], str]) -> str:
    result = [{"metric": labels, "value": [1700000000.5, value]} for labels, value in series]
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})


# --- tenant metric queries: one per distinct declaration, grouped by service ---------------

#: The namespaces of the services that declare a metric, where a test does not care which.
NS = ("a", "b")


def test_tenant_query_shape() -> None:
    query = prometheus_metric_group_query(
        "vllm:num_requests_waiting", {"model": "llama"}, Aggregation.SUM, ["team-b", "team-a"]
    )
    assert query == (
        "sum by (namespace, service) (avg_over_time("
        '{__name__="vllm:num_requests_waiting",namespace=~"team-a|team-b",model="llama"}[30s]))'
    )


def test_tenant_query_window_and_aggregation() -> None:
    query = prometheus_metric_group_query("q", {}, Aggregation.MAX, ["ns"], window_seconds=5)
    assert parse_tenant_query(query) == (
        "max",
        ["namespace", "service"],
        [("__name__", "=", "q"), ("namespace", "=~", "ns")],
        "5s",
    )


def test_equal_specs_give_byte_equal_queries() -> None:
    # The tick de-duplicates queries by their text; label order must not matter.
    one = prometheus_metric_group_query("q", {"b": "2", "a": "1"}, Aggregation.AVG, NS)
    two = prometheus_metric_group_query("q", {"a": "1", "b": "2"}, Aggregation.AVG, NS)
    assert one == two
    assert one != prometheus_metric_group_query("q", {"a": "1", "b": "3"}, Aggregation.AVG, NS)
    assert one != prometheus_metric_group_query("q", {"a": "1", "b": "2"}, Aggregation.SUM, NS)
    # Namespaces in any order, repeated or not, give the same text too.
    assert one == prometheus_metric_group_query(
        "q", {"a": "1", "b": "2"}, Aggregation.AVG, ["b", "a", "b"]
    )


def test_metric_names_that_are_keywords_stay_names() -> None:
    for name in ["sum", "by", "inf", "nan", "offset", "bool", "on"]:
        _, _, matchers, _ = parse_tenant_query(
            prometheus_metric_group_query(name, {}, Aggregation.SUM, NS)
        )
        assert matchers == [("__name__", "=", name), ("namespace", "=~", "a|b")]


@pytest.mark.parametrize(
    "labels",
    [
        {"namespace": "other"},
        {"pod": "x"},
        {"service": "other"},
        # Refused by the CRD as well (one tuple, gpuyard.api.names): a spec that reaches
        # the query builder without passing the API server is held to the same rule.
        {"exported_namespace": "other"},
        {"exported_pod": "x"},
        {"__name__": "other_metric"},
        {"__meta_kubernetes_namespace": "x"},
        {"bad-name": "x"},
        {"1abc": "x"},
        {"": "x"},
        {"ok\n": "x"},
        {"a": "x" * (MAX_TENANT_LABEL_VALUE_LENGTH + 1)},
        {f"l{i}": "x" for i in range(9)},
    ],
)
def test_tenant_labels_rejected(labels: dict[str, str]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies by rule
        prometheus_metric_group_query("q", labels, Aggregation.SUM, NS)


@pytest.mark.parametrize("metric", ["", "1abc", "a-b", "a b", "a\n", "é", "a{b}", "x" * 201])
def test_tenant_metric_names_rejected(metric: str) -> None:
    with pytest.raises(ValueError, match="metric name"):
        validate_tenant_selector(metric, {})
    with pytest.raises(ValueError, match="metric name"):
        prometheus_metric_group_query(metric, {}, Aggregation.SUM, NS)


@pytest.mark.parametrize("window", [0, -1, 86_401, True])
def test_window_bounds(window: int) -> None:
    with pytest.raises(ValueError, match="window"):
        prometheus_metric_group_query("q", {}, Aggregation.SUM, NS, window_seconds=window)


_HOSTILE_PIECES = [
    '"',
    "\\",
    "}",
    "{",
    "]",
    "[",
    "(",
    ")",
    ",",
    "=",
    "=~",
    "!=",
    ".*",
    "|",
    "$1",
    "^",
    "\n",
    "\r",
    "\t",
    "\x00",
    "\u2028",
    "\u202e",
    "é",
    "😀",
    "'",
    "`",
    "#",
    " or vector(1)",
    'namespace="kube-system"',
    ") by (pod",
]
_LABEL_NAMES = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,15}", fullmatch=True).filter(
    lambda n: not n.startswith("__") and n not in {"namespace", "pod", "service"}
)
_HOSTILE_VALUES = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=64),
    st.lists(st.sampled_from(_HOSTILE_PIECES), max_size=16).map("".join),
)
_NAMESPACES = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
_SERVICES = st.from_regex(r"[a-z]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    metric=st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,30}", fullmatch=True),
    labels=st.dictionaries(_LABEL_NAMES, _HOSTILE_VALUES, max_size=8),
    aggregation=st.sampled_from(Aggregation),
    namespaces=st.sets(_NAMESPACES, min_size=1, max_size=5),
)
def test_hostile_labels_parse_back_to_exactly_the_intended_matchers(
    metric: str, labels: dict[str, str], aggregation: Aggregation, namespaces: set[str]
) -> None:
    query = prometheus_metric_group_query(metric, labels, aggregation, namespaces)
    parsed_aggregation, grouping, matchers, window = parse_tenant_query(query)
    assert parsed_aggregation == aggregation.value
    # The result is keyed by exactly the scope labels, whatever the tenant wrote.
    assert grouping == ["namespace", "service"]
    assert window == "30s"
    scope = ("namespace", "=~", "|".join(sorted(namespaces)))
    assert matchers == [("__name__", "=", metric), scope] + [
        (n, "=", v) for n, v in sorted(labels.items())
    ]
    # No tenant value became a scope matcher, a regex or a negation; the one regex is the
    # operator's alternation of whole namespace names, which holds no metacharacter.
    tenant_matchers = matchers[2:]
    assert not {"namespace", "service", "pod"} & {name for name, _, _ in tenant_matchers}
    assert {op for _, op, _ in tenant_matchers} <= {"="}
    assert re.fullmatch(r"[a-z0-9-]+(\|[a-z0-9-]+)*", scope[2])


@pytest.mark.parametrize(
    "namespaces",
    [
        [],
        [""],
        ["Team-A"],
        ["a|b"],
        ["a.*"],
        [".*"],
        ["-a"],
        ["a-"],
        ["a" * 64],
        ['a"} or vector(1) #'],
        ["team-a", "team-b\n"],
    ],
)
def test_tenant_query_namespaces_must_be_namespace_names(namespaces: list[str]) -> None:
    # The operator derives them from cached AIServices, whose names the API server checked;
    # anything else is a bug, refused before it can widen the alternation.
    with pytest.raises(ValueError, match="namespace"):
        prometheus_metric_group_query("q", {}, Aggregation.SUM, namespaces)


def test_the_namespace_label_is_a_setting() -> None:
    query = prometheus_metric_group_query(
        "q", {"k": "v"}, Aggregation.SUM, ["a"], namespace_label="tenant_namespace"
    )
    assert parse_tenant_query(query) == (
        "sum",
        ["tenant_namespace", "service"],
        [("__name__", "=", "q"), ("tenant_namespace", "=~", "a"), ("k", "=", "v")],
        "30s",
    )
    body = _vector(
        ({"tenant_namespace": "a", "namespace": "b", "service": "chat"}, "5"),
        ({"namespace": "a", "service": "embed"}, "7"),
    )
    assert parse_grouped_response(body, namespace_label="tenant_namespace") == {("a", "chat"): 5}


@pytest.mark.parametrize(
    "label",
    ["", "exported_namespace", "exported_tenant", "__meta_kubernetes_namespace", "service",
     "bad-name", "1x", 'namespace="a"', "x" * 201],
)  # fmt: skip
def test_namespace_labels_a_target_cannot_own_are_refused(label: str) -> None:
    with pytest.raises(ValueError, match="namespace label"):
        validate_tenant_namespace_label(label)
    with pytest.raises(ValueError, match="namespace label"):
        prometheus_metric_group_query("q", {}, Aggregation.SUM, ["a"], namespace_label=label)


def test_a_series_that_claims_another_namespace_is_keyed_by_its_target() -> None:
    """What a tenant's target publishes about another namespace arrives, when Prometheus
    does not honour its labels, as exported_namespace beside the target's own namespace.
    The parser reads the target's label alone, unlike the GPU parsers, which read
    exported_* for the one exporter that the operator trusts."""
    body = _vector(
        ({"namespace": "attacker", "exported_namespace": "victim", "service": "chat"}, "100"),
        ({"exported_namespace": "victim", "service": "chat"}, "100"),
        ({"namespace": "victim", "exported_service": "chat", "service": "gateway"}, "3"),
    )
    assert parse_grouped_response(body) == {("attacker", "chat"): 100, ("victim", "gateway"): 3}


_SCOPE_VALUES = st.one_of(_NAMESPACES, _HOSTILE_VALUES)


@settings(max_examples=200, deadline=None)
@given(
    namespace=_NAMESPACES,
    service=_SERVICES,
    others=st.dictionaries(
        st.tuples(_SCOPE_VALUES, _SCOPE_VALUES),
        st.floats(min_value=0, max_value=1e6, allow_nan=False),
        max_size=8,
    ),
    own=st.one_of(st.none(), st.floats(min_value=0, max_value=1e6, allow_nan=False)),
)
def test_a_service_reads_only_its_own_series_from_a_grouped_answer(
    namespace: str,
    service: str,
    others: dict[tuple[str, str], float],
    own: float | None,
) -> None:
    """Other tenants' series, whatever their label values (near misses included), never
    reach a service; its own series reaches it exactly."""
    others.pop((namespace, service), None)
    series = [({"namespace": ns, "service": svc}, repr(v)) for (ns, svc), v in others.items()]
    if own is not None:
        series.append(({"namespace": namespace, "service": service}, repr(own)))
    values = parse_grouped_response(_vector(*series))
    assert values.get((namespace, service)) == own
    # Every key the parser returns is one series' labels, byte for byte.
    assert set(values) <= {(ns, svc) for (ns, svc) in others} | {(namespace, service)}


def test_parse_grouped_response() -> None:
    body = _vector(
        ({"namespace": "team-a", "service": "chat"}, "5"),
        ({"namespace": "team-a", "service": "embed"}, "NaN"),
        ({"namespace": "team-b", "service": "chat"}, "13"),
        # No scope: a series without one of the labels belongs to no service.
        ({"namespace": "team-a"}, "1"),
        ({"service": "chat"}, "2"),
        ({}, "3"),
        ({"namespace": "", "service": "chat"}, "4"),
    )
    values = parse_grouped_response(body)
    assert set(values) == {("team-a", "chat"), ("team-a", "embed"), ("team-b", "chat")}
    assert values[("team-a", "chat")] == 5.0
    assert math.isnan(values[("team-a", "embed")])
    assert values[("team-b", "chat")] == 13.0
    assert parse_grouped_response(_vector()) == {}


_SCALAR = '{"status":"success","data":{"resultType":"scalar","result":[1,"1"]}}'


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('{"status":"error","errorType":"bad_data","error":"parse error"}', "PrometheusError"),
        ("not json", "MalformedResponse"),
        (_SCALAR, "UnexpectedResultType"),
        (
            _vector(
                ({"namespace": "a", "service": "b"}, "1"),
                ({"namespace": "a", "service": "b"}, "2"),
            ),
            "DuplicateSeries",
        ),
    ],
)
def test_parse_grouped_errors(body: str, reason: str) -> None:
    with pytest.raises(PrometheusResponseError) as caught:
        parse_grouped_response(body)
    assert caught.value.reason == reason


# --- GPU queries ---------------------------------------------------------------------------

DCGM = GpuExporter.parse('job="dcgm"')


def test_gpu_utilization_query_shape() -> None:
    assert gpu_utilization_query(exporter=GpuExporter.parse('job="dcgm-exporter"')) == (
        "avg by (namespace, pod) (label_replace(label_replace("
        'avg_over_time(DCGM_FI_DEV_GPU_UTIL{job="dcgm-exporter"}[30s]), '
        '"namespace", "$1", "exported_namespace", "(.+)"), '
        '"pod", "$1", "exported_pod", "(.+)"))'
    )


def test_without_an_identified_exporter_only_plain_labels_key_the_series() -> None:
    # Any scrape target can publish exported_* labels: they name nobody's pod unless the
    # series are known to be the exporter's.
    queries = gpu_queries()
    assert queries[GpuSeries.GPU_UTIL] == (
        "avg by (namespace, pod) (avg_over_time(DCGM_FI_DEV_GPU_UTIL[30s]))"
    )
    assert not any("exported_" in query for query in queries.values())
    assert gpu_queries(exporter=UNIDENTIFIED_EXPORTER) == queries


def test_engine_active_is_scaled_to_percent() -> None:
    query = gpu_utilization_query(GpuSeries.GR_ENGINE_ACTIVE, window_seconds=60)
    assert "100 * avg_over_time(DCGM_FI_PROF_GR_ENGINE_ACTIVE[60s])" in query


def test_memory_query_divides_used_by_total() -> None:
    query = gpu_memory_query(exporter=DCGM)
    assert (
        '100 * avg_over_time(DCGM_FI_DEV_FB_USED{job="dcgm"}[30s]) / '
        '(avg_over_time(DCGM_FI_DEV_FB_USED{job="dcgm"}[30s]) + '
        'avg_over_time(DCGM_FI_DEV_FB_FREE{job="dcgm"}[30s]))'
    ) in query


HOSTILE_VALUE = 'x"}\n\\é😀 or vector(1)'


def test_gpu_queries_are_a_constant_set() -> None:
    queries = gpu_queries(exporter=GpuExporter((("job", 'a"b'),)))
    assert set(queries) == set(GpuSeries)
    assert all('{job="a\\"b"}' in q for q in queries.values())
    assert all(q.startswith("avg by (namespace, pod) (") for q in queries.values())


@pytest.mark.parametrize(
    "exporter",
    [
        GpuExporter((("job", HOSTILE_VALUE),)),
        GpuExporter((("namespace", "gpu-operator"), ("service", HOSTILE_VALUE[::-1]))),
    ],
)
def test_every_gpu_series_of_every_query_carries_exactly_the_exporter_matchers(
    exporter: GpuExporter,
) -> None:
    for query in gpu_queries(exporter=exporter).values():
        tokens = tokenize(query)
        metrics = [i for i, token in enumerate(tokens) if token[1].startswith("DCGM_FI_")]
        assert metrics
        for i in metrics:
            selector = tokens[i + 1 : i + 2 + 4 * len(exporter.matchers)]
            assert selector[0] == ("punct", "{")
            assert selector[-1] == ("punct", "}")
            matchers = [
                tuple(t[1] for t in selector[j : j + 3]) for j in range(1, len(selector) - 1, 4)
            ]
            assert matchers == [(name, "=", value) for name, value in exporter.matchers]
        # No value escaped its string: the query still has the shape of one.
        assert sum(token == ("punct", "{") for token in tokens) == len(metrics)
        assert ("ident", "or") not in tokens


def test_memory_is_not_a_utilization_source() -> None:
    with pytest.raises(ValueError, match="not a utilisation series"):
        gpu_utilization_query(GpuSeries.MEMORY)


# --- the exporter matchers setting ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "matchers"),
    [
        ("", ()),
        ("  ", ()),
        ("{}", ()),
        ('job="dcgm-exporter"', (("job", "dcgm-exporter"),)),
        (
            '{ service = "nvidia-dcgm-exporter" ,namespace="gpu-operator", }',
            (("namespace", "gpu-operator"), ("service", "nvidia-dcgm-exporter")),
        ),
        ('job="a\\"b\\\\c\\n\\t\\u00e9\\U0001F600"', (("job", 'a"b\\c\n\té😀'),)),
        ('job="é"', (("job", "é"),)),
        (
            'namespace="gpu-operator",pod="dcgm-1"',
            (("namespace", "gpu-operator"), ("pod", "dcgm-1")),
        ),
    ],
)
def test_exporter_matchers_parse(text: str, matchers: tuple[tuple[str, str], ...]) -> None:
    exporter = GpuExporter.parse(text)
    assert exporter.matchers == matchers
    assert exporter.trusts_exported_labels == bool(matchers)
    assert GpuExporter.parse(str(exporter)) == exporter


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('job=~"dcgm.*"', "only = is accepted"),
        ('job!="x"', "only = is accepted"),
        ('job!~"x"', "only = is accepted"),
        ('exported_namespace="gpu-operator"', "exported_\\* labels come from the scraped series"),
        ('exported_pod="x"', "any target can set them"),
        ('exported_job="x"', "any target can set them"),
        ('__name__="DCGM_FI_DEV_GPU_UTIL"', "belong to Prometheus"),
        ('job=""', "empty value matches series without the label"),
        ('job="a",job="b"', "given twice"),
        ('a-b="x"', "expected = after 'a'"),
        ('1job="x"', "expected a label name at 0"),
        ("job=dcgm", "expected a double-quoted value"),
        ("job='dcgm'", "expected a double-quoted value"),
        ("job=`dcgm`", "expected a double-quoted value"),
        ('job="dcgm', "unterminated string"),
        ('job="x"}', "unbalanced braces"),
        ('{job="x"', "unbalanced braces"),
        ("}", "unbalanced braces"),
        ('job="x" service="y"', "expected , at 8"),
        ('job="x"} or vector(1) or {a="b"', "expected , at 7"),
        ('job="x",,', "expected a label name"),
        ('job="x\ny"', "control character"),
        ('job="x\x7fy"', "control character"),
        ('job="\\q"', "unsupported escape"),
        ('job="\\x41"', "unsupported escape"),
        ('job="\\101"', "unsupported escape"),
        ('job="\\ud800"', "is no character"),
        ('job="\\U00110000"', "is no character"),
        ('job="\\u12"', "bad \\\\u escape"),
        ('job="\\u12zz"', "bad \\\\u escape"),
        (",".join(f'l{i}="v"' for i in range(9)), "at most 8 exporter matchers"),
        ('job="' + "x" * 257 + '"', "value over 256"),
    ],
)
def test_bad_exporter_matchers_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GpuExporter.parse(text)


@pytest.mark.parametrize(
    "matchers",
    [
        (("service", "a"), ("job", "b")),  # not in name order
        (("job", "a"), ("job", "b")),
        (("exported_pod", "x"),),
        (("a-b", "x"),),
        (("job", "\ud800"),),
    ],
)
def test_an_exporter_built_directly_is_checked_as_strictly(
    matchers: tuple[tuple[str, str], ...],
) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each has its own message above
        GpuExporter(matchers)


_label_names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,20}", fullmatch=True).filter(
    lambda name: not name.startswith(("__", "exported_"))
)
_label_values = st.text(
    st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=MAX_EXPORTER_VALUE_LENGTH
)


@given(st.dictionaries(_label_names, _label_values, max_size=MAX_EXPORTER_MATCHERS))
@settings(max_examples=200, deadline=None)
def test_exporter_matchers_round_trip_through_promql(pairs: dict[str, str]) -> None:
    exporter = GpuExporter(tuple(sorted(pairs.items())))

    assert GpuExporter.parse(str(exporter)) == exporter
    assert GpuExporter.parse(exporter.selector()) == exporter
    # What goes into a query is plain ASCII and parses back, by the strict tokenizer above,
    # to exactly the configured matchers.
    selector = exporter.selector()
    assert selector.isascii()
    if pairs:
        tokens = tokenize(selector)
        assert tokens[0] == ("punct", "{")
        assert tokens[-1] == ("punct", "}")
        body = [token for token in tokens[1:-1] if token != ("punct", ",")]
        triples = [tuple(t[1] for t in body[i : i + 3]) for i in range(0, len(body), 3)]
        assert triples == [(name, "=", value) for name, value in sorted(pairs.items())]


# --- response parsing ----------------------------------------------------------------------


def test_parse_vector_both_label_spellings() -> None:
    body = _vector(
        ({"namespace": "team-a", "pod": "p1"}, "61.5"),
        (
            {
                "namespace": "gpu-operator",
                "pod": "dcgm-exporter-x",
                "exported_namespace": "team-b",
                "exported_pod": "p2",
            },
            "20",
        ),
    )
    assert parse_vector_response(body) == {("team-a", "p1"): 61.5, ("team-b", "p2"): 20.0}


def test_parse_vector_special_values() -> None:
    body = _vector(
        ({"namespace": "a", "pod": "nan"}, "NaN"),
        ({"namespace": "a", "pod": "inf"}, "+Inf"),
        ({"namespace": "a", "pod": "ninf"}, "-Inf"),
        ({"namespace": "a", "pod": "exp"}, "1e+06"),
        ({"namespace": "a", "pod": "neg"}, "-3"),
    )
    values = parse_vector_response(body)
    assert math.isnan(values[("a", "nan")])
    assert values[("a", "inf")] == math.inf
    assert values[("a", "ninf")] == -math.inf
    assert values[("a", "exp")] == 1e6
    assert values[("a", "neg")] == -3.0


def test_parse_vector_skips_series_without_workload() -> None:
    # Idle GPUs: no pod when labels are honoured, an empty exported pod otherwise.
    body = _vector(({"namespace": "a", "pod": ""}, "1"), ({"gpu": "0"}, "2"))
    assert parse_vector_response(body) == {}


def test_parse_vector_empty_and_decoded_input() -> None:
    assert parse_vector_response(_vector()) == {}
    assert parse_vector_response(json.loads(_vector(({"namespace": "a", "pod": "b"}, "1")))) == {
        ("a", "b"): 1.0
    }
    assert parse_vector_response(_vector().encode()) == {}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('{"status":"error","errorType":"bad_data","error":"parse error"}', "PrometheusError"),
        ("not json", "MalformedResponse"),
        ("[]", "MalformedResponse"),
        ('{"status":"success"}', "MalformedResponse"),
        ('{"status":"weird","data":{}}', "MalformedResponse"),
        ('{"status":"success","data":{"resultType":"matrix","result":[]}}', "UnexpectedResultType"),
        ('{"status":"success","data":{"resultType":"vector","result":{}}}', "MalformedResponse"),
        ('{"status":"success","data":{"resultType":"vector","result":[1]}}', "MalformedResponse"),
        (_vector(({"namespace": "a", "pod": "b"}, "1_000")), "MalformedResponse"),
        (_vector(({"namespace": "a", "pod": "b"}, " 1")), "MalformedResponse"),
        (_vector(({"namespace": "a", "pod": "b"}, "infinity")), "MalformedResponse"),
        (_vector(({"namespace": "a", "pod": "b"}, "nan")), "MalformedResponse"),
        (
            _vector(
                ({"namespace": "a", "pod": "b"}, "1"),
                ({"exported_namespace": "a", "exported_pod": "b"}, "2"),
            ),
            "DuplicateSeries",
        ),
    ],
)
def test_parse_vector_errors(body: str, reason: str) -> None:
    with pytest.raises(PrometheusResponseError) as caught:
        parse_vector_response(body)
    assert caught.value.reason == reason


def test_parse_vector_rejects_a_bad_sample_shape() -> None:
    body = {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, 2]}]},
    }
    with pytest.raises(PrometheusResponseError, match="bad sample"):
        parse_vector_response(body)


OWNERS = {
    ("team-a", "chat-0"): ("chat", "chat-0"),
    ("team-a", "chat-1"): ("chat", "chat-1"),
    ("team-b", "embed-0"): ("embed", "embed-0"),
}


def test_parse_vector_by_owner_groups_each_owned_pod_under_its_owner() -> None:
    body = _vector(
        ({"namespace": "team-a", "pod": "chat-0"}, "61.5"),
        ({"exported_namespace": "team-a", "exported_pod": "chat-1", "pod": "dcgm-x"}, "NaN"),
        ({"namespace": "team-b", "pod": "embed-0"}, "20"),
        ({"namespace": "team-c", "pod": "someone-else"}, "99"),  # no owner: skipped
        ({"namespace": "team-a", "pod": ""}, "3"),  # an idle GPU
    )
    grouped = parse_vector_by_owner(body, OWNERS)
    assert set(grouped) == {"chat", "embed"}
    assert grouped["chat"]["chat-0"] == 61.5
    assert math.isnan(grouped["chat"]["chat-1"])
    assert grouped["embed"] == {"embed-0": 20.0}
    # The same answer keyed by pod carries the same values.
    keyed = parse_vector_response(body)
    for (namespace, pod), (owner, name) in OWNERS.items():
        assert repr(grouped[owner][name]) == repr(keyed[namespace, pod])


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        # A malformed value is refused even for a pod nobody owns: the answer is not ours.
        (_vector(({"namespace": "x", "pod": "y"}, "1_000")), "MalformedResponse"),
        (
            _vector(
                ({"namespace": "team-a", "pod": "chat-0"}, "1"),
                ({"exported_namespace": "team-a", "exported_pod": "chat-0"}, "2"),
            ),
            "DuplicateSeries",
        ),
        ('{"status":"success","data":{"resultType":"matrix","result":[]}}', "UnexpectedResultType"),
        ('{"status":"error","errorType":"bad_data","error":"parse error"}', "PrometheusError"),
    ],
)
def test_parse_vector_by_owner_errors(body: str, reason: str) -> None:
    with pytest.raises(PrometheusResponseError) as caught:
        parse_vector_by_owner(body, OWNERS)
    assert caught.value.reason == reason


# --- the real PromQL engine ----------------------------------------------------------------


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) absent")
def test_queries_evaluate_as_intended_in_prometheus(tmp_path: Path) -> None:
    """promtool's rule-test harness runs the PromQL engine in memory: no server."""
    hostile = 'x"}\n\\é😀 or vector(1)'

    def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
        matchers = ",".join(f"{k}={quote_label_value(v)}" for k, v in labels.items())
        return {"series": f"{name}{{{matchers}}}", "values": values}

    honoured = {"namespace": "team-a", "pod": "p1", "job": "dcgm"}
    not_honoured = {
        "namespace": "gpu-operator",
        "pod": "dcgm-exporter-1",
        "exported_namespace": "team-b",
        "exported_pod": "p2",
        "job": "dcgm",
    }
    idle = {"namespace": "gpu-operator", "pod": "dcgm-exporter-1", "job": "dcgm"}
    # A tenant's exporter scraped without honoured labels: its own target labels, and the
    # victim's pod in the exported_* labels it published.
    rogue = {
        "namespace": "team-x",
        "pod": "rogue",
        "exported_namespace": "team-a",
        "exported_pod": "p1",
        "job": "impostor",
    }
    # The GPU Operator's exporter behind its ServiceMonitor (honorLabels off), and a tenant
    # whose Service has the same name in its own namespace.
    operator_target = {"namespace": "gpu-operator", "service": "nvidia-dcgm-exporter"}
    gpu_operator = {
        **operator_target,
        "pod": "nvidia-dcgm-exporter-a",
        "job": "nvidia-dcgm-exporter",
    }
    gpu_operator_real = {**gpu_operator, "exported_namespace": "team-c", "exported_pod": "p3"}
    gpu_operator_rogue = {**gpu_operator_real, "namespace": "team-x", "pod": "rogue"}
    gpu_operator_exporter = GpuExporter(tuple(sorted(operator_target.items())))
    scope = {"namespace": "team-a", "service": "chat"}
    claim = {"namespace": "team-x", "exported_namespace": "team-a", "service": "chat"}
    # The near miss (the hostile value less its last character) matches nothing; the other
    # service and the other namespace get series of their own, never a share of team-a/chat.
    expected_tenant = [
        {"labels": '{namespace="team-a",service="chat"}', "value": 5},
        {"labels": '{namespace="team-a",service="other"}', "value": 11},
        {"labels": '{namespace="team-b",service="chat"}', "value": 13},
    ]
    test_file: dict[str, Any] = {
        "rule_files": [],
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    series("DCGM_FI_DEV_GPU_UTIL", {**honoured, "gpu": "0"}, "50x8"),
                    series("DCGM_FI_DEV_GPU_UTIL", {**honoured, "gpu": "1"}, "70x8"),
                    series("DCGM_FI_DEV_GPU_UTIL", {**not_honoured, "gpu": "0"}, "20x8"),
                    series("DCGM_FI_DEV_GPU_UTIL", {**idle, "gpu": "1"}, "0x8"),
                    series("DCGM_FI_DEV_GPU_UTIL", {**honoured, "job": "impostor"}, "100x8"),
                    series("DCGM_FI_DEV_GPU_UTIL", rogue, "100x8"),
                    series("DCGM_FI_DEV_GPU_UTIL", gpu_operator_real, "40x8"),
                    series("DCGM_FI_DEV_GPU_UTIL", gpu_operator_rogue, "100x8"),
                    series("DCGM_FI_DEV_FB_USED", rogue, "100x8"),
                    series("DCGM_FI_DEV_FB_FREE", rogue, "0x8"),
                    series("DCGM_FI_DEV_FB_USED", honoured, "30x8"),
                    series("DCGM_FI_DEV_FB_FREE", honoured, "70x8"),
                    series("DCGM_FI_PROF_GR_ENGINE_ACTIVE", not_honoured, "0.25x8"),
                    series("queue", {**scope, "model": hostile}, "5x8"),
                    series("queue", {**scope, "model": hostile[:-1]}, "7x8"),
                    series("queue", {**scope, "service": "other", "model": hostile}, "11x8"),
                    series("queue", {**scope, "namespace": "team-b", "model": hostile}, "13x8"),
                    # A tenant's target in team-x, not honoured, claiming team-a/chat.
                    series("queue", {**claim, "model": hostile}, "100x8"),
                ],
                "promql_expr_test": [
                    {
                        "expr": gpu_utilization_query(exporter=DCGM),
                        "eval_time": "1m",
                        "exp_samples": [
                            {"labels": '{namespace="team-a",pod="p1"}', "value": 60},
                            {"labels": '{namespace="team-b",pod="p2"}', "value": 20},
                            {
                                "labels": '{namespace="gpu-operator",pod="dcgm-exporter-1"}',
                                "value": 0,
                            },
                        ],
                    },
                    {
                        "expr": gpu_memory_query(exporter=DCGM),
                        "eval_time": "1m",
                        "exp_samples": [{"labels": '{namespace="team-a",pod="p1"}', "value": 30}],
                    },
                    {
                        # Nothing identifies the exporter: the rogue's exported_* labels
                        # are ignored, and its series stays in its own namespace.
                        "expr": gpu_memory_query(),
                        "eval_time": "1m",
                        "exp_samples": [
                            {"labels": '{namespace="team-a",pod="p1"}', "value": 30},
                            {"labels": '{namespace="team-x",pod="rogue"}', "value": 100},
                        ],
                    },
                    {
                        "expr": gpu_utilization_query(exporter=gpu_operator_exporter),
                        "eval_time": "1m",
                        "exp_samples": [{"labels": '{namespace="team-c",pod="p3"}', "value": 40}],
                    },
                    {
                        "expr": gpu_utilization_query(GpuSeries.GR_ENGINE_ACTIVE, exporter=DCGM),
                        "eval_time": "1m",
                        "exp_samples": [{"labels": '{namespace="team-b",pod="p2"}', "value": 25}],
                    },
                    {
                        "expr": prometheus_metric_group_query(
                            "queue", {"model": hostile}, Aggregation.SUM, ["team-b", "team-a"]
                        ),
                        "eval_time": "1m",
                        "exp_samples": expected_tenant,
                    },
                    {
                        # Where team-x declares the metric too, the claim is its own total.
                        "expr": prometheus_metric_group_query(
                            "queue", {"model": hostile}, Aggregation.SUM, ["team-a", "team-x"]
                        ),
                        "eval_time": "1m",
                        "exp_samples": [
                            *expected_tenant[:2],
                            {"labels": '{namespace="team-x",service="chat"}', "value": 100},
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "queries_test.yml"
    path.write_text(yaml.safe_dump(test_file))
    result = subprocess.run(
        ["promtool", "test", "rules", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- range queries: the meter's utilisation per pod per window ------------------------------


def _matrix(*series: tuple[dict[str, str], list[Any]]) -> str:
    result = [{"metric": labels, "values": values} for labels, values in series]
    return json.dumps({"status": "success", "data": {"resultType": "matrix", "result": result}})


def test_parse_matrix_keys_by_pod_and_whole_second() -> None:
    body = _matrix(
        ({"namespace": "team-a", "pod": "p1"}, [[1700000060, "40"], [1700000120.0, "NaN"]]),
        ({"exported_namespace": "team-b", "exported_pod": "p2", "pod": "dcgm"}, [[60, "7.5"]]),
        ({"namespace": "team-a", "pod": ""}, [[60, "99"]]),  # an idle GPU: no workload
    )
    values = parse_matrix_response(body)
    assert set(values) == {("team-a", "p1"), ("team-b", "p2")}
    assert values[("team-a", "p1")][1700000060] == 40.0
    assert math.isnan(values[("team-a", "p1")][1700000120])
    assert values[("team-b", "p2")] == {60: 7.5}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (_vector(({"namespace": "a", "pod": "b"}, "1")), "UnexpectedResultType"),
        (_matrix(({"namespace": "a", "pod": "b"}, [["60", "1"]])), "MalformedResponse"),
        (_matrix(({"namespace": "a", "pod": "b"}, [[True, "1"]])), "MalformedResponse"),
        (_matrix(({"namespace": "a", "pod": "b"}, [[60, "one"]])), "MalformedResponse"),
        (_matrix(({"namespace": "a", "pod": "b"}, [[60]])), "MalformedResponse"),
        (
            _matrix(({"namespace": "a", "pod": "b"}, []), ({"namespace": "a", "pod": "b"}, [])),
            "DuplicateSeries",
        ),
        ('{"status":"success","data":{"resultType":"matrix","result":[{"metric":{}}]}}',
         "MalformedResponse"),
    ],
)  # fmt: skip
def test_parse_matrix_rejects_what_it_cannot_read(body: str, reason: str) -> None:
    with pytest.raises(PrometheusResponseError) as raised:
        parse_matrix_response(body)
    assert raised.value.reason == reason


_GO_FLOAT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", re.ASCII)


@settings(max_examples=2000)
@given(st.text(alphabet="0123456789.eE+-_ xiInNfa", max_size=8))
def test_sample_values_are_exactly_go_floats(text: str) -> None:
    body = _vector(({"namespace": "a", "pod": "b"}, text))
    if text in ("NaN", "+Inf", "-Inf") or _GO_FLOAT.fullmatch(text):
        parse_vector_response(body)
    else:
        with pytest.raises(PrometheusResponseError):
            parse_vector_response(body)
