"""PromQL builders and the response parser.

The tenant query is checked by a strict tokenizer and parser written here, independent of
the builder: every generated query must parse back to exactly the intended matchers, with
hostile label values round-tripping byte for byte. When promtool is installed, the real
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
    MAX_TENANT_LABEL_VALUE_LENGTH,
    Aggregation,
    GpuSeries,
    PrometheusResponseError,
    gpu_memory_query,
    gpu_queries,
    gpu_utilization_query,
    parse_total_response,
    parse_vector_response,
    prometheus_metric_query,
    quote_label_value,
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
    r"(?P<space> +)|(?P<duration>[0-9]+[smhdwy])|(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"|(?P<op>=~|!~|!=|=)|(?P<punct>[(){}\[\],])"
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


def parse_tenant_query(query: str) -> tuple[str, list[tuple[str, str, str]], str]:
    """Parse ``agg(avg_over_time({matchers}[window]))`` strictly: (agg, matchers, window)."""
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

    aggregation = take("ident")
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
        if tokens[position] == ("punct", "}"):
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
    return aggregation, matchers, window


def test_the_test_parser_rejects_what_promql_rejects() -> None:
    # The parser must be able to fail, or the property test below proves nothing.
    for broken in [
        'sum(avg_over_time({a="x"}[30s])) or vector(1)',
        'sum(avg_over_time({a="x\n"}[30s]))',
        'sum(avg_over_time({a="x\\q"}[30s]))',
        'sum(avg_over_time({a="\\ud800"}[30s]))',
        'sum(avg_over_time({a="x"}[30s])',
        'sum(avg_over_time({a="x",}[30s]))',
        'sum(avg_over_time({a="x"} [30s]) # )',
        'sum(avg_over_time({a="unterminated}[30s]))',
    ]:
        with pytest.raises(ValueError):  # noqa: PT011 - any parse error will do
            parse_tenant_query(broken)
    assert parse_tenant_query('max(avg_over_time({a="\\x41\\101\\u00e9\\"",b!~"c"}[1m]))') == (
        "max",
        [("a", "=", 'AAé"'), ("b", "!~", "c")],
        "1m",
    )


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


# --- tenant metric queries -----------------------------------------------------------------


def test_tenant_query_shape() -> None:
    query = prometheus_metric_query(
        "vllm:num_requests_waiting", {"model": "llama"}, Aggregation.SUM, "team-a", "chat"
    )
    assert query == (
        'sum(avg_over_time({__name__="vllm:num_requests_waiting",namespace="team-a",'
        'service="chat",model="llama"}[30s]))'
    )


def test_tenant_query_window_and_aggregation() -> None:
    query = prometheus_metric_query("q", {}, Aggregation.MAX, "ns", "svc", window_seconds=5)
    assert parse_tenant_query(query) == (
        "max",
        [("__name__", "=", "q"), ("namespace", "=", "ns"), ("service", "=", "svc")],
        "5s",
    )


def test_equal_specs_give_byte_equal_queries() -> None:
    # The tick de-duplicates queries by their text; label order must not matter.
    one = prometheus_metric_query("q", {"b": "2", "a": "1"}, Aggregation.AVG, "ns", "svc")
    two = prometheus_metric_query("q", {"a": "1", "b": "2"}, Aggregation.AVG, "ns", "svc")
    assert one == two


def test_metric_names_that_are_keywords_stay_names() -> None:
    for name in ["sum", "by", "inf", "nan", "offset", "bool", "on"]:
        _, matchers, _ = parse_tenant_query(
            prometheus_metric_query(name, {}, Aggregation.SUM, "ns", "svc")
        )
        assert matchers[0] == ("__name__", "=", name)


@pytest.mark.parametrize(
    "labels",
    [
        {"namespace": "other"},
        {"pod": "x"},
        {"service": "other"},
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
        prometheus_metric_query("q", labels, Aggregation.SUM, "ns", "svc")


@pytest.mark.parametrize("metric", ["", "1abc", "a-b", "a b", "a\n", "é", "a{b}", "x" * 201])
def test_tenant_metric_names_rejected(metric: str) -> None:
    with pytest.raises(ValueError, match="metric name"):
        validate_tenant_selector(metric, {})


@pytest.mark.parametrize(
    ("namespace", "service"),
    [("", "svc"), ("ns", ""), ("NS", "svc"), ('ns"', "svc"), ("-ns", "svc"), ("ns", "svc\n")],
)
def test_scope_values_must_be_kubernetes_names(namespace: str, service: str) -> None:
    # An empty namespace matcher would match series *without* a namespace: never allowed.
    with pytest.raises(ValueError, match="invalid"):
        prometheus_metric_query("q", {}, Aggregation.SUM, namespace, service)


@pytest.mark.parametrize("window", [0, -1, 86_401, True])
def test_window_bounds(window: int) -> None:
    with pytest.raises(ValueError, match="window"):
        prometheus_metric_query("q", {}, Aggregation.SUM, "ns", "svc", window_seconds=window)


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
]
_LABEL_NAMES = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,15}", fullmatch=True).filter(
    lambda n: not n.startswith("__") and n not in {"namespace", "pod", "service"}
)
_HOSTILE_VALUES = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=64),
    st.lists(st.sampled_from(_HOSTILE_PIECES), max_size=16).map("".join),
)


@settings(max_examples=200, deadline=None)
@given(
    metric=st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,30}", fullmatch=True),
    labels=st.dictionaries(_LABEL_NAMES, _HOSTILE_VALUES, max_size=8),
    aggregation=st.sampled_from(Aggregation),
    namespace=st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True),
    service=st.from_regex(r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?(\.[a-z0-9]{1,5})?", fullmatch=True),
)
def test_hostile_labels_parse_back_to_exactly_the_intended_matchers(
    metric: str,
    labels: dict[str, str],
    aggregation: Aggregation,
    namespace: str,
    service: str,
) -> None:
    query = prometheus_metric_query(metric, labels, aggregation, namespace, service)
    parsed_aggregation, matchers, window = parse_tenant_query(query)
    assert parsed_aggregation == aggregation.value
    assert window == "30s"
    expected = [("__name__", "=", metric), ("namespace", "=", namespace)]
    expected += [("service", "=", service)] + [(n, "=", v) for n, v in sorted(labels.items())]
    assert matchers == expected
    # The scope appears once, unmodified, and no matcher is a regex or a negation.
    assert [m for m in matchers if m[0] == "namespace"] == [("namespace", "=", namespace)]
    assert {op for _, op, _ in matchers} == {"="}


# --- GPU queries ---------------------------------------------------------------------------


def test_gpu_utilization_query_shape() -> None:
    assert gpu_utilization_query() == (
        "avg by (namespace, pod) (label_replace(label_replace("
        "avg_over_time(DCGM_FI_DEV_GPU_UTIL[30s]), "
        '"namespace", "$1", "exported_namespace", "(.+)"), '
        '"pod", "$1", "exported_pod", "(.+)"))'
    )


def test_engine_active_is_scaled_to_percent() -> None:
    query = gpu_utilization_query(GpuSeries.GR_ENGINE_ACTIVE, window_seconds=60)
    assert "100 * avg_over_time(DCGM_FI_PROF_GR_ENGINE_ACTIVE[60s])" in query


def test_memory_query_divides_used_by_total() -> None:
    query = gpu_memory_query(exporter_matchers={"job": "dcgm"})
    assert (
        '100 * avg_over_time(DCGM_FI_DEV_FB_USED{job="dcgm"}[30s]) / '
        '(avg_over_time(DCGM_FI_DEV_FB_USED{job="dcgm"}[30s]) + '
        'avg_over_time(DCGM_FI_DEV_FB_FREE{job="dcgm"}[30s]))'
    ) in query


def test_gpu_queries_are_a_constant_set() -> None:
    queries = gpu_queries(exporter_matchers={"job": 'a"b'})
    assert set(queries) == set(GpuSeries)
    assert all('{job="a\\"b"}' in q for q in queries.values())
    assert all(q.startswith("avg by (namespace, pod) (") for q in queries.values())


@pytest.mark.parametrize(
    "matchers", [{"namespace": "x"}, {"exported_pod": "x"}, {"__name__": "x"}, {"a-b": "x"}]
)
def test_exporter_matchers_cannot_touch_the_keys(matchers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"(key label|label name)"):
        gpu_utilization_query(exporter_matchers=matchers)


def test_memory_is_not_a_utilization_source() -> None:
    with pytest.raises(ValueError, match="not a utilisation series"):
        gpu_utilization_query(GpuSeries.MEMORY)


# --- response parsing ----------------------------------------------------------------------


def _vector(*series: tuple[dict[str, str], str]) -> str:
    result = [{"metric": labels, "value": [1700000000.5, value]} for labels, value in series]
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})


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


def test_parse_total() -> None:
    assert parse_total_response(_vector()) is None
    assert parse_total_response(_vector(({}, "42.5"))) == 42.5
    scalar = {"status": "success", "data": {"resultType": "scalar", "result": [1.0, "7"]}}
    assert parse_total_response(scalar) == 7.0
    with pytest.raises(PrometheusResponseError, match="DuplicateSeries"):
        parse_total_response(_vector(({"a": "1"}, "1"), ({"a": "2"}, "2")))


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
    scope = {"namespace": "team-a", "service": "chat"}
    expected_tenant = [{"labels": "{}", "value": 5}]
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
                    series("DCGM_FI_DEV_FB_USED", honoured, "30x8"),
                    series("DCGM_FI_DEV_FB_FREE", honoured, "70x8"),
                    series("DCGM_FI_PROF_GR_ENGINE_ACTIVE", not_honoured, "0.25x8"),
                    series("queue", {**scope, "model": hostile}, "5x8"),
                    series("queue", {**scope, "model": hostile[:-1]}, "7x8"),
                    series("queue", {**scope, "service": "other", "model": hostile}, "11x8"),
                    series("queue", {**scope, "namespace": "team-b", "model": hostile}, "13x8"),
                ],
                "promql_expr_test": [
                    {
                        "expr": gpu_utilization_query(exporter_matchers={"job": "dcgm"}),
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
                        "expr": gpu_memory_query(exporter_matchers={"job": "dcgm"}),
                        "eval_time": "1m",
                        "exp_samples": [{"labels": '{namespace="team-a",pod="p1"}', "value": 30}],
                    },
                    {
                        "expr": gpu_utilization_query(GpuSeries.GR_ENGINE_ACTIVE),
                        "eval_time": "1m",
                        "exp_samples": [{"labels": '{namespace="team-b",pod="p2"}', "value": 25}],
                    },
                    {
                        "expr": prometheus_metric_query(
                            "queue", {"model": hostile}, Aggregation.SUM, "team-a", "chat"
                        ),
                        "eval_time": "1m",
                        "exp_samples": expected_tenant,
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
