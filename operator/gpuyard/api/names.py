"""The names gpuyard puts on Kubernetes objects and reads back, defined once.

Labels and the finalizer are part of the API as much as the CRDs are: admission policies,
dashboards and `kubectl -l` selectors rely on them, and the operator itself finds a pod's
service and pool through them. This module imports nothing but the API group, so the local
cluster's tooling (hack/localcluster) can use the same names without the operator's
dependencies.
"""

from __future__ import annotations

from typing import Final

from gpuyard import API_GROUP

#: On every child of an AIService (Deployment, pods, Service): the AIService's name.
SERVICE_LABEL: Final = f"{API_GROUP}/service"
#: On every pod of an AIService: the GPUPool it asked for. Node selectors of pools often use
#: the same key on nodes.
POOL_LABEL: Final = f"{API_GROUP}/pool"
#: The meter's finalizer on GPU pods and GPUPools: held until their usage is billed.
METERING_FINALIZER: Final = f"{API_GROUP}/metering"

#: The extended resource a GPUPool's pods request unless the pool names another.
DEFAULT_RESOURCE_NAME: Final = "nvidia.com/gpu"

ServiceKey = tuple[str, str]
"""(namespace, name) of an AIService: how caches, queues and the autoscaler key a service,
and how Kopf's indices key it (a plain tuple)."""

#: Label names a tenant may not constrain in a Prometheus metric of an AIService. The
#: operator scopes every query to the service itself (namespace and service; pods for GPU
#: series), and a matcher on one of these could widen or move that scope into another team's
#: series in a shared Prometheus: the plain names, and the `exported_` names they take when
#: Prometheus does not honour the exporter's labels. Names starting with `__` (such as
#: `__name__`, which would replace the metric) are reserved by Prometheus and refused too.
#: The CRD's CEL rule, the pydantic model and the query builder all refuse this one tuple.
RESERVED_PROMETHEUS_LABELS: Final = (
    "namespace",
    "exported_namespace",
    "pod",
    "exported_pod",
    "service",
)
