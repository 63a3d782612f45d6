"""The native build: which modules mypyc compiled, and whether those builds may be used.

The hot path's pure modules (the handler, rules, extraction, redaction, forwarding, the OTLP
encoder and exporter, the access log, metrics) can be compiled to C extensions with mypyc
(``setup.py``; docs/performance.md, "The native build"). A compiled module is found before its
``.py`` source by Python's import system, so an extension built from an older source would run
in place of the code beside it. This module decides, before any of them is imported, whether
the extensions match their sources; when they do not, or when ``MES_TRACE_PROXY_PURE_PYTHON=1``
asks for it, a finder makes every one of them import from its ``.py`` file instead. It is all
or nothing: the compiled modules call each other natively, so a mix is never loaded.

The build writes ``_native_sources.txt`` (``NAME SHA256`` per compiled module) beside the
modules; the check re-hashes the sources against it, a millisecond at start-up.

This file is standard library only and is never compiled: ``setup.py`` runs it as a script
to learn the module list, and ``mes_trace_proxy/__init__.py`` imports it first.

Constraints
-----------
What compiled code cannot do, written down once here. A compiled module (:data:`COMPILED`) must
type-check under ``mypy --strict`` and follow these rules; each place in the source that bends
for one of them carries the tag ``# mypyc:`` and a few words (``grep -rn "# mypyc:"
mes_trace_proxy`` lists them), so the flow around it needs no explanation:

1. No async generators: they stay in interpreted modules (``bodies.py``).
2. No interpreted subclass of a compiled class, and no interpreted class passing for one: a base
   that others extend stays interpreted (``observer.py``), or the compiled side takes a
   ``Protocol`` (``export.SpanEncoder``).
3. No ``__slots__`` on or under an interpreted base: ``http1.py`` and ``upstream.py`` subclass
   aiohttp's ``BaseProtocol`` and stay interpreted.
4. A lone surrogate cannot be a string literal: spell it with ``chr()`` (``forwarding.py``).
5. A local read in ``finally`` has the type the ``try`` block narrowed it to: state that a
   ``finally`` reads lives on an object (``handler_state.Call``), or in a list, never in an
   Optional local reset to ``None`` inside the ``try``.
6. ``()`` is typed as the empty tuple: write ``tuple()`` for an empty ``tuple[str, ...]``.
7. Arguments are type-checked at the call: a parameter that must accept anything (an invalid
   attribute key the SDK would count, not raise on) is typed ``object``.
8. A compiled class has its own allocator: ``object.__new__(C)`` is refused, ``C.__new__(C)`` is
   not; and a compiled class with an ABC base gets no ABC cache of its own (``spans.py`` gives
   ``ProxySpan`` one).
9. Compiled functions are not Python functions: what a tool must read of one (``bench.handler``
   reads the listener state) is kept reachable another way (a ``functools.partial``'s ``.args``).
10. Bound-method locals (``append = parts.append``) hide the direct C call mypyc makes of a
    typed list's or dict's method: call the method on the object.

docs/performance.md, "The native build", has how each was found and what the build saves.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Final

__all__ = [
    "COMPILED",
    "MANIFEST",
    "PURE_ENV",
    "NativeBuild",
    "activate",
    "current",
    "inspect_build",
    "manifest_text",
]

#: The modules the native build compiles, in the package; each follows the constraints above
#: (docs/performance.md says why the others stay pure).
COMPILED: Final = (
    "core.attributes",
    "core.cards",
    "core.exchange",
    "core.extract",
    "core.forwarding",
    "core.framing",
    "core.h1",
    "core.order_index",
    "core.order_records",
    "core.order_values",
    "core.orders",
    "core.redact",
    "core.rules",
    "core.textfold",
    "core.tracecontext",
    "proxy.handler",
    "proxy.handler_state",
    "proxy.recording",
    "proxy.relay",
    "telemetry.export",
    "telemetry.logs",
    "telemetry.metrics",
    "telemetry.otlp_encode",
    "telemetry.otlp_wire",
    "telemetry.proxy_span",
    "telemetry.span_context",
    "telemetry.span_limits",
    "telemetry.spans",
)
#: The build's record of the sources it compiled: ``NAME SHA256`` lines.
MANIFEST: Final = "_native_sources.txt"
#: Set to 1: build nothing (``setup.py``) and load nothing compiled (at import).
PURE_ENV: Final = "MES_TRACE_PROXY_PURE_PYTHON"

PACKAGE: Final = "mes_trace_proxy"


@dataclass(frozen=True, slots=True)
class NativeBuild:
    """What the import check found.

    Attributes:
        state: ``native`` (the compiled modules are used), ``pure`` (none were built),
            ``disabled`` (``MES_TRACE_PROXY_PURE_PYTHON=1``) or ``stale`` (built, but not from
            the sources beside them, or only in part: the sources are used).
        modules: the modules loaded compiled (empty unless ``native``).
        reason: one sentence for the start-up log and ``mes-trace-proxy --version``.
    """

    state: str
    modules: tuple[str, ...]
    reason: str

    @property
    def active(self) -> bool:
        """The compiled modules are the ones imported."""
        return self.state == "native"


def source_path(name: str) -> str:
    """A compiled module's source file, relative to the package: ``core.rules`` → ``core/rules.py``."""
    return name.replace(".", "/") + ".py"


def _digest(source: bytes) -> str:
    return hashlib.sha256(source).hexdigest()


def manifest_text(package_dir: Path, modules: Sequence[str] = COMPILED) -> str:
    """The manifest a build of ``modules`` from the sources in ``package_dir`` records."""
    return "".join(f"{name} {_digest((package_dir / source_path(name)).read_bytes())}\n" for name in modules)


def _extension(package_dir: Path, name: str, suffixes: Sequence[str]) -> Path | None:
    for suffix in suffixes:
        candidate = package_dir / f"{name.replace('.', '/')}{suffix}"
        if candidate.exists():
            return candidate
    return None


def inspect_build(
    package_dir: Path,
    environ: Mapping[str, str],
    suffixes: Sequence[str] = tuple(importlib.machinery.EXTENSION_SUFFIXES),
    modules: Sequence[str] = COMPILED,
) -> NativeBuild:
    """Decide whether the compiled modules in ``package_dir`` may be imported.

    A pure function of the files and the environment (no import happens), so it is tested
    with a directory of made-up files.

    Args:
        package_dir: the package's directory (sources, extensions, manifest).
        environ: the process environment; ``MES_TRACE_PROXY_PURE_PYTHON=1`` turns it all off.
        suffixes: the file name endings of extension modules on this interpreter.
        modules: the modules a native build compiles.
    """
    built = [name for name in modules if _extension(package_dir, name, suffixes) is not None]
    if not built:
        return NativeBuild("pure", (), "pure Python: no native build is installed")
    if environ.get(PURE_ENV, "") == "1":
        return NativeBuild("disabled", (), f"pure Python: {PURE_ENV}=1")
    if len(built) != len(modules):
        missing = ", ".join(sorted(set(modules) - set(built)))
        return NativeBuild("stale", (), f"pure Python: the native build is incomplete (no {missing})")
    try:
        recorded = (package_dir / MANIFEST).read_text(encoding="ascii")
        current_sources = manifest_text(package_dir, modules)
    except (OSError, UnicodeDecodeError) as exc:
        return NativeBuild("stale", (), f"pure Python: the native build's manifest is unreadable ({exc})")
    if recorded != current_sources:
        changed = _changed(recorded, current_sources)
        return NativeBuild(
            "stale",
            (),
            f"pure Python: the native build is older than its sources ({changed}); rebuild it",
        )
    return NativeBuild("native", tuple(modules), f"native: {len(modules)} modules compiled with mypyc")


def _changed(recorded: str, current_sources: str) -> str:
    def table(text: str) -> dict[str, str]:
        return dict(line.split(" ", 1) for line in text.splitlines() if " " in line)

    old, new = table(recorded), table(current_sources)
    names = sorted(name for name in new if old.get(name) != new[name])
    return ", ".join(source_path(name) for name in names) if names else "a different module list"


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Imports the named package modules from their ``.py`` files, past any extension."""

    def __init__(self, package_dir: Path, modules: Sequence[str]) -> None:
        self._paths = {f"{PACKAGE}.{name}": package_dir / source_path(name) for name in modules}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = self._paths.get(fullname)
        if source is None:
            return None
        return importlib.util.spec_from_file_location(fullname, source)


_current: NativeBuild | None = None


def activate(package_dir: Path, environ: Mapping[str, str] = os.environ) -> NativeBuild:
    """Check the build once per process and, unless it is usable, load the sources instead.

    Called by ``mes_trace_proxy/__init__.py`` before any compiled module can be imported.
    """
    global _current  # one decision per process, like the import system's own caches
    if _current is None:
        build = inspect_build(package_dir, environ)
        if not build.active and build.state != "pure":
            sys.meta_path.insert(0, _SourcesFirst(package_dir, COMPILED))
        _current = build
    return _current


def current() -> NativeBuild:
    """The decision :func:`activate` made for this process."""
    return activate(Path(__file__).resolve().parent)


if __name__ == "__main__":  # pragma: no cover - used by setup.py and the Makefile
    # `python mes_trace_proxy/native.py sources`: the compiled modules' paths, one per line.
    here = Path(__file__).resolve().parent
    if sys.argv[1:] == ["sources"]:
        print("\n".join(f"{PACKAGE}/{source_path(name)}" for name in COMPILED))
    elif sys.argv[1:] == ["manifest"]:
        sys.stdout.write(manifest_text(here))
    else:
        sys.exit("usage: native.py sources|manifest")
