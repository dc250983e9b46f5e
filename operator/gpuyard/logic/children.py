"""The Kubernetes objects an AIService owns, as plain dicts ready for server-side apply.

A builder returns the whole desired object and nothing the operator does not mean to own:
server-side apply computes the difference with what exists, so no spec hash and no
read-modify-write are needed, and a field the builder stops setting is removed.

Security choices for pods the operator creates on a tenant's behalf:
- privilege escalation is off, every capability is dropped and the runtime's default seccomp
  profile applies, so the pods pass the Pod Security "baseline" level and most of
  "restricted";
- `runAsNonRoot` is *not* forced: most published inference images (vLLM, Triton, TGI) run as
  root, and forcing it would leave them failing with CreateContainerConfigError. A cluster
  that wants non-root everywhere enforces Pod Security "restricted" on the namespace, which
  then requires images that declare a non-root user;
- no service-account token is mounted (the workload never needs the Kubernetes API) and no
  service-link environment variables are injected (they leak other Services' addresses and
  slow pod start in big namespaces).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from gpuyard import API_GROUP, API_VERSION, FIELD_MANAGER
from gpuyard.api.names import POOL_LABEL, SERVICE_LABEL
from gpuyard.api.pool import GPUPool
from gpuyard.api.service import KIND as SERVICE_KIND
from gpuyard.api.service import AIService, ContainerSpec
from gpuyard.api.workload import Probe
from gpuyard.logic.devices import device_selector_cel

#: Name of the single container in every replica.
CONTAINER_NAME = "inference"
#: Name of the container port and of the Service port that targets it.
PORT_NAME = "http"
COMPONENT = "inference"

NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"

#: The pod's one ResourceClaim (from the service's ResourceClaimTemplate), the request in
#: that claim, and what the GPU container names in resources.claims: one name for all three.
CLAIM_NAME = "gpus"
#: Hex digits of the claim spec's hash in the template's name (see `claim_template_name`).
CLAIM_TEMPLATE_HASH_DIGITS = 10
DRA_API_VERSION = "resource.k8s.io/v1"

#: Old ReplicaSets only serve rollbacks; a few suffice, and each one is an object in etcd.
REVISION_HISTORY_LIMIT = 3


def owner_reference(service: AIService) -> dict[str, Any]:
    """The owner reference that makes a child part of `service`: the garbage collector
    deletes it with the service, and only one controller may claim it."""
    if not service.metadata.uid:
        msg = f"AIService {service.namespace}/{service.name} has no uid; read it from the API"
        raise ValueError(msg)
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": SERVICE_KIND,
        "name": service.name,
        "uid": service.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def selector_labels(service: AIService) -> dict[str, str]:
    """Labels that select the service's pods. A Deployment's selector is immutable, so this
    holds only what never changes for a given service: its name."""
    return {SERVICE_LABEL: service.name, INSTANCE_LABEL: service.name}


def selector_string(service: AIService) -> str:
    """The pod selector in the string form status.selector (and the scale subresource) use."""
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(service).items()))


def child_labels(service: AIService, pool: GPUPool) -> dict[str, str]:
    """Labels on every child and on the pods."""
    return {
        NAME_LABEL: service.name,
        INSTANCE_LABEL: service.name,
        COMPONENT_LABEL: COMPONENT,
        MANAGED_BY_LABEL: FIELD_MANAGER,
        SERVICE_LABEL: service.name,
        POOL_LABEL: pool.name,
    }


def _metadata(service: AIService, pool: GPUPool, owner: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": service.name,
        "namespace": service.namespace,
        "labels": child_labels(service, pool),
        "ownerReferences": [owner],
    }


def _resources(service: AIService, pool: GPUPool) -> dict[str, Any]:
    # Requests equal limits: an extended resource must be requested exactly as limited
    # anyway, and equal CPU and memory make the pod Guaranteed, so the kubelet evicts it last
    # under node pressure; evicting a pod that holds GPUs wastes the most money.
    # Quantities are strings, as the API server returns them, so a built object compares
    # equal to the one read back.
    # A ClaimTemplate pool's GPUs come through the pod's ResourceClaim, not an extended
    # resource; an ExtendedResource pool's are asked for by name, exactly as a device
    # plugin's (the scheduler serves the name from the DeviceClass that maps it).
    amounts = {}
    if claim_template_name(service, pool) is None:
        amounts[pool.spec.resource_name] = str(service.spec.gpus_per_replica)
    resources = service.spec.container.resources
    if resources is not None:
        if resources.cpu is not None:
            amounts["cpu"] = resources.cpu
        if resources.memory is not None:
            amounts["memory"] = resources.memory
        if resources.ephemeral_storage is not None:
            amounts["ephemeral-storage"] = resources.ephemeral_storage
    built: dict[str, Any] = {"limits": dict(amounts), "requests": dict(amounts)}
    if claim_template_name(service, pool) is not None:
        built["claims"] = [{"name": CLAIM_NAME}]
    return built


def _probe(probe: Probe | None, container: ContainerSpec) -> dict[str, Any] | None:
    if probe is None:
        return None
    built: dict[str, Any] = {}
    port = probe.port() if probe.port() is not None else container.port
    if probe.http_get is not None:
        built["httpGet"] = {"path": probe.http_get.path, "port": port}
    elif probe.tcp_socket is not None:
        built["tcpSocket"] = {"port": port}
    elif probe.exec_action is not None:
        built["exec"] = {"command": list(probe.exec_action.command)}
    built.update(
        initialDelaySeconds=probe.initial_delay_seconds,
        periodSeconds=probe.period_seconds,
        timeoutSeconds=probe.timeout_seconds,
        failureThreshold=probe.failure_threshold,
    )
    return built


def _env(spec: ContainerSpec) -> list[dict[str, Any]]:
    # Models serialise with their aliases and without unset fields: exactly the core/v1
    # shapes, since the API models mirror them field for field.
    return [variable.to_json() for variable in spec.env or ()]


def _container_security_context(spec: ContainerSpec) -> dict[str, Any]:
    # Whatever the tenant says, privilege escalation stays off and every capability is
    # dropped: the spec has no field that could add one back.
    context: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    asked = spec.security_context
    if asked is not None:
        for field, value in {
            "runAsUser": asked.run_as_user,
            "runAsGroup": asked.run_as_group,
            "runAsNonRoot": asked.run_as_non_root,
            "readOnlyRootFilesystem": asked.read_only_root_filesystem,
        }.items():
            if value is not None:
                context[field] = value
    return context


def _container(service: AIService, pool: GPUPool) -> dict[str, Any]:
    spec = service.spec.container
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "resources": _resources(service, pool),
        "securityContext": _container_security_context(spec),
        # The last log lines become the termination message, so `kubectl describe` shows why
        # a model server crashed without a trip to the logs.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.command:
        container["command"] = list(spec.command)
    if spec.args:
        container["args"] = list(spec.args)
    if spec.env:
        container["env"] = _env(spec)
    if spec.env_from:
        container["envFrom"] = [source.to_json() for source in spec.env_from]
    if spec.port is not None:
        container["ports"] = [
            {"name": PORT_NAME, "containerPort": spec.port, "protocol": "TCP"},
        ]
    for field, probe in {
        "readinessProbe": spec.readiness_probe,
        "livenessProbe": spec.liveness_probe,
        "startupProbe": spec.startup_probe,
    }.items():
        built = _probe(probe, spec)
        if built is not None:
            container[field] = built
    if spec.volume_mounts:
        container["volumeMounts"] = [mount.to_json() for mount in spec.volume_mounts]
    return container


def _pod_security_context(service: AIService) -> dict[str, Any]:
    context: dict[str, Any] = {"seccompProfile": {"type": "RuntimeDefault"}}
    asked = service.spec.container.security_context
    if asked is not None and asked.fs_group is not None:
        context["fsGroup"] = asked.fs_group
    return context


def _pod_spec(service: AIService, pool: GPUPool) -> dict[str, Any]:
    spec = service.spec
    pod: dict[str, Any] = {
        "containers": [_container(service, pool)],
        "nodeSelector": dict(pool.spec.node_selector),
        "automountServiceAccountToken": spec.automount_service_account_token,
        "enableServiceLinks": False,
        "securityContext": _pod_security_context(service),
    }
    template = claim_template_name(service, pool)
    if template is not None:
        pod["resourceClaims"] = [{"name": CLAIM_NAME, "resourceClaimTemplateName": template}]
    if pool.spec.tolerations:
        pod["tolerations"] = [toleration.to_json() for toleration in pool.spec.tolerations]
    if spec.volumes:
        pod["volumes"] = [volume.to_json() for volume in spec.volumes]
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [secret.to_json() for secret in spec.image_pull_secrets]
    if spec.service_account_name is not None:
        pod["serviceAccountName"] = spec.service_account_name
    if spec.termination_grace_period_seconds is not None:
        pod["terminationGracePeriodSeconds"] = spec.termination_grace_period_seconds
    if spec.priority_class_name is not None:
        pod["priorityClassName"] = spec.priority_class_name
    return pod


def _pod_metadata(service: AIService, pool: GPUPool) -> dict[str, Any]:
    # The tenant's labels go first so that gpuyard's own always win; the API refuses keys
    # in gpuyard's and Kubernetes' domains anyway, so none could collide.
    metadata: dict[str, Any] = {
        "labels": {**(service.spec.pod_labels or {}), **child_labels(service, pool)}
    }
    if service.spec.pod_annotations:
        metadata["annotations"] = dict(service.spec.pod_annotations)
    return metadata


def build_deployment(
    service: AIService, pool: GPUPool, replicas: int, owner: dict[str, Any]
) -> dict[str, Any]:
    """The Deployment running `replicas` replicas of `service` on `pool`'s nodes.

    `owner` is the service's owner reference (see `owner_reference`).
    """
    if replicas < 0:
        msg = f"replicas must not be negative, got {replicas}"
        raise ValueError(msg)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(service, pool, owner),
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": REVISION_HISTORY_LIMIT,
            "selector": {"matchLabels": selector_labels(service)},
            # No surge: a surge pod needs GPUs the pool may not have, and a rollout waiting
            # for them never finishes. Replacing one replica at a time needs none.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
            },
            "template": {
                # No finalizer here: the meter puts its own on every pod it bills (this
                # one's and a bare pod's alike) and takes it off after the last second, so
                # nothing is left holding pods once gpuyard is uninstalled.
                "metadata": _pod_metadata(service, pool),
                "spec": _pod_spec(service, pool),
            },
        },
    }


def build_service(
    service: AIService, pool: GPUPool, owner: dict[str, Any]
) -> dict[str, Any] | None:
    """The ClusterIP Service in front of the replicas, or None when the container has no port
    (the caller then deletes a Service left from an earlier spec)."""
    port = service.spec.container.port
    if port is None:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(service, pool, owner),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(service),
            "ports": [
                {"name": PORT_NAME, "port": port, "targetPort": PORT_NAME, "protocol": "TCP"},
            ],
        },
    }


def build_disruption_budget(
    service: AIService, pool: GPUPool, owner: dict[str, Any]
) -> dict[str, Any] | None:
    """The PodDisruptionBudget of the replicas, or None when the service never runs more
    than one or its owner turned the budget off (the caller then deletes a budget left from
    an earlier spec). With one replica a budget could only block a node drain or let the
    replica go; it would protect nothing."""
    budget = service.spec.disruption_budget
    if not budget.enabled or service.spec.max_replicas <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(service, pool, owner),
        "spec": {
            "maxUnavailable": budget.max_unavailable,
            "selector": {"matchLabels": selector_labels(service)},
            # A replica still loading its model (or crash-looping) serves nothing: evicting
            # it costs no capacity, and a budget that counted it would block a drain.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def _claim_spec(service: AIService, pool: GPUPool) -> dict[str, Any] | None:
    """What each replica's ResourceClaim asks for, or None when the pool's pods get their
    GPUs without a template (a device-plugin pool, or DRA through an extended resource)."""
    devices = pool.spec.devices
    if devices is None or devices.request != "ClaimTemplate":
        return None
    exactly: dict[str, Any] = {
        "deviceClassName": devices.device_class_name,
        "allocationMode": "ExactCount",
        "count": service.spec.gpus_per_replica,
    }
    expression = device_selector_cel(devices)
    if expression is not None:
        exactly["selectors"] = [{"cel": {"expression": expression}}]
    return {"devices": {"requests": [{"name": CLAIM_NAME, "exactly": exactly}]}}


def claim_template_name(service: AIService, pool: GPUPool) -> str | None:
    """The name of the service's ResourceClaimTemplate, or None when it needs none.

    A template's spec is immutable, so a change of what a replica claims (GPUs per replica,
    the pool's class or selector) is a new template: the name ends in a hash of the claim,
    the pod template names the new one, the Deployment rolls out, and the old template is
    deleted once no pod of the old revision can come back (see `stale_claim_templates`).
    """
    claim = _claim_spec(service, pool)
    if claim is None:
        return None
    canonical = json.dumps(claim, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:CLAIM_TEMPLATE_HASH_DIGITS]
    return f"{service.name}-{digest}"


def build_claim_template(
    service: AIService, pool: GPUPool, owner: dict[str, Any]
) -> dict[str, Any] | None:
    """The ResourceClaimTemplate each replica's claim is made from, or None when the pool's
    pods need none. Owned by the service (garbage-collected with it) and labelled like every
    child, so the operator's cache, its admission policy and `kubectl -l` find it."""
    claim = _claim_spec(service, pool)
    name = claim_template_name(service, pool)
    if claim is None or name is None:
        return None
    labels = child_labels(service, pool)
    return {
        "apiVersion": DRA_API_VERSION,
        "kind": "ResourceClaimTemplate",
        "metadata": {**_metadata(service, pool, owner), "name": name},
        # The claims carry the service's labels too: `kubectl get resourceclaims -l` finds
        # a service's claims, and so can a cluster administrator's quota or audit tooling.
        "spec": {"metadata": {"labels": labels}, "spec": claim},
    }


def _template_in_use(deployment: dict[str, Any]) -> str | None:
    pod = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
    for claim in pod.get("resourceClaims") or ():
        if claim.get("name") == CLAIM_NAME:
            return str(claim.get("resourceClaimTemplateName") or "") or None
    return None


def rollout_complete(deployment: dict[str, Any], template: str | None) -> bool:
    """Whether every pod of `deployment` is of a pod template that names the claim template
    `template` (None: no template): the stored Deployment names it, its controller saw that
    generation, and no replica of an older ReplicaSet is left."""
    if _template_in_use(deployment) != template:
        return False
    status = deployment.get("status") or {}
    generation = (deployment.get("metadata") or {}).get("generation")
    if generation is None or int(status.get("observedGeneration") or 0) < int(generation):
        return False
    return int(status.get("updatedReplicas") or 0) >= int(status.get("replicas") or 0)


def stale_claim_templates(
    wanted: str | None, live_names: list[str], deployment: dict[str, Any] | None
) -> list[str]:
    """The service's templates to delete: every one but `wanted`, once the Deployment has
    rolled out to `wanted`. Not before: a pod of an older ReplicaSet that is recreated
    meanwhile (evicted, its node lost) needs its own template for its claim."""
    stale = sorted(name for name in live_names if name != wanted)
    if not stale or deployment is None or not rollout_complete(deployment, wanted):
        return []
    return stale
