"""The native build's import check: compiled modules are used only when built from these sources.

The decision (``native.inspect_build``) is tested over directories of made-up files; the finder
that loads sources past a stale extension is tested in a subprocess over a copy of the package
whose "extensions" are garbage, so importing one would fail loudly. Neither needs a compiler.
The last tests hold a run to the build ``make test`` asked for (``MES_TRACE_PROXY_EXPECT_NATIVE``)
and check what mypyc may get wrong in the modules it compiled.
"""

from __future__ import annotations

import abc
import importlib
import importlib.machinery
import inspect
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mes_trace_proxy import native

PACKAGE_DIR = Path(native.__file__).resolve().parent
REPO = PACKAGE_DIR.parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
MODULES = ("alpha", "beta")


def _package(tmp_path: Path, *, built: tuple[str, ...] = MODULES, manifest: bool = True) -> Path:
    for name in MODULES:
        (tmp_path / f"{name}.py").write_text(f"NAME = {name!r}\n")
    if manifest:
        (tmp_path / native.MANIFEST).write_text(native.manifest_text(tmp_path, MODULES))
    for name in built:
        (tmp_path / f"{name}{SUFFIX}").write_bytes(b"not an ELF file")
    return tmp_path


def _inspect(package_dir: Path, environ: dict[str, str] | None = None) -> native.NativeBuild:
    return native.inspect_build(package_dir, environ or {}, suffixes=(SUFFIX,), modules=MODULES)


def test_no_extensions_is_pure(tmp_path: Path) -> None:
    build = _inspect(_package(tmp_path, built=(), manifest=False))
    assert (build.state, build.modules, build.active) == ("pure", (), False)


def test_extensions_built_from_these_sources_are_used(tmp_path: Path) -> None:
    build = _inspect(_package(tmp_path))
    assert (build.state, build.modules, build.active) == ("native", MODULES, True)
    assert build.reason == "native: 2 modules compiled with mypyc"


@pytest.mark.parametrize(
    ("value", "state"), [("1", "disabled"), ("0", "native"), ("", "native"), ("yes", "native")]
)
def test_the_pure_switch_takes_exactly_1(tmp_path: Path, value: str, state: str) -> None:
    assert _inspect(_package(tmp_path), {native.PURE_ENV: value}).state == state


def test_an_edited_source_makes_the_build_stale_and_names_the_file(tmp_path: Path) -> None:
    package = _package(tmp_path)
    (package / "beta.py").write_text("NAME = 'beta, edited'\n")
    build = _inspect(package)
    assert (build.state, build.active) == ("stale", False)
    assert "beta.py" in build.reason
    assert "alpha.py" not in build.reason


def test_an_incomplete_build_is_not_used(tmp_path: Path) -> None:
    build = _inspect(_package(tmp_path, built=("alpha",)))
    assert build.state == "stale"
    assert "incomplete (no beta)" in build.reason


def test_a_missing_manifest_makes_the_build_stale(tmp_path: Path) -> None:
    build = _inspect(_package(tmp_path, manifest=False))
    assert build.state == "stale"
    assert "manifest is unreadable" in build.reason


def test_a_manifest_of_other_modules_is_stale(tmp_path: Path) -> None:
    package = _package(tmp_path)
    (package / native.MANIFEST).write_text(native.manifest_text(package, MODULES) + "gamma 00\n")
    build = _inspect(package)
    assert build.state == "stale"
    assert "a different module list" in build.reason


def _copy_package(tmp_path: Path) -> Path:
    """The real package's sources, with a garbage "extension" beside every compiled module."""
    target = tmp_path / "mes_trace_proxy"
    shutil.copytree(PACKAGE_DIR, target, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    for name in native.COMPILED:
        (target / f"{name.replace('.', '/')}{SUFFIX}").write_bytes(b"not an ELF file")
    (target / native.MANIFEST).write_text(native.manifest_text(target))
    return target


def _import_in_subprocess(root: Path, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = (
        "import mes_trace_proxy.proxy.handler, mes_trace_proxy.telemetry.otlp_encode as e\n"
        "from mes_trace_proxy import native\n"
        "print(native.current().state, e.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV} | environ
    env["PYTHONPATH"] = str(root)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=60,
        check=False,
    )


def test_the_finder_loads_sources_past_a_stale_build(tmp_path: Path) -> None:
    package = _copy_package(tmp_path)
    with (package / "telemetry" / "otlp_encode.py").open("a") as source:
        source.write("\n# edited after the build\n")
    done = _import_in_subprocess(tmp_path, {})
    assert done.returncode == 0, done.stderr
    state, loaded = done.stdout.split()
    assert state == "stale"
    assert loaded == str(package / "telemetry" / "otlp_encode.py")


def test_the_pure_switch_loads_sources_past_a_current_build(tmp_path: Path) -> None:
    package = _copy_package(tmp_path)
    done = _import_in_subprocess(tmp_path, {native.PURE_ENV: "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["disabled", str(package / "telemetry" / "otlp_encode.py")]


def test_a_current_build_is_imported_as_an_extension(tmp_path: Path) -> None:
    """The control for the two above: with a matching manifest the "extension" is what loads."""
    _copy_package(tmp_path)
    done = _import_in_subprocess(tmp_path, {})
    assert done.returncode != 0
    assert "ImportError" in done.stderr


def test_setup_py_compiles_the_modules_native_lists() -> None:
    """setup.py and the Makefile read the module list from native.py; every entry is a module."""
    listed = runpy.run_path(str(PACKAGE_DIR / "native.py"))["COMPILED"]
    assert listed == native.COMPILED
    assert 'native["COMPILED"]' in (REPO / "setup.py").read_text()
    for name in native.COMPILED:
        assert (PACKAGE_DIR / native.source_path(name)).is_file(), name
    done = subprocess.run(
        [sys.executable, str(PACKAGE_DIR / "native.py"), "sources"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.split() == [f"mes_trace_proxy/{native.source_path(name)}" for name in native.COMPILED]


def test_this_run_uses_the_build_make_asked_for() -> None:
    """``make test`` sets MES_TRACE_PROXY_EXPECT_NATIVE: 1 after ``make native``, 0 when pure."""
    expected = os.environ.get("MES_TRACE_PROXY_EXPECT_NATIVE")
    if expected is None:
        pytest.skip("run outside make test: no build is expected")
    build = native.current()
    assert build.active == (expected == "1"), build.reason
    for name in native.COMPILED:
        module = importlib.import_module(f"mes_trace_proxy.{name}")
        assert str(module.__file__).endswith(SUFFIX) == (expected == "1"), module.__file__


@pytest.mark.parametrize("name", native.COMPILED)
def test_compiled_subclasses_of_abstract_classes_keep_their_own_isinstance(name: str) -> None:
    """mypyc gives a compiled class with an ABC base no ABC cache of its own, so ``isinstance``
    answers for the base: found with spans.py, where a NonRecordingSpan passed for a ProxySpan
    until spans.py gave ProxySpan a cache of its own. No class of a compiled module may answer so."""
    module = importlib.import_module(f"mes_trace_proxy.{name}")
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ != module.__name__ or getattr(cls, "_is_protocol", False):
            continue  # protocols are for the type checker; nothing here isinstance-checks them
        for base in cls.__mro__[1:]:
            if (
                isinstance(base, abc.ABCMeta)
                and base is not abc.ABC
                and not getattr(base, "_is_protocol", False)
            ):
                other = type("_Sibling", (base,), {})
                seen_by_base = issubclass(other, base)  # the base's cache now holds the sibling
                seen_by_cls = issubclass(other, cls)
                assert seen_by_base
                assert not seen_by_cls, f"{cls.__qualname__} answers isinstance for {base}"
