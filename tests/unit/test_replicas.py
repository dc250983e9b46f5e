"""The replica count a reconcile applies, per autoscaling mode, from what it knows."""

from __future__ import annotations

import pytest
from sample_objects import service_spec

from gpuyard.api.service import AIServiceSpec
from gpuyard.logic.replicas import target_replicas

PROMETHEUS_METRIC = {
    "type": "Prometheus",
    "prometheus": {"metric": "vllm:num_requests_waiting", "targetPerReplica": "4"},
}


def spec(mode: str, min_replicas: int, max_replicas: int, replicas: int | None) -> AIServiceSpec:
    overrides: dict[str, object] = {
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "autoscaling": {"mode": mode},
    }
    if mode != "Off":
        overrides["autoscaling"] = {"mode": mode, "metrics": [PROMETHEUS_METRIC]}
    if replicas is not None:
        overrides["replicas"] = replicas
    return AIServiceSpec.from_mapping(service_spec(**overrides))


# mode, (min, max), spec.replicas, (decided, persisted, live) -> expected
CASES = [
    # Off: spec.replicas (the scale subresource) wins over everything, unclamped.
    pytest.param("Off", (1, 4), 3, (5, 2, 1), 3, id="off-spec-replicas-wins"),
    pytest.param("Off", (1, 4), 0, (None, None, 2), 0, id="off-scaled-to-zero-below-min"),
    pytest.param("Off", (1, 4), 10, (None, None, None), 10, id="off-above-max-is-the-users-call"),
    pytest.param("Off", (1, 4), None, (3, 4, 2), 2, id="off-unset-keeps-what-runs"),
    pytest.param("Off", (2, 4), None, (None, None, None), 2, id="off-unset-nothing-runs-min"),
    pytest.param("Off", (1, 4), 3, (None, None, None), 3, id="off-new-service"),
    # Auto: the autoscaler's decision; before one, what status last said; then what runs.
    pytest.param("Auto", (1, 4), None, (3, 2, 1), 3, id="auto-decided"),
    pytest.param("Auto", (1, 4), None, (6, None, None), 6, id="auto-decided-is-not-clamped"),
    pytest.param("Auto", (0, 4), None, (0, 2, 2), 0, id="auto-decided-zero"),
    pytest.param("Auto", (1, 4), None, (None, 3, 1), 3, id="auto-persisted-after-restart"),
    pytest.param("Auto", (1, 4), None, (None, 9, None), 4, id="auto-persisted-clamped-to-max"),
    pytest.param("Auto", (2, 4), None, (None, 0, None), 2, id="auto-persisted-clamped-to-min"),
    pytest.param("Auto", (1, 4), None, (None, None, 2), 2, id="auto-live-when-nothing-persisted"),
    pytest.param("Auto", (1, 4), None, (None, None, 7), 4, id="auto-live-clamped"),
    pytest.param("Auto", (2, 4), None, (None, None, None), 2, id="auto-new-service-min"),
    pytest.param("Auto", (1, 4), 3, (None, None, 2), 2, id="auto-ignores-spec-replicas"),
    # Recommend: the autoscaler only recommends; what runs stays, within bounds.
    pytest.param("Recommend", (1, 4), None, (3, 4, 2), 2, id="recommend-keeps-what-runs"),
    pytest.param("Recommend", (1, 4), None, (None, 3, None), 1, id="recommend-ignores-persisted"),
    pytest.param("Recommend", (1, 4), None, (None, None, 9), 4, id="recommend-live-clamped-to-max"),
    pytest.param("Recommend", (2, 4), None, (None, None, 0), 2, id="recommend-live-clamped-to-min"),
    pytest.param("Recommend", (1, 4), 3, (None, None, 2), 2, id="recommend-ignores-spec-replicas"),
]


@pytest.mark.parametrize(("mode", "bounds", "replicas", "known", "want"), CASES)
def test_target_replicas(
    mode: str,
    bounds: tuple[int, int],
    replicas: int | None,
    known: tuple[int | None, int | None, int | None],
    want: int,
) -> None:
    decided, persisted, live = known
    service = spec(mode, *bounds, replicas)

    assert target_replicas(service, decided=decided, persisted=persisted, live=live) == want
