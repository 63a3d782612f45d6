"""Architecture checks: the tree is the design (docs/architecture.md, "The tree").

Each folder of the package is a layer and may import only the layers below it; the pure core
imports nothing outside ``core/`` and no I/O at all; the package has no import cycle; every
module has its test file in the mirrored place under ``tests/``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

import mes_trace_proxy

PACKAGE: Final = Path(mes_trace_proxy.__file__).parent
TESTS: Final = Path(__file__).parent
NAME: Final = "mes_trace_proxy"

#: What each folder may import from the package, besides itself. The top level (composition
#: root, CLI, server, explain, native) and the demo may import anything.
LAYERS: Final[dict[str, frozenset[str]]] = {
    "core": frozenset(),
    "telemetry": frozenset({"core"}),
    "wire": frozenset({"core", "telemetry"}),
    "state": frozenset({"core", "telemetry"}),
    "messages": frozenset({"core", "telemetry", "state"}),
    "admin": frozenset({"core", "telemetry", "wire", "state", "messages"}),
    "proxy": frozenset({"core", "telemetry", "wire", "state"}),
    "sim": frozenset({"core"}),
}
#: What the core must never import: the event loop, the HTTP stack, the SDK, storage, sockets.
BANNED: Final = (
    "aiohttp",
    "asyncio",
    "opentelemetry.sdk",
    "sqlite3",
    "redis",
    "socket",
    "aio_pika",
    "aiormq",
)
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
#: Third-party imports the core may have: pure data and constants, no I/O.
CORE_THIRD_PARTY: Final = (
    "opentelemetry.semconv",  # semantic-convention keys
    "opentelemetry.util.types",  # the attribute value type
    "multidict",  # the case-insensitive header multidict aiohttp also uses
    "orjson",  # a JSON parser: bytes in, plain values out
)
#: Whole-program modules that need no test file of their own.
NO_TEST_NEEDED: Final = frozenset({"__init__", "__main__"})


def _modules() -> list[str]:
    """Every module of the package as a dotted name relative to it: ``core.rules``, ``cli``."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        names.append(".".join(rel.parts))
    return names


def _path(module: str, package: Path = PACKAGE) -> Path:
    return package / (module.replace(".", "/") + ".py")


def _layer(module: str) -> str:
    return module.split(".")[0] if "." in module else ""


def _walk_runtime(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, except under ``if TYPE_CHECKING:`` (annotations only, never imported)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_walk_runtime(child)])
            continue
        yield node
        yield from _walk_runtime(node)


def _imports(module: str, package: Path = PACKAGE, *, runtime_only: bool = False) -> list[str]:
    """Every module a source file imports; ``from a import b`` yields a and a.b."""
    source = _path(module, package)
    tree = ast.parse(source.read_text(encoding="utf-8"))
    here = [NAME, *module.split(".")[:-1]]
    found: list[str] = []
    for node in _walk_runtime(tree) if runtime_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = here[: len(here) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
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


MODULES: Final = _modules()
CORE: Final = [module for module in MODULES if _layer(module) == "core"]
LAYERED: Final = [module for module in MODULES if _layer(module) in LAYERS]


def test_every_folder_is_a_known_layer() -> None:
    """A new folder must say where it sits: add it to LAYERS (and to docs/architecture.md)."""
    folders = {_layer(module) for module in MODULES} - {"", "demo"}
    assert folders <= set(LAYERS), f"folders with no layer: {sorted(folders - set(LAYERS))}"
    assert len(CORE) >= 10


@pytest.mark.parametrize("module", LAYERED)
def test_a_layer_imports_only_the_layers_below_it(module: str) -> None:
    """core imports only core; telemetry core; … (LAYERS): the tree shows what may use what."""
    layer = _layer(module)
    allowed = {layer, *LAYERS[layer]}
    targets = {name.split(".")[1] for name in _imports(module) if name.startswith(NAME + ".")}
    # A folder outside the allowed ones, or a top-level module (app, server, cli …: they compose the
    # layers, nothing inside a layer may reach back up to them).
    bad = sorted(
        target for target in targets if target not in allowed and target not in {"native", "__version__"}
    )
    assert bad == [], f"{NAME}/{module.replace('.', '/')}.py ({layer}/) imports {', '.join(bad)}"


@pytest.mark.parametrize("module", CORE)
def test_core_imports_nothing_banned(module: str) -> None:
    """No core module imports aiohttp, asyncio, the OpenTelemetry SDK, storage, a broker or socket."""
    bad = sorted({name for name in _imports(module) if _under(name, BANNED)})
    assert bad == [], f"{module} imports {', '.join(bad)}"


@pytest.mark.parametrize("module", CORE)
def test_core_reads_no_environment_clock_or_disk(module: str) -> None:
    """No core module imports the standard library's environment, clock, file or network modules."""
    bad = sorted({name for name in _imports(module) if _under(name, BANNED_STDLIB_IO)})
    assert bad == [], f"{module} imports {', '.join(bad)}"


@pytest.mark.parametrize("module", CORE)
def test_core_third_party_imports_are_allow_listed(module: str) -> None:
    """Outside the standard library, the core imports only the pure libraries CORE_THIRD_PARTY names."""
    stdlib = sys.stdlib_module_names
    bad = sorted(
        {
            name
            for name in _imports(module)
            if name.split(".")[0] not in stdlib
            and name.split(".")[0] not in {NAME, "__future__"}
            and not _under(name, CORE_THIRD_PARTY)
        }
    )
    assert bad == [], f"{module} imports {', '.join(bad)}"


def _graph() -> dict[str, set[str]]:
    modules = set(MODULES)
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        targets = set()
        for name in _imports(module, runtime_only=True):
            if _under(name, (NAME,)) and name != NAME:
                rel = name[len(NAME) + 1 :]
                # "from pkg import mod" names a module; "from mod import func" names its module.
                while rel and rel not in modules and f"{rel}.__init__" not in modules:
                    rel = rel.rpartition(".")[0]
                if rel and rel != module:
                    targets.add(rel if rel in modules else f"{rel}.__init__")
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle() -> None:
    """No two modules import each other, directly or around a loop (imports for annotations aside)."""
    cycles = [cycle for cycle in _cycles(_graph()) if not all(m.endswith("__init__") for m in cycle)]
    assert cycles == []


def test_the_checker_sees_every_import_form(tmp_path: Path) -> None:
    """The AST walk finds plain, from-, relative, nested and importlib imports (so the checks can fail)."""
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "probe.py").write_text(
        "import socket\n"
        "from opentelemetry import sdk\n"
        "from . import rules\n"
        "from ..proxy import handler\n"
        "def later() -> None:\n"
        "    import asyncio.tasks\n"
        "    importlib.import_module('redis')\n"
    )
    found = _imports("core.probe", tmp_path)
    assert {
        "socket",
        "opentelemetry.sdk",
        f"{NAME}.core.rules",
        f"{NAME}.proxy.handler",
        "asyncio.tasks",
        "redis",
    } <= set(found)
    assert all(_under(name, BANNED) for name in ("socket", "opentelemetry.sdk", "asyncio.tasks", "redis"))
    assert not _under("redistribute", BANNED)


def test_the_cycle_finder_finds_a_loop() -> None:
    """A three-module loop is reported; a chain is not (so the cycle test can fail)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


# ── one test file per module, in the mirrored folder (mitmproxy's filename_matching) ────────


@pytest.mark.parametrize("module", [m for m in MODULES if m.rsplit(".", 1)[-1] not in NO_TEST_NEEDED])
def test_every_module_has_a_test_file(module: str) -> None:
    """mes_trace_proxy/<folder>/<name>.py has tests/<folder>/test_<name>.py."""
    *folders, leaf = module.split(".")
    expected = TESTS.joinpath(*folders, f"test_{leaf}.py")
    assert expected.is_file(), f"{module} has no {expected.relative_to(TESTS.parent)}"
