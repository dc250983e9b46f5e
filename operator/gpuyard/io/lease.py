"""The election's Lease on the API server: read it, write it, wait for it to change.

Lease calls bypass the write fence of ``Kube`` on purpose: renewing the Lease is how a
leader keeps the fence open, and a candidate writes it before it may write anything else.
Every write carries the resourceVersion it was decided from, so of two candidates racing
for a free Lease the API server lets one win (the other gets 409 Conflict).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubernetes.client import ApiClient, ApiException

from gpuyard.io.kube import request_json
from gpuyard.logic.leadership import LeaseRecord


class LeaseConflictError(Exception):
    """Somebody else wrote the Lease since it was read."""


def _micro_time(value: datetime | None) -> str | None:
    # MicroTime: RFC 3339 with exactly six fractional digits.
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if value else None


def _parse_micro_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def record_from_lease(body: dict[str, Any]) -> LeaseRecord:
    spec = body.get("spec") or {}
    return LeaseRecord(
        holder=spec.get("holderIdentity") or None,
        duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
        acquire_time=_parse_micro_time(spec.get("acquireTime")),
        renew_time=_parse_micro_time(spec.get("renewTime")),
        transitions=int(spec.get("leaseTransitions") or 0),
    )


def lease_spec(record: LeaseRecord) -> dict[str, Any]:
    return {
        "holderIdentity": record.holder or "",
        "leaseDurationSeconds": record.duration_seconds,
        "acquireTime": _micro_time(record.acquire_time),
        "renewTime": _micro_time(record.renew_time),
        "leaseTransitions": record.transitions,
    }


class LeaseClient:
    """One named Lease, read and written with the operator's client."""

    def __init__(self, client: ApiClient, namespace: str, name: str) -> None:
        self.client = client
        self.namespace, self.name = namespace, name
        self._collection = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"

    def get(self, timeout: float) -> tuple[LeaseRecord, str] | None:
        """The Lease and its resourceVersion, or None when it does not exist."""
        try:
            body = self._request("GET", f"{self._collection}/{self.name}", timeout=timeout)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return record_from_lease(body), body["metadata"]["resourceVersion"]

    def create(self, record: LeaseRecord, timeout: float) -> str:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": lease_spec(record),
        }
        try:
            created = self._request("POST", self._collection, body=body, timeout=timeout)
        except ApiException as error:
            if error.status == 409:
                raise LeaseConflictError(self.name) from error
            raise
        return str(created["metadata"]["resourceVersion"])

    def update(self, record: LeaseRecord, resource_version: str, timeout: float) -> str:
        """Write ``record`` over the version read; LeaseConflictError when it changed."""
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": resource_version,
            },
            "spec": lease_spec(record),
        }
        try:
            updated = self._request(
                "PUT", f"{self._collection}/{self.name}", body=body, timeout=timeout
            )
        except ApiException as error:
            if error.status == 409:
                raise LeaseConflictError(self.name) from error
            raise
        return str(updated["metadata"]["resourceVersion"])

    def wait_for_change(self, resource_version: str, timeout: float) -> None:
        """Return once the Lease changes after ``resource_version``, or after ``timeout``.

        A standby that only polled would see a released Lease up to a retry period late;
        a watch hears of it at once, which is what lets a clean handover take well under
        the retry period.
        """
        seconds = max(1, int(timeout))
        method, url, headers, _, _ = self.client.param_serialize(
            "GET",
            self._collection,
            query_params=[
                ("watch", "true"),
                ("fieldSelector", f"metadata.name={self.name}"),
                ("resourceVersion", resource_version),
                ("allowWatchBookmarks", "false"),
                ("timeoutSeconds", str(seconds)),
            ],
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response = self.client.rest_client.pool_manager.request(
            method, url, headers=headers, preload_content=False, timeout=seconds + 5
        )
        try:
            if response.status != 200:
                return  # a 410 Gone, say: the caller reads the Lease again
            for chunk in response.stream():
                if chunk.strip():  # an event: the Lease changed
                    return
        finally:
            response.release_conn()

    def _request(self, method: str, path: str, *, body: Any = None, timeout: float) -> Any:
        return request_json(self.client, method, path, body=body, timeout=timeout)
