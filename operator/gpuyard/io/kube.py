"""Kubernetes calls: server-side apply of children, status patches, events.

The only module that writes to the API server. Every write is counted in
``gpuyard_kubernetes_writes_total`` so that "a reconcile with nothing to do writes
nothing" is observable in production, not only in tests.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import kopf
import kubernetes
from kubernetes.client import ApiClient, ApiException

from gpuyard import API_GROUP, API_VERSION, FIELD_MANAGER, __version__
from gpuyard.io.metrics import OperatorMetrics

logger = logging.getLogger(__name__)

USER_AGENT = f"gpuyard/{__version__}"
REQUEST_TIMEOUT = 30


def make_api_client(
    kubeconfig: str | None, pool_size: int, identity: str | None = None
) -> ApiClient:
    """A client from a kubeconfig, else from the in-cluster ServiceAccount.

    ``identity`` (the election's) goes into the user agent, so that the API server's audit
    log tells which replica made each request.
    """
    configuration = kubernetes.client.Configuration()
    if kubeconfig:
        kubernetes.config.load_kube_config(
            config_file=kubeconfig, client_configuration=configuration
        )
    else:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=configuration)
    # One connection per concurrent reconcile, or the workers queue behind each other.
    configuration.connection_pool_maxsize = max(pool_size, 4)
    client = ApiClient(configuration)
    client.user_agent = f"{USER_AGENT} ({identity})" if identity else USER_AGENT
    return client


def connection_info(client: ApiClient) -> Any:
    """Kopf's view of the same credentials, so its watches and our calls agree."""
    configuration = client.configuration
    # The client keeps "Bearer <token>" under a key that varies between its versions.
    credential = next(iter((configuration.api_key or {}).values()), "")
    scheme, _, token = (
        credential.partition(" ") if " " in credential else ("Bearer", "", credential)
    )
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        scheme=scheme if token else None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


def request_json(
    client: ApiClient,
    method: str,
    path: str,
    *,
    body: Any = None,
    content_type: str | None = None,
    query: list[tuple[str, str]] | None = None,
    timeout: float = REQUEST_TIMEOUT,
) -> Any:
    """One request as plain JSON; raises ApiException on a status outside 2xx.

    The generated typed methods would turn every Deployment into client models and
    back; the reconciler speaks Kubernetes JSON, so the raw request is both simpler
    and cheaper.
    """
    headers = {"Accept": "application/json"}
    if content_type:
        headers["Content-Type"] = content_type
    method, url, headers, payload, _ = client.param_serialize(
        method,
        path,
        query_params=query or [],
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    response = client.call_api(
        method, url, header_params=headers, body=payload, _request_timeout=timeout
    )
    data = response.read()
    if not 200 <= response.status < 300:
        raise ApiException(http_resp=response)
    return json.loads(data) if data else None


class NotLeaderError(Exception):
    """A write was refused before it was sent: this replica does not lead (or no longer
    knows that it does)."""


class Kube:
    """The handful of calls gpuyard makes, each with a clear name.

    ``may_write`` is the leader election's fence: every write asks it just before it is
    sent, and a replica that is not (or no longer surely) the leader sends none.
    """

    def __init__(
        self,
        client: ApiClient,
        metrics: OperatorMetrics,
        may_write: Callable[[], bool] = lambda: True,
    ) -> None:
        self.client = client
        self.may_write = may_write
        self._writes = metrics.kubernetes_writes
        self._fenced = metrics.fenced_writes
        # Writes sent and not yet answered: a leader that steps down waits for them before
        # it releases the Lease (a worker thread's request cannot be cancelled).
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str | None = None,
        query: list[tuple[str, str]] | None = None,
    ) -> Any:
        if method == "GET":
            return request_json(self.client, method, path, query=query)
        with self._in_flight_lock:
            # Asked under the lock, so that once writes_in_flight() reads 0 after the
            # fence closed, no write can still be on its way.
            if not self.may_write():
                self._fenced.inc()
                raise NotLeaderError(f"{method} {path}: this replica does not lead")
            self._in_flight += 1
        try:
            return request_json(
                self.client, method, path, body=body, content_type=content_type, query=query
            )
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    def writes_in_flight(self) -> int:
        with self._in_flight_lock:
            return self._in_flight

    def apply(self, obj: Mapping[str, Any]) -> Any:
        """Server-side apply ``obj`` as field manager ``gpuyard`` (forcing our own fields)."""
        path = _object_path(obj)
        self._writes.labels(verb="apply", resource=obj["kind"]).inc()
        return self._call(
            "PATCH", path, body=dict(obj), content_type="application/apply-patch+yaml",
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
        )  # fmt: skip

    def create(self, obj: Mapping[str, Any]) -> Any:
        """Create ``obj`` (POST) as field manager ``gpuyard``; server-side apply it when it
        exists already.

        A create costs the API server about a third of an apply; the fields it sets are
        recorded as gpuyard's with operation ``Update``, which the first apply that changes
        the object takes over (see ``take_over_fields``).
        """
        self._writes.labels(verb="create", resource=obj["kind"]).inc()
        collection = _object_path(obj).rsplit("/", 1)[0]
        try:
            return self._call(
                "POST", collection, body=dict(obj), query=[("fieldManager", FIELD_MANAGER)]
            )
        except ApiException as error:
            if error.status != 409:
                raise
        return self.apply(obj)

    def take_over_fields(
        self, obj: Mapping[str, Any], resource_version: str, managed_fields: list[Any]
    ) -> None:
        """Replace the managedFields of the stored ``obj`` with ``managed_fields``, unless
        it changed since ``resource_version``."""
        self._writes.labels(verb="patch-managed-fields", resource=obj["kind"]).inc()
        self._call(
            "PATCH", _object_path(obj), content_type="application/json-patch+json",
            body=[
                {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version},
                {"op": "replace", "path": "/metadata/managedFields", "value": managed_fields},
            ],
            query=[("fieldManager", FIELD_MANAGER)],
        )  # fmt: skip

    def remove_fields(
        self, obj: Mapping[str, Any], resource_version: str, pointers: list[str]
    ) -> Any | None:
        """Remove the fields at ``pointers`` (JSON pointers) from the stored ``obj``, unless
        it changed since ``resource_version``; the object as stored then, or None when it
        changed (or is gone)."""
        self._writes.labels(verb="patch-remove", resource=obj["kind"]).inc()
        test = {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version}
        try:
            return self._call(
                "PATCH", _object_path(obj), content_type="application/json-patch+json",
                body=[test, *({"op": "remove", "path": pointer} for pointer in pointers)],
                query=[("fieldManager", FIELD_MANAGER)],
            )  # fmt: skip
        except ApiException as error:
            # 422: the test failed (a newer version is stored); 409: the same, found on
            # the write; 404: deleted meanwhile.
            if error.status in (404, 409, 422):
                return None
            raise

    def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
        """Set a Deployment's spec.replicas and nothing else (a merge patch: an apply of
        the replica count alone would drop every other field gpuyard applied)."""
        self._writes.labels(verb="patch", resource="Deployment").inc()
        try:
            self._call(
                "PATCH", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
                body={"spec": {"replicas": replicas}},
                content_type="application/merge-patch+json",
                query=[("fieldManager", FIELD_MANAGER)],
            )  # fmt: skip
        except ApiException as error:
            if error.status != 404:  # deleted meanwhile: nothing left to scale
                raise

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self._writes.labels(verb="delete", resource=kind).inc()
        path = _object_path(
            {
                "apiVersion": api_version,
                "kind": kind,
                "metadata": {"namespace": namespace, "name": name},
            }
        )
        try:
            self._call("DELETE", path, body={"propagationPolicy": "Background"})
        except ApiException as error:
            if error.status != 404:
                raise

    def patch_status(
        self, plural: str, namespace: str | None, name: str, status: Mapping[str, Any]
    ) -> None:
        """Merge-patch the status subresource of one of our own objects."""
        self._writes.labels(verb="patch-status", resource=plural).inc()
        base = f"/apis/{API_GROUP}/{API_VERSION}"
        scope = f"/namespaces/{namespace}" if namespace else ""
        try:
            self._call(
                "PATCH", f"{base}{scope}/{plural}/{name}/status", body={"status": status},
                content_type="application/merge-patch+json",
            )  # fmt: skip
        except ApiException as error:
            if error.status == 404:  # deleted meanwhile: nothing left to report on
                logger.debug("%s %s/%s is gone; status not written", plural, namespace, name)
                return
            raise

    def set_finalizers(
        self,
        resource: str,
        path: str,
        metadata: Mapping[str, Any],
        finalizers: list[str],
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        """Set the finalizers of the object at ``path`` to ``finalizers``, only if it is
        still the object we saw (its uid) with the finalizers we saw: a JSON patch with
        tests, so a finalizer another controller added meanwhile is never lost (the API
        answers 422 and the caller looks again)."""
        self._writes.labels(verb="patch", resource=resource).inc()
        seen = list(metadata.get("finalizers") or [])
        patch: list[dict[str, Any]] = [
            {"op": "test", "path": "/metadata/uid", "value": metadata["uid"]}
        ]
        if seen:
            patch += [
                {"op": "test", "path": "/metadata/finalizers", "value": seen},
                {"op": "replace", "path": "/metadata/finalizers", "value": finalizers},
            ]
        else:
            # No list to test: the resourceVersion proves nobody added one meanwhile.
            patch += [
                {
                    "op": "test",
                    "path": "/metadata/resourceVersion",
                    "value": metadata["resourceVersion"],
                },
                {"op": "add", "path": "/metadata/finalizers", "value": finalizers},
            ]
        if annotations:
            if metadata.get("annotations"):
                patch += [
                    {"op": "add", "path": f"/metadata/annotations/{_pointer(key)}", "value": value}
                    for key, value in annotations.items()
                ]
            else:
                # A whole new map: the resourceVersion proves there was none meanwhile.
                patch += [
                    {
                        "op": "test",
                        "path": "/metadata/resourceVersion",
                        "value": metadata["resourceVersion"],
                    },
                    {"op": "add", "path": "/metadata/annotations", "value": dict(annotations)},
                ]
        self._call("PATCH", path, body=patch, content_type="application/json-patch+json")

    def get(self, path: str) -> Any | None:
        try:
            return self._call("GET", path)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def post_event(
        self,
        involved: Mapping[str, Any],
        reason: str,
        message: str,
        now: datetime,
        type_: str = "Normal",
    ) -> None:
        """A Kubernetes Event on ``involved``; failures are logged, never raised."""
        meta = involved["metadata"]
        namespace = meta.get("namespace") or "default"
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved["apiVersion"], "kind": involved["kind"],
                "name": meta["name"], "namespace": meta.get("namespace"), "uid": meta["uid"],
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": "gpuyard"},
            "firstTimestamp": now.isoformat().replace("+00:00", "Z"),
            "lastTimestamp": now.isoformat().replace("+00:00", "Z"),
            "count": 1,
            "reportingComponent": "gpuyard",
        }  # fmt: skip
        try:
            self._call("POST", f"/api/v1/namespaces/{namespace}/events", body=event)
        except ApiException as error:
            logger.warning("could not post event %s on %s: %s", reason, meta["name"], error.reason)


_PLURALS = {
    "Deployment": "deployments",
    "Service": "services",
    "ConfigMap": "configmaps",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "ResourceClaimTemplate": "resourceclaimtemplates",
}


def _pointer(key: str) -> str:
    """A map key as one JSON Pointer segment (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def _object_path(obj: Mapping[str, Any]) -> str:
    api_version: str = obj["apiVersion"]
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    meta = obj["metadata"]
    plural = _PLURALS[obj["kind"]]
    namespace = meta.get("namespace")
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"{prefix}{scope}/{plural}/{meta['name']}"
