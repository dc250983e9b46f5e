"""Which AIService a pod belongs to, from facts a tenant cannot forge.

Labels are for selection and display: anyone who may edit a pod may relabel it. Billing
follows the controller ownerReferences instead, each one checked against the UID of the
object it names: Pod -> ReplicaSet -> Deployment -> AIService. A tenant can create a
ReplicaSet in their own namespace that claims a gpuyard Deployment as its controller; that
only bills the tenant's own service, which is where those GPUs' cost belongs anyway. A pod
whose chain breaks anywhere is unmanaged usage of its namespace: still billed, never free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gpuyard import API_GROUP


class OwnerNotKnownError(LookupError):
    """A link of the chain names an object the caches do not hold: not yet (a ReplicaSet's
    first watch event can arrive after its first pod's), or no more (the owners of a
    deleted service go before its pods; a namesake with another UID is not the owner).
    Not the same as no owner: the caller decides what such a pod is billed to."""


#: (kind, name) in the pod's namespace -> that object's metadata, or None when unknown.
MetadataLookup = Callable[[str, str], Mapping[str, Any] | None]

#: Each link of the chain: the kind that owns, and the API group it must be served from.
_CHAIN = (("ReplicaSet", "apps"), ("Deployment", "apps"), ("AIService", API_GROUP))


@dataclass(frozen=True, slots=True)
class ControllerRef:
    """An ownerReference with `controller: true`."""

    api_version: str
    kind: str
    name: str
    uid: str

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]


def controller_ref(metadata: Mapping[str, Any]) -> ControllerRef | None:
    """The object's controller, as its ownerReferences name it (at most one is allowed)."""
    for reference in metadata.get("ownerReferences") or ():
        if isinstance(reference, Mapping) and reference.get("controller") is True:
            return ControllerRef(
                api_version=str(reference.get("apiVersion", "")),
                kind=str(reference.get("kind", "")),
                name=str(reference.get("name", "")),
                uid=str(reference.get("uid", "")),
            )
    return None


def owning_service(pod_metadata: Mapping[str, Any], lookup: MetadataLookup) -> str | None:
    """The name of the AIService that controls the pod through its ReplicaSet and
    Deployment, or None when a link is missing or of another kind. Raises
    `OwnerNotKnownError` when a link names an object `lookup` does not know, or one whose
    UID differs (a deleted and re-created namesake)."""
    current = pod_metadata
    for kind, group in _CHAIN:
        reference = controller_ref(current)
        if reference is None or reference.kind != kind or reference.group != group:
            return None
        owner = lookup(kind, reference.name)
        if owner is None or owner.get("uid") != reference.uid:
            raise OwnerNotKnownError(f"{kind} {reference.name} (uid {reference.uid}) is not known")
        current = owner
    return str(current.get("name") or "") or None
