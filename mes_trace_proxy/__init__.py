"""mes-trace-proxy: a tracing sidecar reverse proxy for the MES API."""

from pathlib import Path

from mes_trace_proxy import native as _native

__version__ = "0.1.0"
__all__ = ["__version__"]

# Before anything imports a module the native build may have compiled: a stale or disabled
# build must not be the one loaded (native.py says why).
_native.activate(Path(__file__).resolve().parent)
