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

gpuyard owns the whole pod template of a Deployment it builds, not only the fields it
sets: what another manager added there (a node selector, a container, a toleration, a
volume, an annotation) holds the pods to something their AIService never asked for. The
second check cannot see such fields (extra live fields are normal: defaults), and server-
side apply never removes a field another manager owns. ``foreign_template_fields`` finds
them in ``metadata.managedFields`` (the API server's defaults are owned by nobody, so they
are never among them) for a JSON patch to remove; it also tells when another manager took
a field gpuyard sets (a forced update takes the ownership of what it changes, and an
atomic map such as ``nodeSelector`` with a key added still contains ours), which the
apply takes back. One field is left alone: ``kubectl rollout restart`` stamps
``kubectl.kubernetes.io/restartedAt`` on the template, and removing it would roll the
pods a second time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
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


def updated_beside_applied(managed_fields: Any, manager: str) -> bool:
    """Whether ``manager`` has an ``Update`` entry of the main resource beside its
    ``Apply`` one: a write of its other than an apply recorded fields (a removal whose
    default the API server filled back in, a scale to zero), which its next apply takes
    over (``fields_taken_over``) and, where it does not set them, lets go."""
    operations = {
        entry.get("operation")
        for entry in managed_fields or []
        if isinstance(entry, Mapping)
        and entry.get("manager") == manager
        and not entry.get("subresource")
    }
    return {"Apply", "Update"} <= operations


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


#: The fields of the pod template another manager may keep (``FieldsV1``, relative to the
#: template): the annotation of ``kubectl rollout restart``, whose removal would restart the
#: pods once more.
_KEPT_IN_POD_TEMPLATE: Mapping[str, Any] = {
    "f:metadata": {"f:annotations": {"f:kubectl.kubernetes.io/restartedAt": {}}}
}


@dataclass(frozen=True)
class ForeignFields:
    """What other managers hold of a Deployment's pod template."""

    #: JSON pointers of the fields gpuyard neither sets nor owns, in an order one JSON patch
    #: can remove them in (the later items of a list first).
    removals: list[str]
    #: Whether another manager took a field gpuyard sets: the apply (forced) takes it back.
    taken_from_us: bool


def foreign_template_fields(
    live: Mapping[str, Any], desired: Mapping[str, Any], manager: str
) -> ForeignFields:
    """The fields of ``live``'s pod template that managers other than ``manager`` own.

    Only entries of the main resource count (a subresource such as status or scale holds
    no template). A field that ``desired`` sets, or that ``manager`` owns too, is never
    removed: the apply sets its value.
    """
    entries = [
        (entry, template)
        for entry in (live.get("metadata") or {}).get("managedFields") or []
        if isinstance(entry, Mapping)
        and not entry.get("subresource")
        and (template := _template_fields(entry.get("fieldsV1"))) is not None
    ]
    # One set for all of them, so that one walk orders the removals of a list.
    theirs: dict[str, Any] = {}
    for entry, template in entries:
        if entry.get("manager") != manager and entry.get("apiVersion") == live.get("apiVersion"):
            theirs = _union(theirs, template)
    if not theirs:  # what every reconcile of an untouched Deployment finds
        return ForeignFields([], taken_from_us=False)
    ours: dict[str, Any] = {}
    for entry, template in entries:
        if entry.get("manager") == manager:
            ours = _union(ours, template)
    walk = _Walk()
    walk.visit(
        theirs,
        ours=ours,
        kept=_KEPT_IN_POD_TEMPLATE,
        desired=(desired.get("spec") or {}).get("template"),
        live=(live.get("spec") or {}).get("template"),
        pointer="/spec/template",
    )
    return ForeignFields(walk.removals, walk.taken_from_us)


def _template_fields(fields: Any) -> Mapping[str, Any] | None:
    spec = fields.get("f:spec") if isinstance(fields, Mapping) else None
    template = spec.get("f:template") if isinstance(spec, Mapping) else None
    return template if isinstance(template, Mapping) else None


class _Walk:
    """One walk of other managers' field sets along the live and desired templates."""

    def __init__(self) -> None:
        self.removals: list[str] = []
        self.taken_from_us = False

    def visit(
        self,
        theirs: Mapping[str, Any],
        *,
        ours: Mapping[str, Any] | None,
        kept: Mapping[str, Any] | None,
        desired: Any,
        live: Any,
        pointer: str,
    ) -> None:
        found = []
        for key, below in theirs.items():
            if key == ".":  # the node itself: its parent decides
                continue
            step = _child(live, key, lenient=False)
            if step is None:  # gone already
                continue
            found.append((step, key, below))
        if isinstance(live, list):  # remove a list's later items first: indices hold
            found.sort(key=lambda item: item[0][0], reverse=True)
        for (segment, live_value), key, below in found:
            here = f"{pointer}/{segment}"
            our_value = ours.get(key) if ours is not None else None
            kept_value = kept.get(key) if kept is not None else None
            if kept_value is not None and not _present(kept_value, live_value):
                kept_value = None  # nothing kept is there: the node may go whole
            wanted = _child(desired, key, lenient=True)
            if our_value is None and kept_value is None and wanted is None:
                if not below or "." in below:
                    self.removals.append(here)  # the whole node is theirs
                else:  # the node was there before them: only what they added goes
                    self.visit(
                        below, ours=None, kept=None, desired=None, live=live_value, pointer=here
                    )
            elif below and isinstance(below, Mapping):
                self.visit(
                    below,
                    ours=our_value,
                    kept=kept_value,
                    desired=wanted[1] if wanted is not None else None,
                    live=live_value,
                    pointer=here,
                )
            elif wanted is not None and our_value is None:
                self.taken_from_us = True


def _present(fields: Mapping[str, Any], value: Any) -> bool:
    """Whether ``value`` holds any field of the set ``fields`` (``{}``: ``value`` itself)."""
    if not fields:
        return True
    for key, below in fields.items():
        step = _child(value, key, lenient=False)
        if step is not None and _present(below, step[1]):
            return True
    return False


def _child(value: Any, key: str, *, lenient: bool) -> tuple[Any, Any] | None:
    """The JSON pointer segment and value that ``FieldsV1`` key ``key`` names in ``value``;
    None when there is none.

    ``lenient`` matches a list item by the key fields it has: a desired object leaves out
    what the API server defaults (a port's protocol), which the key of a live item holds.
    """
    kind, _, name = key.partition(":")
    if kind == "f":
        found = isinstance(value, Mapping) and name in value
        return (_escape(name), value[name]) if found else None
    try:
        wanted = json.loads(name)  # i:3, v:"value", k:{"name":"x"}
    except ValueError:
        return None
    return _item(value, kind, wanted, lenient=lenient) if isinstance(value, list) else None


def _item(items: list[Any], kind: str, wanted: Any, *, lenient: bool) -> tuple[int, Any] | None:
    """The index and item of ``items`` that an ``i:``, ``v:`` or ``k:`` key names."""
    if kind == "i":
        found = isinstance(wanted, int) and 0 <= wanted < len(items)
        return (wanted, items[wanted]) if found else None
    for index, item in enumerate(items):
        if kind == "v" and item == wanted:
            return index, item
        if kind == "k" and isinstance(item, Mapping) and isinstance(wanted, Mapping):
            present = [field for field in wanted if field in item] if lenient else list(wanted)
            if present and all(item.get(field) == wanted[field] for field in present):
                return index, item
    return None


def _escape(name: str) -> str:
    """A map key as one JSON Pointer segment (RFC 6901)."""
    return name.replace("~", "~0").replace("/", "~1")
