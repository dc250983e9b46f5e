"""charts/gpuyard rendered by the pinned helm, without a cluster: lint, the objects and their
hardening, the exact RBAC, the values schema, monitoring (checked with promtool), and that
the CRDs and dist/install.yaml are what the generators make of the current sources."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_support import (
    CHART,
    DIST_INSTALL,
    DIST_NAMESPACE,
    RENDER_INSTALL,
    REPO_ROOT,
    Helm,
    documents,
    helm_binary,
    kinds_and_names,
    of_kind,
    one,
)
from gpuyard import __version__
from gpuyard.api.crd import crd_files
from gpuyard.cli import build_parser
from gpuyard.config import Settings

RULES_SNAPSHOT = REPO_ROOT / "tests" / "data" / "clusterrole-rules.yaml"
CLUSTER_SCOPED_KINDS = {
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}
POLICIES_OF_RELEASE_GPUYARD = {
    (kind, f"gpuyard-{name}")
    for kind in ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
    for name in ("pods", "workloads", "deployment-scale")
}
OPERATOR_POLICIES_OF_RELEASE_GPUYARD = {
    (kind, f"gpuyard-{name}")
    for kind in ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
    for name in ("operator-children", "operator-finalizers")
}
HOOK = "gpuyard-release-finalizers"
UNINSTALL_HOOK = {
    (kind, HOOK)
    for kind in (
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Job",
    )
}
ALL_FEATURES: dict[str, Any] = {
    "serviceMonitor": {"enabled": True},
    "podMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "operator": {"prometheusUrl": "http://prometheus.monitoring.svc:9090"},
    "usage": {
        "http": {
            "url": "https://openmeter.example.com/api/v1/events",
            "headersSecret": {"name": "openmeter-token"},
            "caConfigMap": {"name": "openmeter-ca"},
        },
        "ledger": {"enabled": True},
    },
    # A ledger file takes one operator pod.
    "replicaCount": 1,
}


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    binary = helm_binary()
    if binary is None:
        pytest.skip("helm is not built yet: run `make binaries`")
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="module")
def default_objects(helm: Helm) -> list[dict[str, Any]]:
    return helm.template()


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [obj] = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    return obj


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = one(objects, "Deployment")["spec"]["template"]["spec"][
        "containers"
    ]
    [container] = containers
    return container


# --- lint and the objects ------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, ALL_FEATURES], ids=["defaults", "all-features"])
def test_helm_lint_strict_passes(helm: Helm, values: dict[str, Any] | None) -> None:
    args = ["lint", "--strict", str(CHART)]
    if values is not None:
        args += ["-f", helm.values_file(values)]

    result = helm.run(*args, check=False)

    assert result.returncode == 0, result.stdout + result.stderr


def test_default_render_has_exactly_the_operators_objects(
    default_objects: list[dict[str, Any]],
) -> None:
    assert kinds_and_names(default_objects) == {
        ("CustomResourceDefinition", "aiservices.gpuyard.io"),
        ("CustomResourceDefinition", "gpupools.gpuyard.io"),
        ("ServiceAccount", "gpuyard"),
        ("ClusterRole", "gpuyard"),
        ("ClusterRoleBinding", "gpuyard"),
        ("Service", "gpuyard-metrics"),
        ("Deployment", "gpuyard"),
        ("Role", "gpuyard-leader-election"),
        ("RoleBinding", "gpuyard-leader-election"),
        ("PodDisruptionBudget", "gpuyard"),
        ("Pod", "gpuyard-test-metrics"),
        *POLICIES_OF_RELEASE_GPUYARD,
        *OPERATOR_POLICIES_OF_RELEASE_GPUYARD,
        *UNINSTALL_HOOK,
    }
    for obj in default_objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "gpuyard", obj["kind"]
        assert labels["app.kubernetes.io/instance"] == "gpuyard", obj["kind"]
        assert labels["app.kubernetes.io/version"] == "0.1.0", obj["kind"]
        if obj["kind"] not in CLUSTER_SCOPED_KINDS:
            assert obj["metadata"]["namespace"] == DIST_NAMESPACE, obj["kind"]


def test_names_follow_the_release(helm: Helm) -> None:
    objects = helm.template(None, "--no-hooks", release="prod")

    assert {name for _, name in kinds_and_names(objects)} >= {
        "prod-gpuyard",
        "prod-gpuyard-metrics",
    }
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == "prod-gpuyard"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "prod-gpuyard", "namespace": DIST_NAMESPACE}
    ]


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())

    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == "0.1.0"
    assert chart["kubeVersion"] == ">=1.30.0-0"
    assert chart["appVersion"] == __version__


def test_deployment_runs_two_hardened_replicas(default_objects: list[dict[str, Any]]) -> None:
    deployment = one(default_objects, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = operator_container(default_objects)

    # Two replicas under a Lease: a new pod is up before an old one goes, and they prefer
    # different nodes.
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    [term] = spec["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert pod["serviceAccountName"] == "gpuyard"
    assert pod["enableServiceLinks"] is False
    assert container["image"] == "ghcr.io/gpuyard/gpuyard:0.1.0"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "metrics": 8080,
        "health": 8081,
    }
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert container["resources"]["limits"] == {"memory": "512Mi"}
    # Pod Security "restricted", field by field.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["fsGroup"] == 65532  # owns the mounted Secret and ledger
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 65532
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}
    ]
    assert "hostNetwork" not in pod
    assert "nodeSelector" not in pod  # the tainted GPU nodes keep it off by themselves


def test_operator_settings_come_from_values_and_parse(
    helm: Helm, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {
        "operator": {
            "clusterId": "prod-eu-1",
            "prometheusUrl": "http://prometheus.monitoring.svc:9090",
            "autoscaleIntervalSeconds": 2.5,
            "resyncSeconds": 120,
            "workers": 16,
            "logLevel": "DEBUG",
            "metricsPort": 9100,
            "healthPort": 9101,
        },
        "extraEnv": [{"name": "EXTRA", "value": "1"}],
    }
    objects = helm.template(values)
    container = operator_container(objects)
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}

    assert env.pop("EXTRA") == "1"
    # Every variable names a setting: a typo would be ignored by the operator, not refused.
    assert set(env) <= {f"GPUYARD_{name.upper()}" for name in Settings.model_fields}
    # The developer's shell may export GPUYARD_* for the local cluster: start from none.
    for name in [name for name in os.environ if name.startswith("GPUYARD_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.cluster_id == "prod-eu-1"
    assert settings.prometheus_url == "http://prometheus.monitoring.svc:9090"
    assert settings.autoscale_interval == 2.5
    assert settings.resync_seconds == 120
    assert settings.workers == 16
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")
    assert (settings.metrics_port, settings.health_port) == (9100, 9101)
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "metrics": 9100,
        "health": 9101,
    }


def test_default_settings_leave_prometheus_unset(default_objects: list[dict[str, Any]]) -> None:
    names = {item["name"] for item in operator_container(default_objects)["env"]}

    assert "GPUYARD_PROMETHEUS_URL" not in names
    assert "GPUYARD_LOG_FORMAT" in names


def test_metrics_service_selects_only_the_operator(default_objects: list[dict[str, Any]]) -> None:
    service = one(default_objects, "Service")
    pod_labels = one(default_objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    test_pod_labels = one(default_objects, "Pod")["metadata"]["labels"]

    selector = service["spec"]["selector"]
    assert selector.items() <= pod_labels.items()
    assert not selector.items() <= test_pod_labels.items()
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]


def test_test_pod_is_a_restricted_helm_test_hook(default_objects: list[dict[str, Any]]) -> None:
    pod = one(default_objects, "Pod")
    [container] = pod["spec"]["containers"]

    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert container["image"] == operator_container(default_objects)["image"]
    assert container["securityContext"] == operator_container(default_objects)["securityContext"]
    assert "http://gpuyard-metrics.gpuyard-system.svc:8080/metrics" in container["command"][-1]
    # The script it runs is valid Python (a typo would only show at `helm test`).
    compile(container["command"][-1], "test-connection", "exec")


def hook_objects(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The uninstall hook's objects by kind."""
    return {obj["kind"]: obj for obj in objects if obj["metadata"]["name"] == HOOK}


def test_uninstall_hook_objects_exist_before_the_job_and_go_after_it(
    default_objects: list[dict[str, Any]],
) -> None:
    hook = hook_objects(default_objects)

    assert set(hook) == {kind for kind, _ in UNINSTALL_HOOK}
    weights = {}
    for kind, obj in hook.items():
        annotations = obj["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-delete", kind
        # Deleted once the Job succeeded (all hooks of the event are done by then), and
        # replaced by the next attempt after a failure.
        assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
        assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "release-finalizers"
        weights[kind] = int(annotations["helm.sh/hook-weight"])
    # Helm creates hooks lowest weight first: the account, then its roles, then the
    # bindings, then the Job.
    assert weights["ServiceAccount"] < weights["ClusterRole"] == weights["Role"]
    assert weights["Role"] < weights["ClusterRoleBinding"] == weights["RoleBinding"]
    assert weights["RoleBinding"] < weights["Job"]


def test_uninstall_hook_job_stops_this_release_and_is_hardened(
    default_objects: list[dict[str, Any]],
) -> None:
    job = hook_objects(default_objects)["Job"]
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    operator = one(default_objects, "Deployment")
    operator_pod = operator["spec"]["template"]["spec"]

    assert pod["serviceAccountName"] == HOOK
    assert pod["automountServiceAccountToken"] is True
    assert pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 0
    assert container["image"] == operator_container(default_objects)["image"]
    assert container["command"] == ["gpuyard", "release-finalizers"]
    args = build_parser().parse_args([*container["command"][1:], *container["args"]])
    meta = operator["metadata"]
    assert args.stop_deployment == (meta["namespace"], meta["name"])
    assert args.billing_timeout == 90
    # The operator's own grace period, and time for its pod object to go.
    assert args.stop_timeout == operator_pod["terminationGracePeriodSeconds"] + 30
    assert job["spec"]["activeDeadlineSeconds"] == 90 + 60 + 120
    # The same hardening as the operator: Pod Security "restricted", read-only root.
    assert pod["securityContext"] == operator_pod["securityContext"]
    assert container["securityContext"] == operator_container(default_objects)["securityContext"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert container["resources"] == {
        "requests": {"cpu": "50m", "memory": "128Mi"},
        "limits": {"memory": "256Mi"},
    }
    # The metrics Service never sends traffic to it.
    service_selector = one(default_objects, "Service")["spec"]["selector"]
    assert not service_selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()


def test_uninstall_hook_may_touch_finalizers_and_this_releases_deployment_only(
    default_objects: list[dict[str, Any]],
) -> None:
    hook = hook_objects(default_objects)
    subject = {"kind": "ServiceAccount", "name": HOOK, "namespace": DIST_NAMESPACE}

    assert hook["ClusterRole"]["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "patch"]},
        {"apiGroups": ["gpuyard.io"], "resources": ["gpupools"], "verbs": ["get", "list", "patch"]},
    ]
    assert hook["Role"]["metadata"]["namespace"] == DIST_NAMESPACE
    assert hook["Role"]["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": ["gpuyard"],
            "verbs": ["get"],
        },
        {
            "apiGroups": ["apps"],
            "resources": ["deployments/scale"],
            "resourceNames": ["gpuyard"],
            "verbs": ["patch"],
        },
    ]
    for binding, role in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        assert hook[binding]["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": role,
            "name": HOOK,
        }
        assert hook[binding]["subjects"] == [subject]


def test_uninstall_hook_follows_its_values(helm: Helm) -> None:
    assert not hook_objects(helm.template({"uninstall": {"releaseFinalizers": False}}))
    # No RBAC from the chart, no hook: it cannot act without its own permissions.
    assert not hook_objects(helm.template({"rbac": {"create": False}}))

    objects = helm.template(
        {"uninstall": {"billingTimeoutSeconds": 10}, "terminationGracePeriodSeconds": 45},
        release="prod",
        namespace="gpu",
    )
    job = next(
        o
        for o in of_kind(objects, "Job")
        if o["metadata"]["name"] == "prod-gpuyard-release-finalizers"
    )
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == [
        "--stop-deployment",
        "gpu/prod-gpuyard",
        "--billing-timeout",
        "10",
        "--stop-timeout",
        "75",
    ]
    assert job["spec"]["activeDeadlineSeconds"] == 10 + 75 + 120


def test_service_account_and_rbac_can_be_left_to_the_user(helm: Helm) -> None:
    objects = helm.template(
        {"serviceAccount": {"create": False, "name": "platform-sa"}, "rbac": {"create": False}}
    )

    kinds = {kind for kind, _ in kinds_and_names(objects)}
    assert kinds.isdisjoint({"ServiceAccount", "ClusterRole", "ClusterRoleBinding"})
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "platform-sa"


def test_image_digest_wins_over_tag(helm: Helm) -> None:
    digest = "sha256:" + "a" * 64
    objects = helm.template({"image": {"tag": "0.2.0", "digest": digest}})

    assert operator_container(objects)["image"] == f"ghcr.io/gpuyard/gpuyard@{digest}"


# --- usage sinks ---------------------------------------------------------------------------

HEADERS_FILE = "/etc/gpuyard/usage-http-headers/headers"
CA_FILE = "/etc/gpuyard/usage-http-ca/ca.crt"
LEDGER_FILE = "/var/lib/gpuyard/usage.jsonl"


def operator_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {
        item["name"]: item["value"]
        for item in operator_container(objects)["env"]
        if "value" in item
    }


def pod_volumes(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    return {volume.pop("name"): volume for volume in pod["volumes"]}


def container_mounts(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {mount.pop("name"): mount for mount in operator_container(objects)["volumeMounts"]}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    # The developer's shell may export GPUYARD_* for the local cluster: start from none.
    for name in [name for name in os.environ if name.startswith("GPUYARD_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_default_gpu_exporter_is_the_gpu_operators(
    default_objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from(operator_env(default_objects), monkeypatch)

    # The GPU Operator's ServiceMonitor scrapes Service nvidia-dcgm-exporter in its own
    # namespace: target labels no exporter in a tenant's namespace can take.
    assert settings.gpu_exporter_matchers.matchers == (
        ("namespace", "gpu-operator"),
        ("service", "nvidia-dcgm-exporter"),
    )


def test_gpu_exporter_matchers_reach_the_operator_intact(
    helm: Helm, monkeypatch: pytest.MonkeyPatch
) -> None:
    hostile = 'dcgm"} or vector(1) # \\ é'
    objects = helm.template({"operator": {"gpuExporterMatchers": f"job={json.dumps(hostile)}"}})
    settings = settings_from(operator_env(objects), monkeypatch)
    assert settings.gpu_exporter_matchers.matchers == (("job", hostile),)

    unset = helm.template({"operator": {"gpuExporterMatchers": ""}})
    assert "GPUYARD_GPU_EXPORTER_MATCHERS" not in operator_env(unset)
    assert settings_from(operator_env(unset), monkeypatch).gpu_exporter_matchers.matchers == ()


def test_tenant_namespace_label_reaches_the_operator(
    default_objects: list[dict[str, Any]], helm: Helm, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert settings_from(operator_env(default_objects), monkeypatch).tenant_namespace_label == (
        "namespace"
    )
    objects = helm.template({"operator": {"tenantNamespaceLabel": "tenant_namespace"}})
    settings = settings_from(operator_env(objects), monkeypatch)
    assert settings.tenant_namespace_label == "tenant_namespace"


def test_default_usage_goes_to_stdout_only(default_objects: list[dict[str, Any]]) -> None:
    env = operator_env(default_objects)

    assert env["GPUYARD_USAGE_STDOUT"] == "true"
    assert not {name for name in env if name.startswith(("GPUYARD_USAGE_HTTP", "GPUYARD_USAGE_L"))}
    assert set(pod_volumes(default_objects)) == {"tmp"}
    assert not of_kind(default_objects, "PersistentVolumeClaim")


def test_http_sink_values_become_settings_files_and_read_only_mounts(
    helm: Helm, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {
        "usage": {
            "stdout": False,
            "http": {
                "url": "https://openmeter.example.com/api/v1/events",
                "headersSecret": {"name": "openmeter-token", "key": "http-headers"},
                "caSecret": {"name": "openmeter-ca"},
                "maxAttempts": 3,
                "timeoutSeconds": 2.5,
                "maxConnections": 4,
            },
        }
    }
    objects = helm.template(values)
    env = operator_env(objects)

    settings = settings_from(env, monkeypatch)
    assert settings.usage_stdout is False
    assert settings.usage_http_url == "https://openmeter.example.com/api/v1/events"
    assert settings.usage_http_headers_file == Path(HEADERS_FILE)
    assert settings.usage_http_ca_file == Path(CA_FILE)
    assert settings.usage_http_allow_insecure is False
    assert (settings.usage_http_max_attempts, settings.usage_http_timeout_seconds) == (3, 2.5)
    assert settings.usage_http_max_connections == 4
    assert settings.usage_ledger is None
    volumes = pod_volumes(objects)
    assert volumes["usage-http-headers"] == {
        "secret": {
            "secretName": "openmeter-token",
            "defaultMode": 0o440,
            "items": [{"key": "http-headers", "path": "headers"}],
        }
    }
    assert volumes["usage-http-ca"] == {
        "secret": {"secretName": "openmeter-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    }
    # Whole directories, never subPath: a subPath mount never sees a rotated Secret.
    assert container_mounts(objects) == {
        "tmp": {"mountPath": "/tmp"},
        "usage-http-headers": {"mountPath": str(Path(HEADERS_FILE).parent), "readOnly": True},
        "usage-http-ca": {"mountPath": str(Path(CA_FILE).parent), "readOnly": True},
    }
    assert operator_container(objects)["securityContext"]["readOnlyRootFilesystem"] is True


def test_ca_bundle_from_a_config_map(helm: Helm) -> None:
    values = {
        "usage": {
            "http": {
                "url": "https://openmeter.example.com/api/v1/events",
                "caConfigMap": {"name": "trust-bundle", "key": "bundle.pem"},
            }
        }
    }
    objects = helm.template(values)

    assert pod_volumes(objects)["usage-http-ca"] == {
        "configMap": {"name": "trust-bundle", "items": [{"key": "bundle.pem", "path": "ca.crt"}]}
    }
    assert operator_env(objects)["GPUYARD_USAGE_HTTP_CA_FILE"] == CA_FILE
    assert "GPUYARD_USAGE_HTTP_HEADERS_FILE" not in operator_env(objects)


def test_plain_http_sink_when_allowed(helm: Helm, monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"usage": {"http": {"url": "http://receiver.billing:8080/", "allowInsecure": True}}}
    settings = settings_from(operator_env(helm.template(values)), monkeypatch)

    assert settings.usage_http_url == "http://receiver.billing:8080/"
    assert settings.usage_http_allow_insecure is True


def test_ledger_on_a_kept_persistent_volume_claim(
    helm: Helm, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {
        "replicaCount": 1,
        "usage": {
            "ledger": {"enabled": True, "persistence": {"size": "50Gi", "storageClassName": "ssd"}}
        },
    }
    objects = helm.template(values)

    claim = one(objects, "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "gpuyard-ledger"
    assert claim["metadata"]["namespace"] == DIST_NAMESPACE
    assert claim["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "ssd",
        "resources": {"requests": {"storage": "50Gi"}},
    }
    assert pod_volumes(objects)["usage-ledger"] == {
        "persistentVolumeClaim": {"claimName": "gpuyard-ledger"}
    }
    assert container_mounts(objects)["usage-ledger"] == {"mountPath": str(Path(LEDGER_FILE).parent)}
    assert settings_from(operator_env(objects), monkeypatch).usage_ledger == Path(LEDGER_FILE)
    # No class given: the field is left out, so the cluster's default StorageClass binds.
    default_class = one(
        helm.template({"replicaCount": 1, "usage": {"ledger": {"enabled": True}}}),
        "PersistentVolumeClaim",
    )
    assert "storageClassName" not in default_class["spec"]


def test_ledger_on_an_existing_claim(helm: Helm) -> None:
    values = {
        "replicaCount": 1,
        "usage": {"ledger": {"enabled": True, "persistence": {"existingClaim": "billing"}}},
    }
    objects = helm.template(values)

    assert not of_kind(objects, "PersistentVolumeClaim")
    assert pod_volumes(objects)["usage-ledger"] == {
        "persistentVolumeClaim": {"claimName": "billing"}
    }


def test_postgres_ledger_values_become_the_operators_settings(
    helm: Helm, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {
        "usage": {
            "postgres": {
                "enabled": True,
                "dsnSecret": {"name": "billing-db", "key": "uri"},
                "migrate": False,
            }
        }
    }
    objects = helm.template(values)

    settings = settings_from(operator_env(objects), monkeypatch)
    dsn_file = "/etc/gpuyard/usage-postgres/dsn"
    assert settings.usage_ledger_dsn_file == Path(dsn_file)
    assert settings.usage_ledger_postgres_env is False
    assert settings.usage_ledger_migrate is False
    assert pod_volumes(objects)["usage-postgres-dsn"]["secret"] == {
        "secretName": "billing-db",
        "defaultMode": 0o440,
        "items": [{"key": "uri", "path": "dsn"}],
    }
    # A whole directory, never subPath: a rotated Secret reaches the file the sink re-reads.
    assert container_mounts(objects)["usage-postgres-dsn"] == {
        "mountPath": str(Path(dsn_file).parent),
        "readOnly": True,
    }


def test_postgres_ledger_from_libpq_variables_in_a_secret(
    helm: Helm, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = helm.template({"usage": {"postgres": {"enabled": True, "envSecret": "pg"}}})

    settings = settings_from(operator_env(objects), monkeypatch)
    assert settings.usage_ledger_postgres_env is True
    assert settings.usage_ledger_dsn_file is None
    assert settings.usage_ledger_migrate is True
    assert operator_container(objects)["envFrom"] == [{"secretRef": {"name": "pg"}}]


def test_usage_sinks_need_no_new_permissions(helm: Helm) -> None:
    rules = named(helm.template(ALL_FEATURES), "ClusterRole", "gpuyard")["rules"]

    # The kubelet mounts the Secret and the claim; the operator never reads them by API.
    assert rules == yaml.safe_load(RULES_SNAPSHOT.read_text())


# --- RBAC ----------------------------------------------------------------------------------


def test_clusterrole_equals_the_committed_snapshot(default_objects: list[dict[str, Any]]) -> None:
    rules = named(default_objects, "ClusterRole", "gpuyard")["rules"]

    assert rules == yaml.safe_load(RULES_SNAPSHOT.read_text())


def test_clusterrole_grants_nothing_dangerous(default_objects: list[dict[str, Any]]) -> None:
    forbidden_verbs = {"*", "escalate", "bind", "impersonate", "deletecollection"}
    for rule in named(default_objects, "ClusterRole", "gpuyard")["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
        assert "*" not in rule["apiGroups"], rule
        assert not any("*" in resource for resource in rule["resources"]), rule
        assert not {"secrets", "serviceaccounts/token"} & set(rule["resources"]), rule
        assert not forbidden_verbs & set(rule["verbs"]), rule
        assert rule["resources"] != ["customresourcedefinitions"] or set(rule["verbs"]) <= {
            "get",
            "list",
            "watch",
        }


def test_clusterrole_rules_each_carry_a_reason() -> None:
    # Every rule in the template is preceded by a comment saying why gpuyard needs it.
    lines = (CHART / "templates" / "clusterrole.yaml").read_text().splitlines()
    starts = [index for index, line in enumerate(lines) if line.strip().startswith("- apiGroups")]
    assert len(starts) == len(yaml.safe_load(RULES_SNAPSHOT.read_text()))
    for index in starts:
        assert lines[index - 1].strip().startswith("#"), lines[index]


# --- admission policies --------------------------------------------------------------------

CONTROLLER_MANAGER = "system:kube-controller-manager"
REPLICASET_CONTROLLER = "system:serviceaccount:kube-system:replicaset-controller"
DEPLOYMENT_CONTROLLER = "system:serviceaccount:kube-system:deployment-controller"


def is_operator_policy(name: str) -> bool:
    """Whether a policy (or binding) of the chart limits the operator itself
    (templates/operator-policy.yaml) rather than guarding gpuyard's marks."""
    return "-operator-" in name


def policies(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The policies that guard gpuyard's marks (templates/admissionpolicy.yaml)."""
    return {
        policy["metadata"]["name"]: policy
        for policy in of_kind(objects, "ValidatingAdmissionPolicy")
        if not is_operator_policy(policy["metadata"]["name"])
    }


def operator_policies(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        policy["metadata"]["name"]: policy
        for policy in of_kind(objects, "ValidatingAdmissionPolicy")
        if is_operator_policy(policy["metadata"]["name"])
    }


def exempt_users(policy: dict[str, Any]) -> set[str]:
    """The user names a policy's match condition lets through (a CEL list literal)."""
    [condition] = [
        condition
        for condition in policy["spec"]["matchConditions"]
        if "request.userInfo.username" in condition["expression"]
    ]
    match = re.fullmatch(r"!\(request\.userInfo\.username in \[(.*)\]\)", condition["expression"])
    assert match, condition
    return set(re.findall(r"'([^']*)'", match.group(1)))


def test_admission_policies_deny_through_their_bindings(
    default_objects: list[dict[str, Any]],
) -> None:
    found = policies(default_objects)
    bindings = [
        binding
        for binding in of_kind(default_objects, "ValidatingAdmissionPolicyBinding")
        if not is_operator_policy(binding["metadata"]["name"])
    ]

    assert set(found) == {"gpuyard-pods", "gpuyard-workloads", "gpuyard-deployment-scale"}
    assert sorted(binding["spec"]["policyName"] for binding in bindings) == sorted(found)
    for obj in [*found.values(), *bindings]:
        assert obj["apiVersion"] == "admissionregistration.k8s.io/v1"
    for binding in bindings:
        # Deny, in every namespace, with no parameters.
        assert binding["spec"] == {
            "policyName": binding["metadata"]["name"],
            "validationActions": ["Deny"],
        }
    for policy in found.values():
        assert policy["spec"]["failurePolicy"] == "Fail"
        for validation in policy["spec"]["validations"]:
            assert validation["message"], validation
            # Each refusal says what to do instead.
            assert re.search(r"instead|leave", validation["messageExpression"]), validation
            assert validation["reason"] == "Forbidden"


def test_admission_policies_match_only_what_they_guard(
    default_objects: list[dict[str, Any]],
) -> None:
    # No subresource of pods (binding, status, eviction, ...) and no DELETE: the scheduler,
    # the kubelet (kwok here), evictions, the garbage collector's and a namespace's
    # deletions never meet the policies.
    rules = {
        name: policy["spec"]["matchConstraints"]["resourceRules"]
        for name, policy in policies(default_objects).items()
    }

    def rule(group: str, operations: list[str], resources: list[str]) -> dict[str, Any]:
        return {
            "apiGroups": [group],
            "apiVersions": ["v1"],
            "operations": operations,
            "resources": resources,
        }

    assert rules == {
        "gpuyard-pods": [rule("", ["CREATE", "UPDATE"], ["pods"])],
        "gpuyard-workloads": [rule("apps", ["CREATE", "UPDATE"], ["deployments", "replicasets"])],
        "gpuyard-deployment-scale": [rule("apps", ["UPDATE"], ["deployments/scale"])],
    }


def test_admission_policies_can_be_turned_off(helm: Helm) -> None:
    objects = helm.template(
        {"admissionPolicy": {"enabled": False}, "operatorAdmissionPolicy": {"enabled": False}}
    )

    kinds = {kind for kind, _ in kinds_and_names(objects)}
    assert kinds.isdisjoint({"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"})
    assert of_kind(objects, "Deployment")


def test_the_marks_policies_and_the_operators_policies_are_turned_off_apart(helm: Helm) -> None:
    without_marks = kinds_and_names(helm.template({"admissionPolicy": {"enabled": False}}))
    without_limits = kinds_and_names(helm.template({"operatorAdmissionPolicy": {"enabled": False}}))

    assert without_marks >= OPERATOR_POLICIES_OF_RELEASE_GPUYARD
    assert not POLICIES_OF_RELEASE_GPUYARD & without_marks
    assert without_limits >= POLICIES_OF_RELEASE_GPUYARD
    assert not OPERATOR_POLICIES_OF_RELEASE_GPUYARD & without_limits


@pytest.mark.parametrize(
    ("values", "account"),
    [
        ({}, "prod-gpuyard"),
        ({"serviceAccount": {"name": "gpu-operator"}}, "gpu-operator"),
        ({"serviceAccount": {"create": False, "name": "platform-sa"}}, "platform-sa"),
    ],
)
def test_admission_policies_exempt_the_operator_and_the_controllers_that_copy_its_templates(
    helm: Helm, values: dict[str, Any], account: str
) -> None:
    objects = helm.template(values, release="prod", namespace="ml")
    operator = f"system:serviceaccount:ml:{account}"
    # The uninstall hook strips the metering finalizer once the operator has stopped.
    hook = "system:serviceaccount:ml:prod-gpuyard-release-finalizers"

    assert {name: exempt_users(policy) for name, policy in policies(objects).items()} == {
        "prod-gpuyard-pods": {operator, hook, REPLICASET_CONTROLLER, CONTROLLER_MANAGER},
        "prod-gpuyard-workloads": {operator, DEPLOYMENT_CONTROLLER, CONTROLLER_MANAGER},
        "prod-gpuyard-deployment-scale": {operator},
    }
    # ... which is the account the operator's pod runs as.
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == account


def test_admission_policies_exempt_the_users_the_values_add(helm: Helm) -> None:
    job = "system:serviceaccount:platform:release-job"
    objects = helm.template({"admissionPolicy": {"exemptUsers": [job]}})

    for name, policy in policies(objects).items():
        assert job in exempt_users(policy), name


@pytest.mark.parametrize(
    ("values", "account"),
    [
        ({}, "prod-gpuyard"),
        ({"serviceAccount": {"name": "gpu-operator"}}, "gpu-operator"),
        ({"serviceAccount": {"create": False, "name": "platform-sa"}}, "platform-sa"),
    ],
)
def test_operator_policies_bind_the_operators_account_only(
    helm: Helm, values: dict[str, Any], account: str
) -> None:
    objects = helm.template(values, release="prod", namespace="ml")
    found = operator_policies(objects)
    bindings = [
        binding
        for binding in of_kind(objects, "ValidatingAdmissionPolicyBinding")
        if is_operator_policy(binding["metadata"]["name"])
    ]
    # The account the operator's pod runs as, and no one else: tenants, controllers and
    # the uninstall hook are not limited by these policies.
    condition = f"request.userInfo.username == 'system:serviceaccount:ml:{account}'"

    assert set(found) == {"prod-gpuyard-operator-children", "prod-gpuyard-operator-finalizers"}
    for policy in found.values():
        assert policy["spec"]["failurePolicy"] == "Fail"
        assert policy["spec"]["matchConditions"] == [
            {"name": "the-operator", "expression": condition}
        ]
        for validation in policy["spec"]["validations"]:
            assert validation["message"], validation
            assert "leave" in validation["messageExpression"], validation
            assert validation["reason"] == "Forbidden"
    assert sorted(binding["spec"]["policyName"] for binding in bindings) == sorted(found)
    for binding in bindings:
        assert binding["spec"] == {
            "policyName": binding["metadata"]["name"],
            "validationActions": ["Deny"],
        }
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == account


def test_operator_policies_match_every_write_the_clusterrole_allows_on_shared_kinds(
    default_objects: list[dict[str, Any]],
) -> None:
    # Deployments, Services, PodDisruptionBudgets, pods and GPUPools: the kinds whose
    # writes RBAC cannot narrow to gpuyard's own objects. Status subresources and Events
    # are gpuyard's output.
    rules = {
        name: policy["spec"]["matchConstraints"]["resourceRules"]
        for name, policy in operator_policies(default_objects).items()
    }

    assert rules == {
        "gpuyard-operator-children": [
            {
                "apiGroups": ["apps"],
                "apiVersions": ["v1"],
                "operations": ["CREATE", "UPDATE", "DELETE"],
                "resources": ["deployments"],
            },
            {
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE", "UPDATE", "DELETE"],
                "resources": ["services"],
            },
            {
                "apiGroups": ["policy"],
                "apiVersions": ["v1"],
                "operations": ["CREATE", "UPDATE", "DELETE"],
                "resources": ["poddisruptionbudgets"],
            },
            {
                "apiGroups": ["resource.k8s.io"],
                "apiVersions": ["v1"],
                "operations": ["CREATE", "UPDATE", "DELETE"],
                "resources": ["resourceclaimtemplates"],
            },
        ],
        "gpuyard-operator-finalizers": [
            {
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["UPDATE"],
                "resources": ["pods"],
            },
            {
                "apiGroups": ["gpuyard.io"],
                "apiVersions": ["v1alpha1"],
                "operations": ["UPDATE"],
                "resources": ["gpupools"],
            },
        ],
    }
    cluster_role = named(default_objects, "ClusterRole", "gpuyard")
    writable = {
        resource
        for rule in cluster_role["rules"]
        if {"create", "update", "patch", "delete"} & set(rule["verbs"])
        for resource in rule["resources"]
    }
    matched = {
        resource for kind_rules in rules.values() for rule in kind_rules
        for resource in rule["resources"]
    }  # fmt: skip
    assert writable - matched == {"aiservices/status", "gpupools/status", "events"}


# --- values and their schema ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": "two"}, "at '/replicaCount': got string, want integer"),
        ({"replicaCount": -1}, "at '/replicaCount': minimum: got -1, want 0"),
        (
            {"leaderElection": {"renewDeadlineSeconds": 20}},
            "renewDeadlineSeconds must be shorter than leaseDurationSeconds",
        ),
        (
            {"usage": {"ledger": {"enabled": True}}},
            "usage.ledger (a file on a ReadWriteOnce claim) takes one operator pod",
        ),
        (
            {"usage": {"postgres": {"enabled": True}}},
            "usage.postgres.enabled needs exactly one of usage.postgres.dsnSecret.name and",
        ),
        (
            {
                "usage": {
                    "postgres": {"enabled": True, "envSecret": "pg", "dsnSecret": {"name": "d"}}
                }
            },
            "usage.postgres.enabled needs exactly one of usage.postgres.dsnSecret.name and",
        ),
        (
            {"usage": {"postgres": {"envSecret": "pg"}}},
            "take effect only with usage.postgres.enabled=true",
        ),
        ({"usage": {"postgres": {"envSecret": "Not_A_Name"}}}, "at '/usage/postgres/envSecret'"),
        ({"replicaCas": 1}, "additional properties 'replicaCas' not allowed"),
        ({"operator": {"logLevel": "debug"}}, "at '/operator/logLevel': value must be one of"),
        ({"operator": {"workers": 0}}, "at '/operator/workers': minimum: got 0, want 1"),
        ({"operator": {"prometheusUrl": "prometheus:9090"}}, "at '/operator/prometheusUrl'"),
        ({"operator": {"clusterId": ""}}, "at '/operator/clusterId'"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy': value must be one of"),
        ({"image": {"digest": "latest"}}, "at '/image/digest'"),
        ({"serviceMonitor": {"interval": "30 seconds"}}, "at '/serviceMonitor/interval'"),
        ({"resources": {"limits": {"memory": "lots"}}}, "at '/resources/limits/memory'"),
        ({"networkPolicy": {"apiServer": {"ports": []}}}, "at '/networkPolicy/apiServer/ports'"),
        ({"prometheusRule": {"poolNearlyFullPercent": 150}}, "poolNearlyFullPercent"),
        ({"admissionPolicy": {"enabled": "yes"}}, "at '/admissionPolicy/enabled'"),
        ({"admissionPolicy": {"exemptUsers": ["o'brien"]}}, "at '/admissionPolicy/exemptUsers/0'"),
        ({"operatorAdmissionPolicy": {"enabled": "no"}}, "at '/operatorAdmissionPolicy/enabled'"),
        ({"uninstall": {"billingTimeoutSeconds": -1}}, "at '/uninstall/billingTimeoutSeconds'"),
        ({"uninstall": {"releaseFinalizer": True}}, "'releaseFinalizer' not allowed"),
        (
            {"operator": {"metricsPort": 9000, "healthPort": 9000}},
            "operator.metricsPort and operator.healthPort must differ",
        ),
        (
            {"usage": {"http": {"url": "http://receiver.billing/"}}},
            "usage.http.url is http://, so usage records and headers would cross the network "
            "unencrypted: use https://, or set usage.http.allowInsecure=true",
        ),
        (
            {"usage": {"http": {"url": "https://token:x@receiver.billing/"}}},
            "at '/usage/http/url'",
        ),
        ({"usage": {"http": {"url": "receiver.billing"}}}, "at '/usage/http/url'"),
        (
            {"usage": {"http": {"headersSecret": {"name": "token"}}}},
            "usage.http.headersSecret, caConfigMap and caSecret need usage.http.url",
        ),
        (
            {
                "usage": {
                    "http": {
                        "url": "https://receiver.billing/",
                        "caConfigMap": {"name": "a"},
                        "caSecret": {"name": "b"},
                    }
                }
            },
            "set usage.http.caConfigMap or usage.http.caSecret, not both",
        ),
        (
            {
                "usage": {
                    "http": {
                        "url": "http://receiver.billing/",
                        "allowInsecure": True,
                        "caSecret": {"name": "b"},
                    }
                }
            },
            "a CA bundle (usage.http.caConfigMap, caSecret) needs an https:// usage.http.url",
        ),
        ({"usage": {"http": {"token": "x"}}}, "additional properties 'token' not allowed"),
        ({"usage": {"http": {"maxAttempts": 0}}}, "at '/usage/http/maxAttempts'"),
        ({"usage": {"http": {"timeoutSeconds": 0}}}, "at '/usage/http/timeoutSeconds'"),
        ({"usage": {"http": {"headersSecret": {"key": ""}}}}, "at '/usage/http/headersSecret/key'"),
        ({"usage": {"ledger": {"persistence": {"size": "big"}}}}, "persistence/size"),
    ],
)
def test_wrong_values_fail_with_a_readable_message(
    helm: Helm, values: dict[str, Any], message: str
) -> None:
    result = helm.template_text(values, check=False)

    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_values_as_a_parent_chart_passes_them_are_accepted(helm: Helm) -> None:
    # Helm hands every subchart the parent's `global` values; a strict schema must allow it.
    objects = helm.template({"global": {"imageRegistry": "mirror.example.com"}})

    assert of_kind(objects, "Deployment")


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return schema


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].removeprefix("#/definitions/")]
    return node


def _strict_objects(
    schema: dict[str, Any], node: dict[str, Any], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    node = _resolve(schema, node)
    if "properties" in node:
        assert node.get("additionalProperties") is False, f"{'.'.join(path)} is not strict"
        yield path, node
        for name, child in node["properties"].items():
            yield from _strict_objects(schema, child, (*path, name))


def test_every_strict_schema_object_has_its_keys_in_values_yaml() -> None:
    schema = _schema()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path, node in _strict_objects(schema, schema):
        current = values
        for name in path:
            current = current[name]
        declared = set(node["properties"]) - {"global"}
        assert declared == set(current), (path, declared ^ set(current))


def test_every_value_is_documented_by_a_comment_that_starts_with_its_name() -> None:
    schema = _schema()
    documented_parents = {path for path, _ in _strict_objects(schema, schema)}
    stack: list[tuple[int, str]] = []
    comment: list[str] = []  # the comment block right above the current line
    undocumented = []
    for line in (CHART / "values.yaml").read_text().splitlines():
        if line.strip().startswith("#"):
            comment.append(line.strip())
            continue
        match = re.match(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):", line)
        if match:
            indent, key = len(match.group(1)), match.group(2)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            parent = tuple(name for _, name in stack)
            if parent in documented_parents and not (
                comment and re.match(rf"# {key}\b", comment[0])
            ):
                undocumented.append(".".join((*parent, key)))
            stack.append((indent, key))
        comment = []
    assert undocumented == []


# --- CRDs ----------------------------------------------------------------------------------


def test_chart_crd_files_are_what_make_crds_writes() -> None:
    chart_files = {path.name: path.read_text() for path in (CHART / "files" / "crds").iterdir()}
    repo_files = {path.name: path.read_text() for path in (REPO_ROOT / "crds").glob("*.yaml")}

    assert chart_files == repo_files, "run `make crds` (it writes both copies)"
    assert chart_files == crd_files(), "run `make crds`: the models changed"


def test_rendered_crds_equal_crds_dir_plus_helm_metadata(
    default_objects: list[dict[str, Any]],
) -> None:
    rendered = {
        crd["metadata"]["name"]: crd for crd in of_kind(default_objects, "CustomResourceDefinition")
    }
    expected = {}
    for path in (REPO_ROOT / "crds").glob("*.yaml"):
        [crd] = documents(path.read_text())
        expected[crd["metadata"]["name"]] = crd

    assert rendered.keys() == expected.keys()
    for name, rendered_crd in rendered.items():
        crd = copy.deepcopy(rendered_crd)
        metadata = crd["metadata"]
        assert metadata.pop("annotations") == {"helm.sh/resource-policy": "keep"}
        assert metadata.pop("labels")["app.kubernetes.io/part-of"] == "gpuyard"
        # Equal to the last digit: the files are inserted as text, never parsed and dumped.
        assert crd == expected[name], name


def test_crds_can_be_left_out_or_given_annotations(helm: Helm) -> None:
    assert not of_kind(helm.template({"crds": {"install": False}}), "CustomResourceDefinition")
    # "$1" would be expanded by a regexp replacement; the text must arrive as given.
    annotations = {"argocd.argoproj.io/sync-options": "Prune=false", "example.com/note": "$1"}
    objects = helm.template({"crds": {"keep": False, "annotations": annotations}})
    for crd in of_kind(objects, "CustomResourceDefinition"):
        assert crd["metadata"]["annotations"] == annotations


# --- dist/install.yaml ---------------------------------------------------------------------


def test_dist_install_yaml_is_a_fresh_render(helm: Helm, tmp_path: Path) -> None:
    fresh = tmp_path / "install.yaml"

    subprocess.run(
        ["bash", str(RENDER_INSTALL), str(fresh)],
        env={**helm.env, "HELM": str(helm.binary)},
        check=True,
        capture_output=True,
    )

    assert fresh.read_text() == DIST_INSTALL.read_text(), "run `make dist`"


def test_dist_install_yaml_is_the_chart_in_a_restricted_namespace(helm: Helm) -> None:
    objects = documents(DIST_INSTALL.read_text())
    namespace = objects[0]

    assert namespace["kind"] == "Namespace"
    assert namespace["metadata"]["name"] == DIST_NAMESPACE
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # Without hooks: `kubectl apply` would run the pre-delete Job at install time.
    chart_objects = helm.template(None, "--no-hooks")
    assert objects[1:] == chart_objects
    assert not [obj for obj in objects if "helm.sh/hook" in obj["metadata"].get("annotations", {})]


# --- monitoring ----------------------------------------------------------------------------


def test_monitoring_objects_are_off_by_default(default_objects: list[dict[str, Any]]) -> None:
    kinds = {kind for kind, _ in kinds_and_names(default_objects)}

    assert kinds.isdisjoint({"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"})
    assert "NetworkPolicy" not in kinds


def test_monitors_scrape_the_metrics_port(helm: Helm) -> None:
    objects = helm.template(ALL_FEATURES)
    service = one(objects, "Service")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]

    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    pod_monitor = one(objects, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed")
    return path


def _rule_groups(helm: Helm) -> dict[str, Any]:
    rule = one(helm.template({"prometheusRule": {"enabled": True}}), "PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def test_alert_rules_pass_promtool_check(helm: Helm, promtool: str, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(_rule_groups(helm)))

    result = subprocess.run(
        [promtool, "check", "rules", str(rules)], check=False, capture_output=True, text=True
    )

    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {rule["alert"] for rule in _rule_groups(helm)["groups"][0]["rules"]}
    assert alerts == {
        "GpuyardOperatorDown",
        "GpuyardNoLeader",
        "GpuyardAutoscalerStale",
        "GpuyardMeteringLag",
        "GpuyardUsageSinkFailing",
        "GpuyardPoolNearlyFull",
        "GpuyardReconcileErrors",
    }


def test_alerts_fire_on_the_series_the_operator_exports(
    helm: Helm, promtool: str, tmp_path: Path
) -> None:
    # promtool compares annotations too; they are templates checked by `check rules`, so the
    # behaviour test leaves them out.
    groups = _rule_groups(helm)
    for rule in groups["groups"][0]["rules"]:
        rule.pop("annotations")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    target = 'job="gpuyard-metrics", namespace="gpuyard-system"'

    def series(name: str, labels: str, values: str) -> dict[str, str]:
        return {"series": f"{name}{{{target}{labels}}}", "values": values}

    test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # Scrapes fail from the start.
                    series("up", "", "0x40"),
                    # a100 is 15/16 allocated, l4 4/8.
                    series("gpuyard_pool_gpus", ', pool="a100", state="capacity"', "16x40"),
                    series("gpuyard_pool_gpus", ', pool="a100", state="allocated"', "15x40"),
                    series("gpuyard_pool_gpus", ', pool="l4", state="capacity"', "8x40"),
                    series("gpuyard_pool_gpus", ', pool="l4", state="allocated"', "4x40"),
                    # A pool without nodes must not divide by zero into an alert.
                    series("gpuyard_pool_gpus", ', pool="empty", state="capacity"', "0x40"),
                    series("gpuyard_pool_gpus", ', pool="empty", state="allocated"', "0x40"),
                    # The autoscaler ticks every minute for 5 minutes, then stops.
                    series("gpuyard_autoscaler_last_tick_timestamp_seconds", "", "0+60x5 300x35"),
                    # Metering lags 30 s, then 20 minutes from minute 11 on.
                    series("gpuyard_metering_lag_seconds", "", "30x10 1200x30"),
                    # A sink fails for 2 minutes from minute 5, then all the time from 20 on.
                    series("gpuyard_meter_errors_total", ', stage="sink"', "0x5 0+3x2 6x13 6+3x20"),
                    # Other stages are not the sinks' alert.
                    series("gpuyard_meter_errors_total", ', stage="mark"', "0+1x40"),
                    # A third of the AIService reconciles fail; GPUPool ones never do.
                    series(
                        "gpuyard_reconciles_total",
                        ', kind="AIService", result="success"',
                        "0+20x40",
                    ),
                    series(
                        "gpuyard_reconciles_total", ', kind="AIService", result="error"', "0+10x40"
                    ),
                    series(
                        "gpuyard_reconciles_total", ', kind="GPUPool", result="success"', "0+20x40"
                    ),
                    series("gpuyard_reconciles_total", ', kind="GPUPool", result="error"', "0x40"),
                ],
                "alert_rule_test": [
                    {"eval_time": "3m", "alertname": "GpuyardOperatorDown", "exp_alerts": []},
                    {
                        "eval_time": "10m",
                        "alertname": "GpuyardOperatorDown",
                        "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
                    },
                    {"eval_time": "5m", "alertname": "GpuyardAutoscalerStale", "exp_alerts": []},
                    {
                        "eval_time": "15m",
                        "alertname": "GpuyardAutoscalerStale",
                        "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
                    },
                    {"eval_time": "15m", "alertname": "GpuyardMeteringLag", "exp_alerts": []},
                    {
                        "eval_time": "25m",
                        "alertname": "GpuyardMeteringLag",
                        "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
                    },
                    # The 2-minute outage: the errors stop before the alert's 5 minutes.
                    {"eval_time": "9m", "alertname": "GpuyardUsageSinkFailing", "exp_alerts": []},
                    {"eval_time": "17m", "alertname": "GpuyardUsageSinkFailing", "exp_alerts": []},
                    {
                        "eval_time": "30m",
                        "alertname": "GpuyardUsageSinkFailing",
                        "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
                    },
                    {"eval_time": "10m", "alertname": "GpuyardPoolNearlyFull", "exp_alerts": []},
                    {
                        "eval_time": "20m",
                        "alertname": "GpuyardPoolNearlyFull",
                        "exp_alerts": [{"exp_labels": {"severity": "warning", "pool": "a100"}}],
                    },
                    {
                        "eval_time": "30m",
                        "alertname": "GpuyardReconcileErrors",
                        "exp_alerts": [
                            {"exp_labels": {"severity": "warning", "kind": "AIService"}}
                        ],
                    },
                ],
            }
        ],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))

    result = subprocess.run(
        [promtool, "test", "rules", "test.yaml"],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_panels_query_valid_promql(helm: Helm, promtool: str, tmp_path: Path) -> None:
    configmap = one(helm.template({"grafanaDashboard": {"enabled": True}}), "ConfigMap")
    dashboard = json.loads(configmap["data"]["gpuyard.json"])
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    # Grafana fills these in before the query reaches Prometheus.
    substituted = [
        expr.replace("$__range", "1h").replace("$pool", ".*").replace("$namespace", ".*")
        for expr in exprs
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:panel_{index}", "expr": expr}
                    for index, expr in enumerate(substituted)
                ],
            }
        ]
    }
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump(rules))

    result = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "dashboard.yaml")],
        check=False,
        capture_output=True,
        text=True,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    queried = " ".join(exprs)
    for metric in (
        "gpuyard_pool_gpus",
        "gpuyard_service_replicas",
        "DCGM_FI_DEV_GPU_UTIL",
        "gpuyard_cost_total",
    ):
        assert metric in queried, metric
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert len(titles) == len(set(titles))


def test_network_policy_denies_all_but_metrics_health_dns_api_and_prometheus(helm: Helm) -> None:
    objects = helm.template(
        {
            "networkPolicy": {
                "enabled": True,
                "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
                "apiServer": {"cidrs": ["10.0.0.1/32"]},
            }
        }
    )
    policy = one(objects, "NetworkPolicy")["spec"]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]

    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    [ingress] = policy["ingress"]
    assert {port["port"] for port in ingress["ports"]} == {"metrics", "health"}
    test_peer = ingress["from"][-1]["podSelector"]["matchLabels"]
    assert test_peer.items() <= one(objects, "Pod")["metadata"]["labels"].items()
    egress_ports = [{port["port"] for port in rule["ports"]} for rule in policy["egress"]]
    assert egress_ports == [{53}, {443, 6443}, {9090}]
    assert policy["egress"][1]["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]


# --- the GitOps examples -------------------------------------------------------------------


def test_gitops_examples_give_the_chart_valid_values(helm: Helm) -> None:
    examples = REPO_ROOT / "examples" / "gitops"
    [application] = documents((examples / "argocd-application.yaml").read_text())
    flux = documents((examples / "flux-helmrelease.yaml").read_text())
    release = one(flux, "HelmRelease")

    for values in (
        application["spec"]["source"]["helm"]["valuesObject"],
        release["spec"]["values"],
    ):
        objects = helm.template(values)
        assert of_kind(objects, "Deployment")
    namespace = one(flux, "Namespace")["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"
    managed = application["spec"]["syncPolicy"]["managedNamespaceMetadata"]["labels"]
    assert managed["pod-security.kubernetes.io/enforce"] == "restricted"
