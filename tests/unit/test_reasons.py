"""The recommendation's reasons and limits as the docs name them: docs/api.md and the CRDs
(both copies) must name exactly the words the autoscaler emits, which are the members of
gpuyard.api.reasons (Decision.reason and .limiting_factor are typed by these enums)."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path

import pytest
import yaml

from gpuyard.api.reasons import LimitingFactor, Reason, word_list

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_FILES = (
    REPO_ROOT / "crds" / "gpuyard.io_aiservices.yaml",
    REPO_ROOT / "charts" / "gpuyard" / "files" / "crds" / "gpuyard.io_aiservices.yaml",
)
# Reasons and limits are capitalised words (`IdleScaleToZero`, `Budget`); the first word of
# a description starts its sentence and is not one.
CAPITALISED_WORD = re.compile(r"\b[A-Z][A-Za-z0-9]*\b")
FIELDS: dict[str, type[StrEnum]] = {"reason": Reason, "limitedBy": LimitingFactor}


def named_words(description: str) -> set[str]:
    return set(CAPITALISED_WORD.findall(description.split(maxsplit=1)[1]))


def api_md_description(field: str) -> str:
    prefix = f"| `recommendation.{field}` |"
    rows = [line for line in (REPO_ROOT / "docs" / "api.md").read_text().splitlines()
            if line.startswith(prefix)]  # fmt: skip
    assert len(rows) == 1, f"docs/api.md has no single row for recommendation.{field}"
    # | field | type | required | default | description | rules |
    return rows[0].split(" | ")[4]


def crd_description(path: Path, field: str) -> str:
    (crd,) = yaml.safe_load_all(path.read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    description: str = status["properties"]["recommendation"]["properties"][field]["description"]
    return description


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_api_reference_names_exactly_the_emitted_words(field: str) -> None:
    emitted = {member.value for member in FIELDS[field]}
    assert named_words(api_md_description(field)) == emitted


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
@pytest.mark.parametrize("field", sorted(FIELDS))
def test_crd_names_exactly_the_emitted_words(path: Path, field: str) -> None:
    emitted = {member.value for member in FIELDS[field]}
    assert named_words(crd_description(path, field)) == emitted


def test_the_old_examples_would_have_been_caught() -> None:
    # What the reference said before the words came from the enums.
    old_reason = "CamelCase reason, such as MetricAboveTarget or ScaleToZeroIdle."
    old_limit = (
        "The limit that cut the raw recommendation, such as MaxReplicas, PoolCapacity or Budget."
    )
    assert named_words(old_reason) - {member.value for member in Reason} == {"ScaleToZeroIdle"}
    assert named_words(old_limit) - {member.value for member in LimitingFactor} == {"PoolCapacity"}


def test_word_list_reads_as_prose() -> None:
    assert word_list(LimitingFactor).endswith("Budget, Capacity or Quota")
    assert word_list(Reason).startswith("MetricAboveTarget, MetricBelowTarget, ")
