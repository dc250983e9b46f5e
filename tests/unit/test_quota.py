"""The namespace quota on a pool, at every replica change (logic.quota)."""

from __future__ import annotations

import pytest

from gpuyard.logic.conditions import quota_condition
from gpuyard.logic.quota import NO_QUOTA, QuotaClaim, fair_quota_shares, quota_verdict


def claim(key: str, wanted: int, held: int = 0, gpus: int = 1) -> QuotaClaim:
    return QuotaClaim(key=key, gpus_per_replica=gpus, wanted_replicas=wanted, held_gpus=held)


@pytest.mark.parametrize(
    ("quota", "claims", "expected"),
    [
        pytest.param(4, [claim("a", 4), claim("b", 4)], {"a": 2, "b": 2}, id="two-share-evenly"),
        pytest.param(4, [claim("a", 1), claim("b", 4)], {"a": 1, "b": 3}, id="rest-to-the-greedy"),
        pytest.param(
            5, [claim("a", 4, gpus=2), claim("b", 4)], {"a": 1, "b": 3}, id="max-min-on-gpus"
        ),
        pytest.param(1, [claim("a", 3, gpus=2), claim("b", 3)], {"a": 0, "b": 1}, id="too-big"),
        pytest.param(0, [claim("a", 2)], {"a": 0}, id="quota-zero"),
        pytest.param(-2, [claim("a", 2)], {"a": 0}, id="unmanaged-over-quota"),
        pytest.param(3, [claim("a", 0), claim("b", 5)], {"a": 0, "b": 3}, id="idle-leaves-all"),
    ],
)
def test_fair_shares(quota: int, claims: list[QuotaClaim], expected: dict[str, int]) -> None:
    assert fair_quota_shares(quota, claims) == expected
    assert fair_quota_shares(quota, list(reversed(claims))) == expected


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        fair_quota_shares(2, [claim("a", 1), claim("a", 2)])


def test_no_quota_limits_nothing() -> None:
    assert quota_verdict(None, key="a", claims=[claim("a", 50)], unmanaged_gpus=9) == NO_QUOTA


@pytest.mark.parametrize(
    ("quota", "claims", "unmanaged", "allowed", "missing"),
    [
        pytest.param(2, [claim("a", 4, held=1)], 0, 2, 2, id="scaled-past-quota-is-clamped"),
        pytest.param(4, [claim("a", 3, held=3)], 0, 3, 0, id="within-quota"),
        pytest.param(2, [claim("a", 4, held=4)], 0, 2, 2, id="quota-lowered-cuts-running"),
        pytest.param(0, [claim("a", 1, held=1)], 0, 0, 1, id="quota-lowered-to-zero"),
        pytest.param(3, [claim("a", 3)], 2, 1, 2, id="unmanaged-pods-come-first"),
        pytest.param(
            4, [claim("a", 4, held=2), claim("b", 4, held=2)], 0, 2, 2, id="two-at-fair-share"
        ),
        pytest.param(
            4, [claim("a", 4, held=0), claim("b", 4, held=4)], 0, 0, 4, id="waits-for-sibling"
        ),
        pytest.param(
            4, [claim("a", 4, held=4), claim("b", 4, held=0)], 0, 2, 2, id="sibling-takes-back"
        ),
        pytest.param(
            4, [claim("a", 4, held=0), claim("b", 1, held=1)], 0, 3, 1, id="idle-sibling-leaves"
        ),
    ],
)
def test_verdict(
    quota: int, claims: list[QuotaClaim], unmanaged: int, allowed: int, missing: int
) -> None:
    verdict = quota_verdict(quota, key="a", claims=claims, unmanaged_gpus=unmanaged)
    assert verdict.max_replicas == allowed
    assert verdict.missing_gpus == missing
    assert verdict.limited is (missing > 0)


def test_the_sum_never_exceeds_the_quota_whatever_order_the_services_reconcile() -> None:
    # Two services of 1 and 2 GPUs per replica, each reconciling in turn applies its verdict
    # as its new holding; at no step may the namespace hold more than the quota.
    quota = 7
    wants = {"a": 9, "b": 9}
    gpus = {"a": 1, "b": 2}
    held = {"a": 7, "b": 0}  # a grabbed it all before b came
    for turn in ["b", "a", "b", "a", "b", "b", "a"]:
        claims = [claim(k, wants[k], held=held[k], gpus=gpus[k]) for k in wants]
        verdict = quota_verdict(quota, key=turn, claims=claims, unmanaged_gpus=0)
        assert verdict.max_replicas is not None
        held[turn] = verdict.max_replicas * gpus[turn]
        assert sum(held.values()) <= quota
    assert held == {"a": 3, "b": 4}  # max-min fair on GPUs: 3 + 2x2


def test_the_condition_says_how_many_gpus_are_missing() -> None:
    verdict = quota_verdict(2, key="a", claims=[claim("a", 4, held=1)], unmanaged_gpus=0)
    limited = quota_condition(
        verdict, quota=2, wanted_replicas=4, namespace="team", pool_name="l4", resource_name="gpu"
    )
    assert limited is not None
    assert (limited.type, limited.status, limited.reason) == (
        "QuotaLimited",
        "True",
        "QuotaCapsReplicas",
    )
    assert "4 replicas wanted, 2 allowed" in limited.message
    assert "lacks 2" in limited.message


def test_the_condition_is_false_within_the_quota_and_absent_without_one() -> None:
    verdict = quota_verdict(4, key="a", claims=[claim("a", 2)], unmanaged_gpus=0)
    within = quota_condition(
        verdict, quota=4, wanted_replicas=2, namespace="team", pool_name="l4", resource_name="gpu"
    )
    assert within is not None
    assert (within.status, within.reason) == ("False", "WithinQuota")
    assert (
        quota_condition(
            NO_QUOTA, quota=None, wanted_replicas=2, namespace="t", pool_name="p", resource_name="g"
        )
        is None
    )


def test_the_condition_explains_a_share_held_by_a_sibling() -> None:
    claims = [claim("a", 4), claim("b", 4, held=4)]
    verdict = quota_verdict(4, key="a", claims=claims, unmanaged_gpus=0)
    assert verdict.waits_for_siblings
    limited = quota_condition(
        verdict, quota=4, wanted_replicas=4, namespace="team", pool_name="l4", resource_name="gpu"
    )
    assert limited is not None
    assert "fair share is 2" in limited.message
