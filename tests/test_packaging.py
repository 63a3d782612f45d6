"""A clean install prints nothing a user has to wonder about (issue 15, part 4).

setuptools reads pyproject.toml on every install and build (``make venv``, ``make native``,
the image's builder); a deprecated form there prints a warning each time. The test runs the
build backend's own metadata step, as pip does, on a copy of the project's packaging files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parent.parent
#: What the metadata step reads: the project table, the readme, setup.py and what it imports.
PACKAGING_FILES: Final = (
    "pyproject.toml",
    "README.md",
    "setup.py",
    "mes_trace_proxy/__init__.py",
    "mes_trace_proxy/native.py",
)
#: pyproject.toml's build requirement; older setuptools cannot read an SPDX licence string.
SETUPTOOLS_MIN: Final = 77
STEP_TIMEOUT_S: Final = 120
PREPARE: Final = (
    "import sys, setuptools.build_meta as backend\n"
    "print(backend.prepare_metadata_for_build_wheel(sys.argv[1]))\n"
)


def _setuptools_major() -> int:
    setuptools = pytest.importorskip("setuptools")
    return int(setuptools.__version__.split(".")[0])


def _prepare(project: Path) -> tuple[str, Path]:
    """Run the metadata step in ``project``, warnings always shown: (stderr, the .dist-info folder)."""
    out = project / "out"
    out.mkdir()
    env = {**os.environ, "MES_TRACE_PROXY_PURE_PYTHON": "1", "PYTHONWARNINGS": "always"}
    done = subprocess.run(
        (sys.executable, "-c", PREPARE, str(out)),
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr, out / done.stdout.strip().splitlines()[-1]


def _copy_project(target: Path) -> Path:
    for name in PACKAGING_FILES:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, target / name)
    return target


def _unexpected(stderr: str) -> list[str]:
    """stderr lines but setup.py's own notice of a pure-Python build (asked for above)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("mes-trace-proxy:")]


@pytest.fixture
def modern_setuptools() -> None:
    """Skip where the running setuptools is older than the build requirement (make venv installs it)."""
    major = _setuptools_major()
    if major < SETUPTOOLS_MIN:
        pytest.skip(f"setuptools {major} here; pyproject.toml builds with >= {SETUPTOOLS_MIN} (make venv)")


@pytest.mark.usefixtures("modern_setuptools")
def test_setuptools_reads_the_project_without_a_word(tmp_path: Path) -> None:
    """The metadata step prints no warning, and the licence is the SPDX expression (PEP 639)."""
    stderr, dist_info = _prepare(_copy_project(tmp_path))
    assert _unexpected(stderr) == []
    metadata = (dist_info / "METADATA").read_text(encoding="utf-8")
    assert "License-Expression: LicenseRef-Proprietary" in metadata.splitlines()


@pytest.mark.usefixtures("modern_setuptools")
def test_the_old_licence_table_would_be_heard(tmp_path: Path) -> None:
    """The control: the licence as a TOML table, as it was, makes the same step warn."""
    project = _copy_project(tmp_path)
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    assert 'license = "LicenseRef-Proprietary"' in text
    pyproject.write_text(
        text.replace('license = "LicenseRef-Proprietary"', 'license = {text = "Proprietary"}')
    )
    stderr, _ = _prepare(project)
    assert any("SetuptoolsDeprecationWarning" in line for line in _unexpected(stderr)), stderr
