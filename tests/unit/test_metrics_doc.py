"""docs/metrics.md lists the operator's metrics; it must name each one the code registers."""

from __future__ import annotations

import re
from pathlib import Path

from gpuyard.io.metrics import OperatorMetrics

DOC = Path(__file__).parents[2] / "docs" / "metrics.md"


def test_the_doc_lists_exactly_the_registered_metrics() -> None:
    registered = {family.name for family in OperatorMetrics().registry.collect()}
    # prometheus_client names counter families without their _total suffix.
    documented = {
        re.sub(r"_total$", "", name)
        for name in re.findall(r"^\| `(gpuyard_\w+)`", DOC.read_text(), re.M)
    }
    assert documented == registered
