"""The native build: the hot path's modules compiled to C extensions with mypyc.

Everything else about the package is in pyproject.toml. mypyc type-checks what it compiles,
so it needs mypy and the package's dependencies in the environment that builds: a build with
``--no-build-isolation`` from a venv holding both (``make native`` in a checkout, the Docker
image's builder stage) compiles the modules ``mes_trace_proxy/native.py`` lists. Any other
build (plain ``pip install .``, ``MES_TRACE_PROXY_PURE_PYTHON=1``) is pure Python, which runs
the same code more slowly. ``mes_trace_proxy/native.py`` ignores extensions older than their
sources.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
PACKAGE_DIR = HERE / "mes_trace_proxy"
#: What the compiled modules import: mypy must see their types, or --strict fails the build.
TYPED_DEPENDENCIES = ("aiohttp", "multidict", "opentelemetry.sdk", "orjson", "prometheus_client", "yarl")


def _ext_modules() -> list[object]:
    native = runpy.run_path(str(PACKAGE_DIR / "native.py"))
    if os.environ.get(native["PURE_ENV"], "") == "1":
        print(f"mes-trace-proxy: {native['PURE_ENV']}=1, building pure Python", file=sys.stderr)
        return []
    missing = [name for name in ("mypyc", *TYPED_DEPENDENCIES) if not _importable(name)]
    if missing:
        print(
            f"mes-trace-proxy: building pure Python ({', '.join(missing)} not importable here; the native"
            " build needs mypy and the dependencies: pip install --no-build-isolation, or make native)",
            file=sys.stderr,
        )
        return []
    from mypyc.build import mypycify

    # The record the import check compares against: written before the compile, from the
    # very sources mypyc reads, and shipped beside the extensions.
    (PACKAGE_DIR / native["MANIFEST"]).write_text(native["manifest_text"](PACKAGE_DIR), encoding="ascii")
    paths = [f"mes_trace_proxy/{native['source_path'](name)}" for name in native["COMPILED"]]
    # One group, named inside the package: its shared library lands in mes_trace_proxy/, not
    # at the top of site-packages, and the modules call each other without Python in between.
    return list(mypycify(paths, group_name="mes_trace_proxy._native", opt_level="3"))


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a missing parent package (opentelemetry)
        return False


setup(ext_modules=_ext_modules())
