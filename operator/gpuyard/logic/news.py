"""What of a watched object the service reconcile reads, so that an event bringing none of it
can be skipped. Pure, so unit-tested.

Most events of a new service are echoes: the AIService event of gpuyard's own status
write, and the Deployment's status updates from its controller (observed generation,
Available and Progressing conditions). A reconcile run for them reads what the last one
read and writes nothing, yet costs as much as a real one. The event handlers compare what
these functions extract from the new body with what they extracted from the body the last
reconcile read, and skip the event when nothing differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gpuyard.logic.conditions import pods_refused

#: Metadata the API server moves on every write; no reconcile reads it.
_BOOKKEEPING = frozenset({"resourceVersion", "managedFields"})
#: The fields of a Deployment's status the service reconcile reads (the replica counts its
#: AIService status and Ready condition report); the rest is the controller's.
_DEPLOYMENT_STATUS_READ = ("replicas", "readyReplicas", "updatedReplicas")
#: The prefix of the annotations the Deployment controller writes (the rollout's revision
#: number): gpuyard neither sets nor reads them.
_DEPLOYMENT_CONTROLLER_ANNOTATIONS = "deployment.kubernetes.io/"
#: The AIService status field the meter owns; the service reconcile does not read it.
_USAGE = "usage"


def service_read(body: Mapping[str, Any]) -> tuple[Any, ...]:
    """What the service reconcile reads of an AIService besides its status: the metadata
    (bookkeeping aside) and the spec."""
    return (_metadata(body), body.get("spec"))


def status_read(status: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the service reconcile reads of an AIService's status: all but the meter's."""
    return {key: value for key, value in (status or {}).items() if key != _USAGE}


def deployment_read(body: Mapping[str, Any]) -> tuple[Any, ...]:
    """What the service reconcile reads of its Deployment: the metadata (bookkeeping and
    the Deployment controller's annotations aside), the spec, the replica counts of the
    status, and the API server's refusal of its pods (the ReplicaFailure condition, which
    Ready reports as PodsRefused)."""
    metadata = _metadata(body)
    annotations = metadata.get("annotations")
    if annotations:
        metadata["annotations"] = {
            key: value
            for key, value in annotations.items()
            if not key.startswith(_DEPLOYMENT_CONTROLLER_ANNOTATIONS)
        }
    status = body.get("status") or {}
    counts = tuple(status.get(field) for field in _DEPLOYMENT_STATUS_READ)
    return (metadata, body.get("spec"), counts, pods_refused(status))


def _metadata(body: Mapping[str, Any]) -> dict[str, Any]:
    metadata = body.get("metadata") or {}
    return {key: value for key, value in metadata.items() if key not in _BOOKKEEPING}
