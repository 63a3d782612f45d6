"""Peers the proxy is measured against; each is a separate program started by ``bench.run``."""
