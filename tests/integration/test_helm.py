"""charts/gpuyard and dist/install.yaml on the real local cluster: the API server accepts the
rendered objects; Pod Security "restricted" admits the operator's pod (and refuses a weaker
one); the ServiceAccount may do what the ClusterRole snapshot says and nothing more; upgrade;
uninstall keeps the CRDs and the users' objects; the plain-manifest install makes the same
objects as the chart."""

from __future__ import annotations

import copy
import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_support import (
    CHART,
    DIST_INSTALL,
    DIST_NAMESPACE,
    REPO_ROOT,
    Helm,
    documents,
    kinds_and_names,
    one,
    rbac_manifest,
    service_account_kubeconfig,
)
from localcluster.cluster import ClusterState, binaries_dir
from support import Kubectl, wait_until

CRDS = ("aiservices.gpuyard.io", "gpupools.gpuyard.io")
#: The chart's admission policies, each with a binding of the same name (name suffixes).
POLICIES = ("pods", "workloads", "deployment-scale", "operator-children", "operator-finalizers")
POLICY_KINDS = ("validatingadmissionpolicy", "validatingadmissionpolicybinding")
RULES_SNAPSHOT = REPO_ROOT / "tests" / "data" / "clusterrole-rules.yaml"
RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"


@pytest.fixture(scope="module")
def helm(cluster: ClusterState, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(
        binaries_dir(build=False) / "helm", tmp_path_factory.mktemp("helm"), cluster.kubeconfig
    )


@pytest.fixture
def restricted(namespace: str, kubectl: Kubectl) -> str:
    """The test's namespace, enforcing Pod Security "restricted" (the API server checks)."""
    kubectl("label", "namespace", namespace, RESTRICTED)
    return namespace


def adopt_crds(kubectl: Kubectl, release: str, namespace: str) -> None:
    """Let `release` take over CRDs that another install (kubectl apply, an earlier release)
    left in this shared cluster, as a user would (docs/gitops.md)."""
    for crd in CRDS:
        if kubectl.run("get", "crd", crd, check=False).returncode != 0:
            continue
        kubectl("label", "crd", crd, "--overwrite", "app.kubernetes.io/managed-by=Helm")
        kubectl(
            "annotate", "crd", crd, "--overwrite",
            f"meta.helm.sh/release-name={release}", f"meta.helm.sh/release-namespace={namespace}",
        )  # fmt: skip


def running_operator_pods(kubectl: Kubectl, namespace: str, release: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator"
    pods = kubectl.json("get", "pods", "-n", namespace, "-l", selector)["items"]
    return [
        pod
        for pod in pods
        if pod["status"].get("phase") == "Running" and "deletionTimestamp" not in pod["metadata"]
    ]


def exists(kubectl: Kubectl, kind: str, name: str, namespace: str | None = None) -> bool:
    scope = ["-n", namespace] if namespace else []
    return kubectl.run("get", kind, name, *scope, check=False).returncode == 0


def rules_of(kubectl: Kubectl, user: str, namespace: str) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) that `user` may use, as `kubectl auth can-i --list` shows."""
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectRulesReview",
        "spec": {"namespace": namespace},
    }
    # No client-side validation: it would list CRDs, which the account may not.
    out = kubectl.run(
        "create", f"--as={user}", "--validate=false", "-o", "json", "-f", "-",
        stdin=json.dumps(review),
    )  # fmt: skip
    status = json.loads(out.stdout)["status"]
    assert not status.get("incomplete"), status
    return {
        (group, resource, verb)
        for rule in status["resourceRules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def snapshot_rules() -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in yaml.safe_load(RULES_SNAPSHOT.read_text())
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_rendered_chart_is_accepted_by_the_api_server(
    helm: Helm, kubectl: Kubectl, restricted: str
) -> None:
    # Every optional object whose kind the cluster knows; the monitoring.coreos.com kinds
    # need the Prometheus Operator's CRDs (promtool checks their content in the unit tests).
    values = {"networkPolicy": {"enabled": True}, "grafanaDashboard": {"enabled": True}}
    manifest = helm.template_text(values, release="dry", namespace=restricted).stdout

    result = kubectl.run("apply", "--dry-run=server", "-f", "-", stdin=manifest, check=False)

    assert result.returncode == 0, result.stderr
    created = {line.split(" ", 1)[0] for line in result.stdout.splitlines()}
    for expected in (
        "deployment.apps/dry-gpuyard",
        "pod/dry-gpuyard-test-metrics",  # the `helm test` pod passes "restricted" too
        "job.batch/dry-gpuyard-release-finalizers",  # the uninstall hook and its RBAC
        "role.rbac.authorization.k8s.io/dry-gpuyard-release-finalizers",
        "clusterrole.rbac.authorization.k8s.io/dry-gpuyard",
        "networkpolicy.networking.k8s.io/dry-gpuyard",
        "configmap/dry-gpuyard-dashboard",
        "customresourcedefinition.apiextensions.k8s.io/aiservices.gpuyard.io",
    ):
        assert expected in created, result.stdout


def test_install_upgrade_and_uninstall_in_a_restricted_namespace(
    helm: Helm, kubectl: Kubectl, restricted: str
) -> None:
    release = f"gy-{secrets.token_hex(3)}"
    fullname = f"{release}-gpuyard"
    pool_name = f"helm-test-{secrets.token_hex(3)}"
    installed = False
    try:
        adopt_crds(kubectl, release, restricted)
        install = helm.run(
            "install", release, str(CHART), "--namespace", restricted,
            "--set", "operator.clusterId=integration", "--wait", "--timeout", "120s",
        )  # fmt: skip
        installed = True

        # The API server admitted both replicas' pods under "restricted"; kwok runs them on
        # the CPU node (the anti-affinity across nodes is preferred, not required).
        def both_running() -> list[dict[str, Any]] | None:
            found = running_operator_pods(kubectl, restricted, release)
            return found if len(found) == 2 else None

        pods = wait_until(both_running, timeout=60, what="the two operator pods to run")
        assert {pod["spec"]["nodeName"] for pod in pods} == {"cpu-0"}
        assert exists(kubectl, "poddisruptionbudget", fullname, restricted)
        for kind in POLICY_KINDS:
            for policy in POLICIES:
                assert exists(kubectl, kind, f"{fullname}-{policy}"), (kind, policy)

        # ... and the namespace really enforces it: a weaker container is refused.
        deployment = kubectl.json("get", "deployment", fullname, "-n", restricted)
        pod_spec = copy.deepcopy(deployment["spec"]["template"]["spec"])
        pod_spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
        weaker = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "weaker"},
            "spec": pod_spec,
        }
        refused = kubectl.run(
            "create", "--dry-run=server", "-n", restricted, "-f", "-",
            stdin=json.dumps(weaker), check=False,
        )  # fmt: skip
        assert refused.returncode != 0
        assert 'violates PodSecurity "restricted:latest"' in refused.stderr

        # The ServiceAccount may do exactly what the snapshot lists, beyond what any
        # account may (discovery, self-reviews).
        account = f"system:serviceaccount:{restricted}:{fullname}"
        granted = rules_of(kubectl, account, restricted)
        baseline = rules_of(kubectl, f"system:serviceaccount:{restricted}:nobody", restricted)
        # In the release namespace, the Role adds its Lease and nothing else.
        lease_rules = {
            ("coordination.k8s.io", "leases", verb)
            for verb in ("create", "get", "list", "watch", "update")
        }
        assert granted - baseline == snapshot_rules() | lease_rules
        for group, resource, verb in granted:
            assert "*" not in (group, resource, verb)
            assert resource != "secrets"
            assert verb not in {"escalate", "bind", "impersonate"}

        # The GPUPool that NOTES.txt suggests is valid.
        notes_pool = re.search(r"<<'YAML'\n(.*?)\n\s*YAML\n", install.stdout, re.DOTALL)
        assert notes_pool, install.stdout
        kubectl("apply", "--dry-run=server", "-f", "-", stdin=notes_pool.group(1))

        # A user's objects, which must outlive the operator's release.
        kubectl.apply(
            yaml.safe_dump_all(
                [
                    {
                        "apiVersion": "gpuyard.io/v1alpha1",
                        "kind": "GPUPool",
                        "metadata": {"name": pool_name},
                        "spec": {
                            "gpuType": "a100-80gb",
                            "nodeSelector": {"gpuyard.io/pool": "a100"},
                            "price": {"perGpuHour": "2.50"},
                        },
                    },
                    {
                        "apiVersion": "gpuyard.io/v1alpha1",
                        "kind": "AIService",
                        "metadata": {"name": "llama", "namespace": restricted},
                        "spec": {"pool": pool_name, "container": {"image": "vllm/vllm:v1"}},
                    },
                ]
            )
        )

        # Upgrade to changed values: the rolling update replaces both pods with ones that
        # have them.
        values = helm.values_file(
            {
                "operator": {"clusterId": "integration", "logLevel": "DEBUG"},
                "resources": {"limits": {"memory": "768Mi"}},
            }
        )
        helm.run(
            "upgrade", release, str(CHART), "--namespace", restricted, "-f", values,
            "--wait", "--timeout", "120s",
        )  # fmt: skip

        def upgraded_pods() -> list[dict[str, Any]] | None:
            found = running_operator_pods(kubectl, restricted, release)
            levels = [
                {item["name"]: item.get("value") for item in pod["spec"]["containers"][0]["env"]}
                .get("GPUYARD_LOG_LEVEL")
                for pod in found
            ]  # fmt: skip
            return found if len(found) == 2 and set(levels) == {"DEBUG"} else None

        new_pods = wait_until(upgraded_pods, timeout=90, what="the upgraded operator pods")
        old_names = {pod["metadata"]["name"] for pod in pods}
        assert not old_names & {pod["metadata"]["name"] for pod in new_pods}
        for new_pod in new_pods:
            assert new_pod["spec"]["containers"][0]["resources"]["limits"]["memory"] == "768Mi"
        history = json.loads(helm.run("history", release, "-n", restricted, "-o", "json").stdout)
        assert [entry["status"] for entry in history] == ["superseded", "deployed"]

        # --no-hooks: kwok never runs the pre-delete Job's container, so helm would wait
        # for it until its timeout. test_uninstall.py plays the kubelet for that Job.
        helm.run("uninstall", release, "--namespace", restricted, "--wait", "--no-hooks")
        installed = False

        for kind, name, ns in (
            ("deployment", fullname, restricted),
            ("service", f"{fullname}-metrics", restricted),
            ("serviceaccount", fullname, restricted),
            ("clusterrole", fullname, None),
            ("clusterrolebinding", fullname, None),
            ("role", f"{fullname}-leader-election", restricted),
            ("rolebinding", f"{fullname}-leader-election", restricted),
            ("poddisruptionbudget", fullname, restricted),
            *((kind, f"{fullname}-{policy}", None) for kind in POLICY_KINDS for policy in POLICIES),
        ):
            assert not exists(kubectl, kind, name, ns), (kind, name)
        for crd in CRDS:
            assert exists(kubectl, "crd", crd), crd
        assert exists(kubectl, "aiservice", "llama", restricted)
        assert exists(kubectl, "gpupool", pool_name)
    finally:
        if installed:
            helm.run("uninstall", release, "--namespace", restricted, "--no-hooks", check=False)
        kubectl.run("delete", "gpupool", pool_name, "--ignore-not-found", check=False)


@pytest.fixture
def dist_namespace_free(kubectl: Kubectl) -> Iterator[None]:
    """dist/install.yaml installs into gpuyard-system with fixed names: they must be free in
    this shared cluster, and are removed afterwards (the CRDs stay, as for a user). Its
    admission policies exempt its own operator, not the session's: they go first."""
    if exists(kubectl, "namespace", DIST_NAMESPACE):
        pytest.skip(f"namespace {DIST_NAMESPACE} is in use on this cluster")
    yield
    for kind in POLICY_KINDS:
        for policy in POLICIES:
            kubectl.run("delete", kind, f"gpuyard-{policy}", "--ignore-not-found", check=False)
    kubectl.run("delete", "namespace", DIST_NAMESPACE, "--wait=true", "--timeout=60s", check=False)
    for kind in ("clusterrolebinding", "clusterrole"):
        kubectl.run("delete", kind, "gpuyard", "--ignore-not-found", check=False)


@pytest.mark.usefixtures("dist_namespace_free")
def test_dist_install_yaml_creates_the_charts_objects(
    helm: Helm, kubectl: Kubectl, restricted: str
) -> None:
    # What the chart installs, as release "gpuyard" (the name dist/install.yaml uses).
    adopt_crds(kubectl, "gpuyard", restricted)
    helm.run("install", "gpuyard", str(CHART), "--namespace", restricted, "--wait")
    try:
        from_chart = kinds_and_names(
            documents(helm.run("get", "manifest", "gpuyard", "-n", restricted).stdout)
        )
    finally:
        helm.run("uninstall", "gpuyard", "--namespace", restricted, "--wait", "--no-hooks")

    # Server-side, as the file's header says; forced, since Helm last wrote the CRDs.
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(DIST_INSTALL))

    objects = documents(DIST_INSTALL.read_text())
    assert kinds_and_names(objects) == from_chart | {("Namespace", DIST_NAMESPACE)}
    for obj in objects:
        namespace = obj["metadata"].get("namespace")
        assert exists(kubectl, obj["kind"], obj["metadata"]["name"], namespace), obj["kind"]
    labels = one(objects, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    wait_until(
        lambda: running_operator_pods(kubectl, DIST_NAMESPACE, "gpuyard"),
        timeout=60,
        what="the operator pod of dist/install.yaml to run",
    )


def test_a_token_of_the_charts_service_account_has_the_charts_permissions(
    helm: Helm, kubectl: Kubectl, namespace: str, cluster: ClusterState, tmp_path: Path
) -> None:
    # How a test runs the operator with exactly the chart's RBAC: apply the chart's account
    # and role, and give the operator a kubeconfig with a token of that account.
    release = f"rbac-{secrets.token_hex(3)}"
    manifest = rbac_manifest(helm, namespace, release=release)
    assert {obj["kind"] for obj in documents(manifest)} == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    }
    kubectl.apply(manifest)
    try:
        token = kubectl("create", "token", f"{release}-gpuyard", "-n", namespace).strip()
        config = service_account_kubeconfig(cluster.kubeconfig, token, tmp_path / "kubeconfig")
        as_account = Kubectl(kubectl.binary, str(config))

        def can(*args: str) -> str:
            return as_account.run("auth", "can-i", *args, check=False).stdout.strip()

        assert can("watch", "pods", "--all-namespaces") == "yes"
        assert (
            can("patch", "aiservices.gpuyard.io", "--subresource=status", "-n", "default") == "yes"
        )
        assert can("list", "customresourcedefinitions.apiextensions.k8s.io") == "yes"
        assert can("get", "secrets", "-n", namespace) == "no"
        assert can("patch", "aiservices.gpuyard.io", "-n", "default") == "no"
        assert can("delete", "pods", "-n", namespace) == "no"
        # The Lease: its own, in the release namespace, and no other anywhere.
        lease = f"leases.coordination.k8s.io/{release}-gpuyard"
        assert can("update", lease, "-n", namespace) == "yes"
        assert can("create", "leases.coordination.k8s.io", "-n", namespace) == "yes"
        assert can("update", "leases.coordination.k8s.io/other", "-n", namespace) == "no"
        assert can("get", lease, "-n", "default") == "no"
    finally:
        kubectl.run("delete", "-f", "-", "--ignore-not-found", stdin=manifest, check=False)
