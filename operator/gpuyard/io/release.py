"""The Kubernetes calls of `gpuyard release-finalizers`: list every pod and GPUPool page by
page, strip the metering finalizer with a guarded JSON patch, stop the operator's
Deployment and watch its pods go.

Plain JSON through ``request_json`` like the operator's own calls; what to strip and how the
patch is guarded is decided in ``gpuyard.logic.finalizer_release``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kubernetes.client import ApiClient, ApiException

from gpuyard import API_GROUP, API_VERSION
from gpuyard.io.kube import request_json
from gpuyard.logic.finalizer_release import holds_metering_finalizer, release_patch

# A page of 500 pods is a few MB: large enough for few round trips, small enough that a
# cluster of 100,000 pods never arrives as one response.
PAGE_SIZE = 500
# A 422 or 409 means the object changed between our read and our patch (its finalizers,
# or the object itself); a few fresh reads settle any realistic race.
RELEASE_ATTEMPTS = 5
# An expired continue token (410) restarts the listing; objects already released no
# longer hold the finalizer, so a restart releases nothing twice.
LIST_RESTARTS = 3


class ReleaseError(Exception):
    """The finalizer could not be released from one object."""


@dataclass(frozen=True)
class Kind:
    """Where objects of one kind live in the API."""

    name: str  # as the command reports it
    collection: str  # the cluster-wide list path

    def path(self, metadata: dict[str, Any]) -> str:
        namespace = metadata.get("namespace")
        if namespace:
            prefix, _, plural = self.collection.rpartition("/")
            return f"{prefix}/namespaces/{namespace}/{plural}/{metadata['name']}"
        return f"{self.collection}/{metadata['name']}"


PODS = Kind(name="pod", collection="/api/v1/pods")
POOLS = Kind(name="GPUPool", collection=f"/apis/{API_GROUP}/{API_VERSION}/gpupools")


def api_error_text(error: ApiException) -> str:
    """The API server's own message for a failed request (its Status body), else the reason."""
    try:
        message = json.loads(error.body or "{}").get("message")
    except ValueError:
        message = None
    status = f"{error.status} {error.reason}"
    return f"{status}: {message}" if message else status


class ReleaseClient:
    """The calls the command makes, each with a clear name."""

    def __init__(self, client: ApiClient, page_size: int = PAGE_SIZE) -> None:
        self.client = client
        self.page_size = page_size

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return request_json(self.client, method, path, **kwargs)

    def list_all(self, kind: Kind) -> Iterator[dict[str, Any]]:
        """Every object of ``kind`` in the cluster, ``page_size`` at a time. Nothing when
        the kind is not served (the CRD is gone)."""
        token = ""
        restarts = 0
        while True:
            query = [("limit", str(self.page_size))]
            if token:
                query.append(("continue", token))
            try:
                page = self._call("GET", kind.collection, query=query)
            except ApiException as error:
                if error.status == 404 and not token:
                    return
                if error.status == 410 and restarts < LIST_RESTARTS:
                    restarts += 1
                    token = ""
                    continue
                raise
            yield from page.get("items") or []
            token = (page.get("metadata") or {}).get("continue") or ""
            if not token:
                return

    def get(self, kind: Kind, metadata: dict[str, Any]) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self._call("GET", kind.path(metadata))
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        # A new object under the old name is not the one we were waiting for.
        return found if found["metadata"].get("uid") == metadata.get("uid") else None

    def release(self, kind: Kind, obj: dict[str, Any]) -> bool:
        """Remove the metering finalizer from ``obj``, keeping every other finalizer.

        True when this call removed it; False when the object went or no longer holds it.
        Raises ReleaseError when it keeps changing under us, or the API refuses.
        """
        current: dict[str, Any] | None = obj
        for _ in range(RELEASE_ATTEMPTS):
            if current is None or not holds_metering_finalizer(current):
                return False
            try:
                self._call(
                    "PATCH",
                    kind.path(current["metadata"]),
                    body=release_patch(current["metadata"]),
                    content_type="application/json-patch+json",
                )
            except ApiException as error:
                if error.status == 404:
                    return False
                if error.status not in (409, 422):
                    raise ReleaseError(api_error_text(error)) from error
                current = self.get(kind, current["metadata"])
                continue
            return True
        raise ReleaseError(f"it changed on each of {RELEASE_ATTEMPTS} attempts")

    # -- the operator's Deployment -------------------------------------------------------

    def deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self._call(
                "GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}"
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return found

    def scale_to_zero(self, namespace: str, name: str) -> None:
        """Through the scale subresource, so the command needs no write on the Deployment."""
        self._call(
            "PATCH",
            f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale",
            body={"spec": {"replicas": 0}},
            content_type="application/merge-patch+json",
        )

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """The pods ``selector`` picks in ``namespace``, terminating ones included: a pod
        object goes only once its containers have stopped."""
        page = self._call(
            "GET", f"/api/v1/namespaces/{namespace}/pods", query=[("labelSelector", selector)]
        )
        found: list[dict[str, Any]] = page.get("items") or []
        return found
