"""The container image without a Docker engine: hadolint on the Dockerfile, the build context,
shellcheck on hack/*.sh, and the image's virtual environment, built by the very script the
Dockerfile runs and then run as UID 65532 on files it cannot write."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuyard.api.crd import render_crds_yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-image-venv.sh"
CONSTRAINTS = REPO_ROOT / "requirements" / "constraints.txt"
NONROOT = "65532"
TOOLS = Path(sys.executable).parent


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
        for parts in [line.strip().split(None, 1)]
    ]


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [str(TOOLS / "hadolint"), str(DOCKERFILE)], check=False, capture_output=True, text=True
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_venv_as_nonroot_read_only_friendly() -> None:
    instructions = dockerfile_instructions()
    bases = [args.split()[0] for name, args in instructions if name == "FROM"]
    env = " ".join(args for name, args in instructions if name == "ENV")

    # Multi-stage, one pinned base for both stages (the venv links to its interpreter).
    assert len(bases) == 2
    assert len(set(bases)) == 1
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", bases[0])
    assert ("USER", f"{NONROOT}:{NONROOT}") in instructions
    assert ("ENTRYPOINT", '["gpuyard", "run"]') in instructions
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env
    # The image's venv comes from the same script the tests below run.
    runs = [args for name, args in instructions if name == "RUN"]
    assert runs == ["PYTHON=/usr/local/bin/python3.11 bash hack/build-image-venv.sh /opt/gpuyard"]
    assert ("COPY", "--from=venv /opt/gpuyard /opt/gpuyard") in instructions
    assert instructions[-1][0] == "ENTRYPOINT"


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    allowed = [
        line[1:].rstrip("/")
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    copied = [
        source
        for name, args in dockerfile_instructions()
        if name == "COPY" and not args.startswith("--from")
        for source in args.split()[:-1]
    ]

    for source in copied:
        path = source.rstrip("/").replace("README.m[d]", "README.md")
        assert path in allowed, path
    # An allow-list: everything is excluded first.
    rules = [
        line
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert rules[0] == "*"


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = sorted(str(path) for path in (REPO_ROOT / "hack").glob("*.sh"))

    result = subprocess.run(
        [str(TOOLS / "shellcheck"), "-x", "-P", "SCRIPTDIR", *scripts],
        check=False,
        capture_output=True,
        text=True,
    )

    assert result.returncode == 0, result.stdout


# --- the image's venv ----------------------------------------------------------------------


def _nonroot_python() -> str | None:
    """A Python 3.11 that UID 65532 may run: the venv links to it, and this test's own
    interpreter may live under a home directory that user cannot enter."""
    for candidate in ("/usr/local/bin/python3.11", "/usr/bin/python3.11"):
        if Path(candidate).exists() and as_nonroot([candidate, "-c", "pass"]).returncode == 0:
            return candidate
    return None


def as_nonroot(
    args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid", NONROOT, "--regid", NONROOT, "--clear-groups", *args],
        check=False,
        capture_output=True,
        text=True,
        env=env or {"PATH": "/usr/bin:/bin"},
        cwd="/",
        timeout=120,
    )


@pytest.fixture(scope="module")
def image_venv() -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as UID 65532")
    python = _nonroot_python()
    if python is None:
        pytest.skip("no Python 3.11 outside a home directory for UID 65532 to run")
    # Not pytest's tmp_path: it sits in a 0700 directory UID 65532 cannot enter.
    with tempfile.TemporaryDirectory(prefix="gpuyard-image-") as scratch:
        os.chmod(scratch, 0o755)
        venv = Path(scratch) / "opt-gpuyard"
        subprocess.run(
            ["bash", str(BUILD_SCRIPT), str(venv)],
            env={**os.environ, "PYTHON": python},
            check=True,
            capture_output=True,
            timeout=600,
        )
        yield venv


def image_env(venv: Path) -> dict[str, str]:
    """The environment the Dockerfile sets."""
    return {
        "PATH": f"{venv}/bin:/usr/local/bin:/usr/bin:/bin",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "HOME": "/tmp",
    }


def tree(root: Path) -> dict[str, float]:
    return {str(path): path.stat().st_mtime for path in root.rglob("*")}


@pytest.mark.slow
def test_gpuyard_run_help_as_uid_65532(image_venv: Path) -> None:
    before = tree(image_venv)

    result = as_nonroot(["gpuyard", "run", "--help"], env=image_env(image_venv))

    assert result.returncode == 0, result.stderr
    assert "GPUYARD_" in result.stdout
    assert "--prometheus-url" in result.stdout
    assert tree(image_venv) == before  # nothing written: fine on a read-only filesystem


@pytest.mark.slow
def test_the_operators_imports_and_settings_load_as_uid_65532(image_venv: Path) -> None:
    script = (
        "import kopf, kubernetes, prometheus_client, psycopg, pythonjsonlogger.json, yaml\n"
        "from gpuyard.config import Settings\n"
        "from gpuyard.io.kube import Kube\n"
        "from gpuyard.io.metrics import OperatorMetrics\n"
        "settings = Settings()\n"
        "assert settings.log_format == 'json' and settings.cluster_id == 'image-test'\n"
        "OperatorMetrics()\n"
    )
    env = {
        **image_env(image_venv),
        "GPUYARD_LOG_FORMAT": "json",
        "GPUYARD_CLUSTER_ID": "image-test",
    }
    before = tree(image_venv)

    result = as_nonroot(["python", "-c", script], env=env)

    assert result.returncode == 0, result.stderr
    assert tree(image_venv) == before


@pytest.mark.slow
def test_image_renders_the_same_crds(image_venv: Path) -> None:
    result = as_nonroot(["gpuyard", "crds"], env=image_env(image_venv))

    assert result.returncode == 0, result.stderr
    assert result.stdout == render_crds_yaml()


@pytest.mark.slow
def test_image_venv_holds_pinned_runtime_dependencies_only(image_venv: Path) -> None:
    listing = as_nonroot(
        [
            "python",
            "-c",
            "import importlib.metadata as m\n"
            "for d in m.distributions(): print(d.metadata['Name'], d.version)",
        ],
        env=image_env(image_venv),
    )
    assert listing.returncode == 0, listing.stderr
    installed = {
        name.lower().replace("_", "-"): version
        for name, version in (line.split() for line in listing.stdout.splitlines())
    }
    pins = {
        name.lower().replace("_", "-"): version
        for name, _, version in (
            line.partition("==")
            for line in CONSTRAINTS.read_text().splitlines()
            if line and not line.startswith("#")
        )
    }

    assert installed.pop("gpuyard") == "0.1.0"
    assert {name: pins.get(name) for name in installed} == installed
    assert {
        "kopf",
        "kubernetes",
        "pydantic",
        "pydantic-settings",
        "prometheus-client",
        "psycopg",
        "psycopg-binary",
    } <= set(installed)
    # No installer and none of the developer tools ship in the image.
    assert not {"pip", "setuptools", "pytest", "ruff", "mypy", "hypothesis", "lupa"} & set(
        installed
    )
    # Nor the report extra: the operator draws no charts.
    assert not {"matplotlib", "numpy", "pillow"} & set(installed)


@pytest.mark.slow
def test_image_has_no_plotting_library_and_says_so_for_a_chart(image_venv: Path) -> None:
    # The report extra stays out of the image; asking for a chart there is a one-line
    # error that names the extra, checked before the ledger is even read.
    result = as_nonroot(
        ["gpuyard", "usage", "--ledger", "/nonexistent.jsonl", "--chart", "/tmp/usage.png"],
        env=image_env(image_venv),
    )

    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1
    assert "pip install 'gpuyard[report]'" in result.stderr
    assert "Traceback" not in result.stderr
