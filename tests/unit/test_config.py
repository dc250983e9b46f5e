"""The operator's settings: GPUYARD_* variables, their defaults and what they refuse."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from gpuyard.config import Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's shell may export GPUYARD_* for the local cluster: start from none.
    for name in [name for name in os.environ if name.startswith("GPUYARD_")]:
        monkeypatch.delenv(name)


def test_usage_http_defaults() -> None:
    settings = Settings()

    assert settings.usage_http_url is None
    assert settings.usage_http_headers_file is None
    assert settings.usage_http_ca_file is None
    assert settings.usage_http_allow_insecure is False
    assert settings.usage_http_max_attempts == 4
    assert settings.usage_http_timeout_seconds == 10.0
    assert settings.usage_http_max_connections == 8


def test_usage_http_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUYARD_USAGE_HTTP_URL", "https://billing.example/api/v1/events")
    monkeypatch.setenv("GPUYARD_USAGE_HTTP_HEADERS_FILE", "/etc/gpuyard/usage-http-headers/h")
    monkeypatch.setenv("GPUYARD_USAGE_HTTP_CA_FILE", "/etc/gpuyard/usage-http-ca/ca.crt")
    monkeypatch.setenv("GPUYARD_USAGE_HTTP_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("GPUYARD_USAGE_HTTP_TIMEOUT_SECONDS", "2.5")
    monkeypatch.setenv("GPUYARD_USAGE_HTTP_MAX_CONNECTIONS", "16")

    settings = Settings()

    assert settings.usage_http_url == "https://billing.example/api/v1/events"
    assert settings.usage_http_headers_file == Path("/etc/gpuyard/usage-http-headers/h")
    assert settings.usage_http_ca_file == Path("/etc/gpuyard/usage-http-ca/ca.crt")
    assert settings.usage_http_max_attempts == 2
    assert settings.usage_http_timeout_seconds == 2.5
    assert settings.usage_http_max_connections == 16


def test_plain_http_needs_the_explicit_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUYARD_USAGE_HTTP_URL", "http://billing.example/api/v1/events")
    with pytest.raises(ValidationError) as refused:
        Settings()
    message = str(refused.value)
    assert "GPUYARD_USAGE_HTTP_ALLOW_INSECURE=true" in message
    assert "usage.http.allowInsecure" in message

    monkeypatch.setenv("GPUYARD_USAGE_HTTP_ALLOW_INSECURE", "true")
    assert Settings().usage_http_allow_insecure is True


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"usage_http_url": "ftp://billing.example/"}, "must start with https://"),
        ({"usage_http_headers_file": Path("h")}, "need GPUYARD_USAGE_HTTP_URL"),
        ({"usage_http_ca_file": Path("ca.crt")}, "need GPUYARD_USAGE_HTTP_URL"),
        ({"usage_http_max_attempts": 0}, "usage_http_max_attempts"),
        ({"usage_http_max_attempts": 21}, "usage_http_max_attempts"),
        ({"usage_http_timeout_seconds": 0}, "usage_http_timeout_seconds"),
        ({"usage_http_max_connections": 0}, "usage_http_max_connections"),
    ],
)
def test_bad_usage_http_settings_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**fields)  # type: ignore[arg-type]


def test_a_refused_setting_is_not_quoted_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUYARD_USAGE_HTTP_URL", "http://u:s3cr3t@b.io/")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert "s3cr3t" not in str(refused.value)


def test_no_gpu_exporter_is_identified_by_default() -> None:
    exporter = Settings().gpu_exporter_matchers

    assert exporter.matchers == ()
    assert exporter.trusts_exported_labels is False


def test_gpu_exporter_matchers_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "GPUYARD_GPU_EXPORTER_MATCHERS",
        '{service="nvidia-dcgm-exporter", namespace="gpu-operator"}',
    )

    exporter = Settings().gpu_exporter_matchers

    assert exporter.matchers == (("namespace", "gpu-operator"), ("service", "nvidia-dcgm-exporter"))
    assert exporter.trusts_exported_labels is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('job=~"dcgm.*"', "only = is accepted"),
        ('exported_namespace="team-a"', "any target can set them"),
        ('{job="dcgm"', "unbalanced braces"),
        ('job="dcgm" or vector(1)', "expected , at"),
    ],
)
def test_bad_gpu_exporter_matchers_stop_the_start(
    monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    monkeypatch.setenv("GPUYARD_GPU_EXPORTER_MATCHERS", text)
    with pytest.raises(ValidationError, match=message) as refused:
        Settings()
    assert "gpu_exporter_matchers" in str(refused.value)


def test_tenant_metrics_are_keyed_by_the_target_namespace_label(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().tenant_namespace_label == "namespace"
    # The Prometheus Operator's enforcedNamespaceLabel may have another name.
    monkeypatch.setenv("GPUYARD_TENANT_NAMESPACE_LABEL", "tenant_namespace")
    assert Settings().tenant_namespace_label == "tenant_namespace"


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("exported_namespace", "any target can set"),
        ("__meta_kubernetes_namespace", "never reach a series"),
        ("service", "names the service"),
        ('namespace="a"', "invalid tenant namespace label"),
    ],
)
def test_a_namespace_label_a_target_can_set_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, label: str, message: str
) -> None:
    monkeypatch.setenv("GPUYARD_TENANT_NAMESPACE_LABEL", label)
    with pytest.raises(ValidationError, match=message) as refused:
        Settings()
    assert "tenant_namespace_label" in str(refused.value)
