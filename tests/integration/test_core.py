"""gpuyard core on the real cluster: pools, services, children, status."""

from __future__ import annotations

import json

from conftest import OperatorProcess, flush_audit, reconciles
from localcluster.cluster import REPO_ROOT
from support import Kubectl, wait_until


def condition(obj: dict, kind: str) -> dict | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)


def test_examples_run_on_their_pool(
    kubectl: Kubectl, namespace: str, running_operator: OperatorProcess
) -> None:
    kubectl("apply", "-n", namespace, "-f", str(REPO_ROOT / "examples" / "llm-chat.yaml"))
    kubectl("wait", "-n", namespace, "--for=condition=Ready", "ais/llm-chat", "--timeout=60s")
    pods = kubectl.json("get", "pods", "-n", namespace, "-l", "gpuyard.io/service=llm-chat")
    assert len(pods["items"]) == 1
    pod = pods["items"][0]
    assert pod["status"]["phase"] == "Running"
    assert pod["spec"]["nodeName"].startswith("gpu-a100-")
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    pool = wait_until(
        lambda: (p := kubectl.json("get", "gpool", "a100")).get("status", {}).get("capacity") and p,
        what="the a100 pool's status",
    )
    assert pool["status"]["capacity"] == 16
    table = kubectl("get", "ais", "-n", namespace)
    assert table.split("\n")[0].split()[:7] == [
        "NAME", "POOL", "GPUS", "READY", "DESIRED", "COST", "STATUS",
    ]  # fmt: skip
    assert "llm-chat   a100   2      1       1" in table


def test_a_reconcile_with_nothing_to_do_writes_nothing(
    kubectl: Kubectl, namespace: str, running_operator: OperatorProcess
) -> None:
    kubectl("apply", "-n", namespace, "-f", str(REPO_ROOT / "examples" / "llm-chat.yaml"))
    kubectl("wait", "-n", namespace, "--for=condition=Ready", "ais/llm-chat", "--timeout=60s")
    flush_audit(kubectl, running_operator, namespace)
    before = len(running_operator.writes())
    done = reconciles(running_operator)
    # An annotation changes the object but not what gpuyard makes of it.
    kubectl("annotate", "-n", namespace, "ais/llm-chat", "touched=yes")
    wait_until(
        lambda: reconciles(running_operator) > done, what="a reconcile of the touched service"
    )
    flush_audit(kubectl, running_operator, namespace)
    writes = running_operator.writes()[before:]
    assert writes == [], json.dumps(writes, indent=1)[:2000]
