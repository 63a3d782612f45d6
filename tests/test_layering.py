"""Architecture checks: the pure core imports no I/O, and every module has its own test file."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Final

import pytest

import mes_trace_proxy

PACKAGE: Final = Path(mes_trace_proxy.__file__).parent
TESTS: Final = Path(__file__).parent

#: The sans-I/O core (docs/architecture.md, "Pure core, thin I/O shell"): plain values in, frozen
#: values out. Each name is a module (``rules.py``), a package (``config/``, every file in it) or
#: a module of a subpackage (``messages.deadletter``).
CORE: Final = (
    "config",
    "messages.deadletter",
    "messages.record",
    "messages.settings",
    "messages.explain",
    "rules",
    "extract",
    "redact",
    "attributes",
    "tracecontext",
    "forwarding",
    "cards",
    "textfold",
    "framing",
    "lifecycle",
    "orders",
    "order_records",
    "order_index",
    "order_values",
    "store_codec",
    "problems",
    "h1",
    "exchange",
    "explain",
    "admin_page",
    "admin_auth",
)
#: What the core must never import: the event loop, the HTTP stack, the SDK, storage, sockets.
BANNED: Final = ("aiohttp", "asyncio", "opentelemetry.sdk", "sqlite3", "redis", "socket")
#: Standard-library modules that read the environment, the clock, the disk or the network: the
#: core takes those as arguments (time is an argument, the CLI reads files and os.environ).
BANNED_STDLIB_IO: Final = (
    "os",
    "time",
    "pathlib",
    "io",
    "subprocess",
    "threading",
    "multiprocessing",
    "signal",
    "ssl",
    "selectors",
    "http.client",
    "http.server",
    "urllib.request",
)
#: Third-party imports a core module may have, by module; anything else outside the standard
#: library and the core is a layering error.
ALLOWED_THIRD_PARTY: Final = {
    # Semantic-convention keys and the attribute value type: constants, no SDK.
    "attributes": ("opentelemetry.semconv", "opentelemetry.util.types"),
    # The attribute value type, as attributes.py.
    "exchange": ("opentelemetry.util.types",),
    # The case-insensitive header multidict aiohttp also uses; a pure data structure.
    "explain": ("multidict",),
    # A JSON parser: bytes in, plain values out (json.loads stays the reference reading).
    "extract": ("orjson",),
}
#: Whole-program modules that need no test file of their own.
NO_TEST_NEEDED: Final = frozenset({"__init__", "__main__"})
#: Subpackages outside the one-test-file-per-module rule: the simulators are demo code, tested
#: by tests/test_sim_*.py and tests/test_otlp_sink.py.
NO_TEST_NEEDED_PACKAGES: Final = frozenset({"sim"})


def _sources(module: str, package: Path = PACKAGE) -> list[Path]:
    """The files of one core unit: ``module.py``, or every file of the package ``module/``."""
    folder = package.joinpath(*module.split("."))
    if folder.is_dir():
        return sorted(folder.rglob("*.py"))
    return [folder.with_suffix(".py")]


def _imports(module: str, package: Path = PACKAGE) -> list[str]:
    """Every module a core unit imports, anywhere in it; ``from a import b`` yields a and a.b."""
    found: list[str] = []
    for source in _sources(module, package):
        # The dotted package a relative import in this file starts from.
        parts = ["mes_trace_proxy", *source.parent.relative_to(package).parts]
        found.extend(_file_imports(source, parts))
    return found


def _file_imports(source: Path, package_parts: list[str]) -> list[str]:
    tree = ast.parse(source.read_text(encoding="utf-8"))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # A relative import inside the package: ``from . import proxy``, ``from .. import x``.
                parent = package_parts[: len(package_parts) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.append(base)
            found.extend(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call):
            # importlib.import_module("aiohttp") or __import__("socket") hide an import from the above.
            func = node.func
            name = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            if (
                name in {"import_module", "__import__"}
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found.append(str(node.args[0].value))
    return found


def _under(name: str, prefixes: tuple[str, ...] | frozenset[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def test_core_modules_exist() -> None:
    """The core list names real modules, so a rename cannot silently drop a module from the checks."""
    missing = [module for module in CORE if not _sources(module)[0].is_file()]
    assert missing == []


@pytest.mark.parametrize("module", CORE)
def test_core_imports_nothing_banned(module: str) -> None:
    """No core module imports aiohttp, asyncio, the OpenTelemetry SDK, sqlite3, redis or socket."""
    bad = sorted({name for name in _imports(module) if _under(name, BANNED)})
    assert bad == [], f"mes_trace_proxy.{module} imports {', '.join(bad)}"


@pytest.mark.parametrize("module", CORE)
def test_core_reads_no_environment_clock_or_disk(module: str) -> None:
    """No core module imports the standard library's environment, clock, file or network modules."""
    bad = sorted({name for name in _imports(module) if _under(name, BANNED_STDLIB_IO)})
    assert bad == [], f"mes_trace_proxy.{module} imports {', '.join(bad)}"


@pytest.mark.parametrize("module", CORE)
def test_core_imports_only_core_from_the_package(module: str) -> None:
    """A core module imports only other core modules, so no shell code reaches it transitively."""
    core = frozenset(f"mes_trace_proxy.{name}" for name in CORE)
    own = [name for name in _imports(module) if _under(name, ("mes_trace_proxy",))]
    # "from mes_trace_proxy import attributes" yields both the package and the module.
    bad = sorted({name for name in own if name != "mes_trace_proxy" and not _under(name, core)})
    assert bad == [], f"mes_trace_proxy.{module} imports shell modules {', '.join(bad)}"


@pytest.mark.parametrize("module", CORE)
def test_core_third_party_imports_are_allow_listed(module: str) -> None:
    """Outside the standard library, a core module imports only what ALLOWED_THIRD_PARTY grants it."""
    allowed = ALLOWED_THIRD_PARTY.get(module, ())
    stdlib = sys.stdlib_module_names
    bad = sorted(
        {
            name
            for name in _imports(module)
            if name.split(".")[0] not in stdlib
            and name.split(".")[0] not in {"mes_trace_proxy", "__future__"}
            and not _under(name, allowed)
        }
    )
    assert bad == [], f"mes_trace_proxy.{module} imports {', '.join(bad)}"


def test_the_checker_sees_every_import_form(tmp_path: Path) -> None:
    """The AST walk finds plain, from-, relative, nested and importlib imports (so the checks can fail)."""
    (tmp_path / "probe.py").write_text(
        "import socket\n"
        "from opentelemetry import sdk\n"
        "from . import proxy\n"
        "def later() -> None:\n"
        "    import asyncio.tasks\n"
        "    importlib.import_module('redis')\n"
    )
    found = _imports("probe", tmp_path)
    assert {"socket", "opentelemetry.sdk", "mes_trace_proxy.proxy", "asyncio.tasks", "redis"} <= set(found)
    # A core package is checked file by file, relative imports resolved from each file's folder.
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from .inner import x\n")
    (tmp_path / "pkg" / "inner.py").write_text("from .. import server\nimport aiohttp\n")
    assert {"mes_trace_proxy.pkg.inner", "mes_trace_proxy.server", "aiohttp"} <= set(
        _imports("pkg", tmp_path)
    )
    assert all(_under(name, BANNED) for name in ("socket", "opentelemetry.sdk", "asyncio.tasks", "redis"))
    assert not _under("redistribute", BANNED)


# ── one test file per module (mitmproxy's filename_matching) ─────────────────────────────


def _test_files(path: Path) -> list[Path]:
    """Where the tests of a module may be: flat, or in a folder mirroring its package.

    ``rules.py`` → ``test_rules.py``; ``config/overlay.py`` → ``test_config_overlay.py`` or
    ``config/test_overlay.py``; a package's ``__init__`` → ``test_config.py`` or the
    package's own test folder.
    """
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
        return [TESTS / f"test_{'_'.join(parts)}.py", TESTS.joinpath(*parts, "__init__.py")]
    flat = TESTS / f"test_{'_'.join(parts)}.py"
    return [flat] if len(parts) == 1 else [flat, TESTS.joinpath(*parts[:-1], f"test_{parts[-1]}.py")]


def test_test_file_names() -> None:
    """The names the rule below accepts, for a module, a package module and a package."""
    assert _test_files(PACKAGE / "rules.py") == [TESTS / "test_rules.py"]
    assert _test_files(PACKAGE / "config" / "overlay.py") == [
        TESTS / "test_config_overlay.py",
        TESTS / "config" / "test_overlay.py",
    ]
    assert _test_files(PACKAGE / "config" / "__init__.py") == [
        TESTS / "test_config.py",
        TESTS / "config" / "__init__.py",
    ]


MODULES: Final = sorted(
    str(path.relative_to(PACKAGE))
    for path in PACKAGE.rglob("*.py")
    if path.stem not in NO_TEST_NEEDED or (path.stem == "__init__" and path.parent != PACKAGE)
    if not set(path.relative_to(PACKAGE).parts[:-1]) & NO_TEST_NEEDED_PACKAGES
)


@pytest.mark.parametrize("module", MODULES)
def test_every_module_has_a_test_file(module: str) -> None:
    """Every module of the package, subpackages included, has its own test file (_test_files)."""
    candidates = _test_files(PACKAGE / module)
    names = " or ".join(str(path.relative_to(TESTS.parent)) for path in candidates)
    assert any(path.is_file() for path in candidates), f"mes_trace_proxy/{module} has no {names}"
