"""How many replicas the Deployment gets, before the autoscaler has said anything."""

from __future__ import annotations

from gpuyard.api.service import AIServiceSpec


def target_replicas(
    spec: AIServiceSpec,
    *,
    decided: int | None,
    persisted: int | None,
    live: int | None,
) -> int:
    """The replica count to apply.

    - Mode ``Off``: ``spec.replicas`` (the scale subresource, driven by ``kubectl scale``,
      an HPA or KEDA), not clamped: an explicit count is the user's call. Unset: what
      runs now, else ``minReplicas``.
    - Mode ``Auto``: the autoscaler's decision (``decided``), which already applies
      bounds, capacity and budget. Before its first decision after a start: the last
      decision written to status (``persisted``), so a restart changes nothing.
    - Mode ``Recommend``: what runs now; the autoscaler only writes recommendations.

    Counts not from the autoscaler are clamped to ``[minReplicas, maxReplicas]``.
    """
    mode = spec.autoscaling.mode
    if mode == "Off":
        if spec.replicas is not None:
            return spec.replicas
        return live if live is not None else spec.min_replicas
    if mode == "Auto" and decided is not None:
        return decided
    fallback = persisted if mode == "Auto" and persisted is not None else live
    if fallback is None:
        fallback = spec.min_replicas
    return max(spec.min_replicas, min(spec.max_replicas, fallback))
