"""Fixtures: one real local cluster per test run, a fresh namespace per test.

Set ``GPUYARD_CLUSTER_STATE`` to the ``state.json`` of a running cluster (printed by
``make cluster-up`` / ``python -m localcluster env``) to reuse it instead of starting one:
a warm cluster saves about a minute per run while you iterate.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster import keda
from localcluster.cluster import ClusterState, LocalCluster, binaries_dir, cache_dir

sys.path.insert(0, str(Path(__file__).parent))

from support import Kubectl


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/integration needs the cluster; the marker lets `-m "not
    # cluster"` select the fast unit tests alone.
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterState]:
    given = os.environ.get("GPUYARD_CLUSTER_STATE")
    if given:
        yield ClusterState.load(Path(given).parent)
        return
    local = LocalCluster(
        cache_dir() / "clusters" / f"pytest-{os.getpid()}", name=f"pytest-{os.getpid()}"
    )
    # KEDA runs when `make keda` has built it (CI always does); tests/integration/
    # test_keda_compat.py skips without it, or fails under GPUYARD_REQUIRE_KEDA=1.
    state = local.up(with_keda=keda.missing(keda.binaries_dir()) is None)
    try:
        yield state
    finally:
        local.down()


@pytest.fixture(scope="session")
def kubectl(cluster: ClusterState) -> Kubectl:
    return Kubectl(binaries_dir(build=False) / "kubectl", cluster.kubeconfig)


@pytest.fixture
def namespace(request: pytest.FixtureRequest, kubectl: Kubectl) -> Iterator[str]:
    """A namespace of the test's own, deleted afterwards (without waiting for it to go)."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{stem}-{secrets.token_hex(3)}"
    kubectl("create", "namespace", name)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)
