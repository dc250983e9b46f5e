"""Does a child in the cluster still hold what gpuyard applied? Pure, so it is unit-tested.

A reconcile with nothing to do must make no write call, yet a hand edit of a field
gpuyard owns must be reverted. Two checks decide whether to apply again:

1. The child carries the hash of the desired object as an annotation. A change of the
   desired object (including a field gpuyard stops setting, which server-side apply then
   removes) changes the hash.
2. Every field of the desired object has the same value in the live object. The API
   server adds defaults and other managers add fields; those are not drift. A value
   someone changed, or a field of ours someone removed, is.

A missing child is created with a plain create, which records its fields as gpuyard's
with operation ``Update``; server-side apply would leave such fields behind when gpuyard
stops setting them. Before the first apply, ``fields_taken_over`` moves them to gpuyard's
``Apply`` entry, as client-go's ``csaupgrade`` does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

APPLIED_HASH_ANNOTATION = "gpuyard.io/applied-hash"

_SUFFIXES = {
    "m": Decimal("0.001"), "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9),
    "T": Decimal(10**12), "P": Decimal(10**15), "E": Decimal(10**18),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
    "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}  # fmt: skip


def with_applied_hash(desired: Mapping[str, Any]) -> dict[str, Any]:
    """``desired`` with the hash of its own content in an annotation."""
    digest = hashlib.sha256(json.dumps(desired, sort_keys=True).encode()).hexdigest()[:16]
    metadata = dict(desired.get("metadata", {}))
    metadata["annotations"] = {**metadata.get("annotations", {}), APPLIED_HASH_ANNOTATION: digest}
    return {**desired, "metadata": metadata}


def needs_apply(desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> bool:
    """Whether server-side apply of ``desired`` (made by ``with_applied_hash``) would change
    ``live``."""
    if live is None:
        return True
    wanted_hash = desired.get("metadata", {}).get("annotations", {}).get(APPLIED_HASH_ANNOTATION)
    live_hash = (live.get("metadata", {}).get("annotations") or {}).get(APPLIED_HASH_ANNOTATION)
    return wanted_hash != live_hash or not contains(live, desired)


def contains(live: Any, desired: Any) -> bool:
    """Whether every field of ``desired`` has the same value in ``live``."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(
            contains(live[key], value) if key in live else _omitted_when_empty(value)
            for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(contains(a, b) for a, b in zip(live, desired, strict=True))
        )
    if desired == live:
        return True
    # The API server stores quantities canonically ("0.5" comes back as "500m").
    return _quantity(desired) is not None and _quantity(desired) == _quantity(live)


def _omitted_when_empty(value: Any) -> bool:
    # Most Kubernetes fields are `omitempty`: a 0, "", false or empty list we set comes
    # back absent, and that is no drift.
    return value in (0, "", False, None, [], {})


def _quantity(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value)
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            number, factor = text[: -len(suffix)], _SUFFIXES[suffix]
            break
    else:
        number, factor = text, Decimal(1)
    try:
        return Decimal(number) * factor
    except InvalidOperation:
        return None


def fields_taken_over(managed_fields: Any, manager: str) -> list[dict[str, Any]] | None:
    """``managed_fields`` with ``manager``'s ``Update`` entries of the main resource (its
    create, say) merged into its ``Apply`` entry; None when it has no such entry.

    Server-side apply removes a field only from the set of the ``Apply`` entry: a field
    gpuyard created and then stops setting must be in that set to go.
    """
    entries = [dict(entry) for entry in managed_fields or [] if isinstance(entry, Mapping)]

    def ours(entry: Mapping[str, Any], operation: str) -> bool:
        return (
            entry.get("manager") == manager
            and entry.get("operation") == operation
            and not entry.get("subresource")
        )

    updates = [entry for entry in entries if ours(entry, "Update")]
    if not updates:
        return None
    applied = next((entry for entry in entries if ours(entry, "Apply")), None)
    merged = {
        **updates[0],
        **(applied or {}),
        "operation": "Apply",
        "fieldsType": "FieldsV1",
        "fieldsV1": {},
    }
    for entry in [*updates, *([applied] if applied else [])]:
        merged["fieldsV1"] = _union(merged["fieldsV1"], entry.get("fieldsV1") or {})
    anchor = applied or updates[0]  # the merged entry stands where the Apply one did
    result: list[dict[str, Any]] = []
    for entry in entries:
        if entry is anchor:
            result.append(merged)
        elif entry is not applied and not ours(entry, "Update"):
            result.append(entry)
    return result


def _union(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """The union of two field sets (``FieldsV1``: nested objects, ``{}`` for a leaf)."""
    merged = dict(a)
    for key, value in b.items():
        before = merged.get(key)
        merged[key] = (
            _union(before, value)
            if isinstance(before, Mapping) and isinstance(value, Mapping)
            else value
        )
    return merged
