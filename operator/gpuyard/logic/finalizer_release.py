"""What `gpuyard release-finalizers` decides, without I/O: which objects hold gpuyard's
metering finalizer, which of them a running operator could still bill, the patch that lets
go of the finalizer and nothing else, and the lines the command prints.

The meter holds ``gpuyard.io/metering`` on every pod it bills (and on every GPUPool while
pods on its nodes are unbilled) and removes it once the last second is billed. Once gpuyard
is uninstalled nobody removes it, and every deletion of such a pod, of its namespace or of
the pool would hang: uninstalling strips it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpuyard.api.names import METERING_FINALIZER

# A pod in one of these phases has stopped holding its GPUs: the meter can bill it to its
# end and then releases it.
FINISHED_PHASES = ("Succeeded", "Failed")


def holds_metering_finalizer(obj: Mapping[str, Any]) -> bool:
    return METERING_FINALIZER in (obj.get("metadata", {}).get("finalizers") or ())


def awaits_billing(obj: Mapping[str, Any]) -> bool:
    """Whether a running operator would bill ``obj`` to its end and release it: a pod (or a
    GPUPool) held by the finalizer that is being deleted, or a pod that has finished.

    A pod still running is not: its current window is not over, so no wait bills it to
    the end; its usage stops being billed when the operator stops.
    """
    if not holds_metering_finalizer(obj):
        return False
    if obj["metadata"].get("deletionTimestamp"):
        return True
    return (obj.get("status") or {}).get("phase") in FINISHED_PHASES


def release_patch(metadata: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A JSON patch that removes the metering finalizer from the object ``metadata``
    describes, and applies only to that very object (its uid) with exactly the finalizers
    seen: if anyone changed them meanwhile, the API server refuses the patch (422) and the
    caller reads the object again, so another controller's finalizer is never lost."""
    seen = list(metadata.get("finalizers") or [])
    return [
        {"op": "test", "path": "/metadata/uid", "value": metadata["uid"]},
        {"op": "test", "path": "/metadata/finalizers", "value": seen},
        {
            "op": "replace",
            "path": "/metadata/finalizers",
            "value": [name for name in seen if name != METERING_FINALIZER],
        },
    ]


def label_selector(selector: Mapping[str, Any]) -> str:
    """A Deployment's ``spec.selector`` as a ``labelSelector`` query (``k=v,k2=v2``).

    Only ``matchLabels`` is supported, which is what the chart's Deployment uses; a
    selector with expressions is refused rather than widened or narrowed by mistake.
    """
    if selector.get("matchExpressions"):
        raise ValueError("a selector with matchExpressions is not supported; use matchLabels")
    labels: Mapping[str, str] = selector.get("matchLabels") or {}
    if not labels:
        raise ValueError("the Deployment's selector has no matchLabels")
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def belongs_to_deployment(pod: Mapping[str, Any], deployment: str) -> bool:
    """Whether ``pod`` was made by a ReplicaSet of the Deployment named ``deployment``.

    The selector alone is not enough: the chart's other pods (this very hook's, the
    ``helm test`` pod) carry the same release labels. A Deployment names each ReplicaSet
    ``<deployment>-<pod-template-hash>`` and labels its pods with that hash.
    """
    meta = pod["metadata"]
    template_hash = (meta.get("labels") or {}).get("pod-template-hash")
    if not template_hash:
        return False
    return any(
        owner.get("controller") and owner.get("kind") == "ReplicaSet"
        and owner.get("name") == f"{deployment}-{template_hash}"
        for owner in meta.get("ownerReferences") or ()
    )  # fmt: skip


def parse_deployment_ref(text: str) -> tuple[str, str]:
    """``NAMESPACE/NAME`` as (namespace, name)."""
    namespace, slash, name = text.partition("/")
    if not slash or not namespace or not name or "/" in name:
        raise ValueError(f"expected NAMESPACE/NAME, got {text!r}")
    return namespace, name


def is_running(deployment: Mapping[str, Any]) -> bool:
    """Whether a Deployment has a ready pod, i.e. an operator that still bills."""
    return int((deployment.get("status") or {}).get("readyReplicas") or 0) > 0


def object_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name`` of a namespaced object, ``name`` of a cluster-scoped one."""
    meta = obj["metadata"]
    namespace = meta.get("namespace")
    return f"{namespace}/{meta['name']}" if namespace else str(meta["name"])


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def listed(keys: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` keys, and how many more: a line stays readable on a big cluster."""
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


@dataclass(frozen=True)
class BillingWait:
    """The outcome of waiting for a running operator to bill what is over."""

    awaited: tuple[str, ...]  # pods and pools that were over when the wait began
    unbilled: tuple[str, ...]  # of those, the ones still held at the deadline
    seconds: float

    def describe(self) -> str:
        if not self.awaited:
            return "billing: nothing is waiting to be billed"
        billed = len(self.awaited) - len(self.unbilled)
        line = (
            f"billing: the operator billed and released {billed} of "
            f"{plural(len(self.awaited), 'object')} that had ended, in {self.seconds:.0f}s"
        )
        if self.unbilled:
            line += (
                f"; {len(self.unbilled)} still unbilled at the deadline, released unbilled: "
                f"{listed(self.unbilled)}"
            )
        return line


@dataclass
class ReleaseTally:
    """What one pass over the cluster found and did, for one kind."""

    kind: str  # "pod" or "GPUPool"
    scanned: int = 0
    released: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # key -> why

    def describe(self) -> str:
        line = (
            f"released: {METERING_FINALIZER} from {plural(len(self.released), self.kind)} "
            f"({plural(self.scanned, self.kind)} scanned)"
        )
        if self.failed:
            line += f"; {len(self.failed)} could not be released: " + listed(
                [f"{key} ({why})" for key, why in sorted(self.failed.items())]
            )
        return line
