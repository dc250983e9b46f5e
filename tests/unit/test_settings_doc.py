"""The docs name only settings that exist: every ``GPUYARD_*`` variable is a field of
:class:`~gpuyard.config.Settings` (or one that the local cluster's tooling reads), and each
row of a settings table names the flag of ``gpuyard run`` and the chart value that set
that same variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from gpuyard.cli import build_parser
from gpuyard.config import Settings

ROOT = Path(__file__).parents[2]
DOCS = sorted([*(ROOT / "docs").rglob("*.md"), ROOT / "README.md"])
HELPERS = (ROOT / "charts" / "gpuyard" / "templates" / "_helpers.tpl").read_text()
VALUES = yaml.safe_load((ROOT / "charts" / "gpuyard" / "values.yaml").read_text())
TOOLING = "\n".join(path.read_text() for path in (ROOT / "hack" / "localcluster").glob("*.py"))

# A full name: a trailing underscore is a prefix (GPUYARD_USAGE_*), not a setting.
_VARIABLE = re.compile(r"GPUYARD_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_])")
# | `GPUYARD_X` | `--flag` | `operator.value` | default |
_SETTINGS_ROW = re.compile(r"^\| `(GPUYARD_\w+)` \| `(--[a-z0-9-]+)` \| `operator\.(\w+)` \|", re.M)


def _run_flag_sets(flag: str) -> str | None:
    """The Settings field that ``gpuyard run FLAG VALUE`` overrides, if any."""
    args = vars(build_parser().parse_args(["run", flag, "probe-value"]))
    return next((name for name, value in args.items() if value == "probe-value"), None)


def test_every_documented_variable_is_a_setting() -> None:
    settings = {f"GPUYARD_{name.upper()}" for name in Settings.model_fields}
    unknown = {
        (name, path.name)
        for path in DOCS
        for name in _VARIABLE.findall(path.read_text())
        if name not in settings and f'"{name}"' not in TOOLING
    }
    assert not unknown


@pytest.mark.parametrize(
    ("variable", "flag", "value"),
    [row for path in DOCS for row in _SETTINGS_ROW.findall(path.read_text())],
)
def test_a_settings_table_row_names_one_setting_three_ways(
    variable: str, flag: str, value: str
) -> None:
    field = variable.removeprefix("GPUYARD_").lower()
    assert field in Settings.model_fields
    assert _run_flag_sets(flag) == field
    assert value in VALUES["operator"]
    # The chart's env helper sets this variable from this value.
    assert re.search(
        rf"\.Values\.operator\.{value}\b[^\n]*\n- name: {variable}\n"
        rf"|- name: {variable}\n  value: \{{\{{ \.Values\.operator\.{value}\b",
        HELPERS,
    ), f"{variable} is not set from operator.{value} in _helpers.tpl"


def test_the_settings_tables_are_found() -> None:
    # The rows above must exist, or the parametrized test checks nothing.
    rows = _SETTINGS_ROW.findall((ROOT / "docs" / "autoscaling.md").read_text())
    assert {variable for variable, _, _ in rows} >= {
        "GPUYARD_GPU_EXPORTER_MATCHERS",
        "GPUYARD_TENANT_NAMESPACE_LABEL",
    }
