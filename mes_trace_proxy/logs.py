"""JSON logs: one object per line on stdout, for the access log and the application log alike.

Nothing personal is ever logged: the access log carries the route template (not the raw
path), the redacted order id and trace ids; application messages never carry request data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Final, TextIO

__all__ = ["JsonFormatter", "access_logger", "configure_logging"]

ACCESS_LOGGER: Final = "mes_trace_proxy.access"
_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# LogRecord attributes that are the record's own, not extra fields a caller passed.
_RESERVED: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line."""
        data: dict[str, object] = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                data[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The exception class only: messages and tracebacks can carry request data.
            data["exception"] = record.exc_info[0].__qualname__
        return json.dumps(data, default=str, separators=(",", ":"))


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    """Send every log record as JSON to ``stream`` (stdout by default) at ``level``."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    # aiohttp's own access log is replaced by ours (it knows no trace ids or routes).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def access_logger(stream: TextIO | None = None) -> Callable[[dict[str, object]], None]:
    """A callable that writes one access-log line per request.

    It bypasses ``logging``'s record machinery (the per-request cost matters here) but
    writes the same JSON shape as :class:`JsonFormatter`.
    """
    out = stream or sys.stdout
    encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
    # The time prefix changes once per millisecond at most; formatting it is the costliest
    # part of a line, so it is cached for the millisecond it belongs to.
    cache: list[object] = [-1, ""]

    def write(entry: dict[str, object]) -> None:
        now_ms = int(time.time() * 1000)
        if now_ms != cache[0]:
            stamp = _timestamp(now_ms / 1000)
            cache[0], cache[1] = now_ms, f'{{"time":"{stamp}","level":"info","logger":"{ACCESS_LOGGER}",'
        body = encode(entry)
        line = f"{cache[1]}{body[1:]}\n" if len(body) > 2 else f"{str(cache[1])[:-1]}}}\n"
        # A closed or broken stdout must never fail a proxied request.
        with contextlib.suppress(OSError, ValueError):
            out.write(line)

    return write
