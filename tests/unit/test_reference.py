"""docs/api.md is generated from the models; it must not drift from them."""

from __future__ import annotations

from pathlib import Path

from gpuyard.api.reference import render_reference

REFERENCE = Path(__file__).parents[2] / "docs" / "api.md"


def test_committed_reference_matches_the_models() -> None:
    assert REFERENCE.read_text() == render_reference(), "run `make crds` to regenerate docs/api.md"


def test_reference_lists_every_spec_field_with_its_description() -> None:
    text = render_reference()
    for field in ("`pool`", "`gpusPerReplica`", "`autoscaling.mode`", "`budget.maxCostPerHour`",
                  "`price.perGpuHour`", "`nodeSelector`"):  # fmt: skip
        assert field in text
    assert "| `minReplicas` | integer |  | `1` |" in text
