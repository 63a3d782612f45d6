"""mes-trace-proxy: a tracing sidecar reverse proxy for the MES API."""

__version__ = "0.1.0"
__all__ = ["__version__"]
