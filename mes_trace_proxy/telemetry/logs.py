"""JSON logs: one object per line on stdout, for the access log and the application log alike.

Nothing personal is ever logged: the access log carries the route template (not the raw
path), the redacted order id and trace ids; application messages never carry request data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from json.encoder import encode_basestring_ascii
from typing import Final, TextIO

__all__ = ["AccessLog", "JsonFormatter", "configure_logging"]

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


class AccessLog:
    """The access log: one JSON line per request, written in batches.

    Lines are appended to a buffer and written by :meth:`run` every ``interval`` seconds
    (and by :meth:`flush` on shutdown): one ``write`` per batch instead of one per request.
    The benchmark found the per-line write, and the wait for the GIL after it, to be the
    largest single cost of the access log. A line waits at most ``interval`` to appear, and
    only a crash (SIGKILL) can lose the last batch; SIGTERM flushes it.
    """

    def __init__(self, stream: TextIO | None = None, *, interval: float = 0.2, max_lines: int = 512) -> None:
        self._out = stream or sys.stdout
        self._lines: list[str] = []
        self._interval = interval
        # A burst flushes early, so the buffer stays a few hundred KiB at most.
        self._max_lines = max_lines
        self._encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
        # The time prefix changes once per millisecond at most; formatting it is the costliest
        # part of a line, so it is cached for the millisecond it belongs to, and its date and
        # time of day (strftime) for the second.
        self._stamp_ms = -1
        self._stamp_s = -1
        self._second = ""
        self._prefix = ""

    def _time_prefix(self) -> str:
        now_ms = int(time.time() * 1000)
        if now_ms != self._stamp_ms:
            # Integer milliseconds: a float's "% 1 * 1000" can come out one below (.122999…).
            second, ms = divmod(now_ms, 1000)
            if second != self._stamp_s:
                self._stamp_s = second
                self._second = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._stamp_ms = now_ms
            self._prefix = f'{{"time":"{self._second}.{ms:03d}Z","level":"info","logger":"{ACCESS_LOGGER}"'
        return self._prefix

    def request(
        self,
        listener: str,
        method: str,
        route: str,
        status: int,
        duration_ms: float,
        bytes_sent: int,
        trace_id: str,
        span_id: str,
        order_id: str | None,
        error_type: str | None,
    ) -> None:
        """Queue the line of one proxied request (the request path; never raises, never blocks).

        The same JSON object :meth:`__call__` writes for these keys, built as one string: a
        dict and a general JSON encoder cost more than the rest of the line's work together.
        Strings that come from the request go through JSON's own escaping (``\\uXXXX`` for
        anything not ASCII, as ``json.dumps`` does).
        """
        order = "null" if order_id is None else encode_basestring_ascii(order_id)
        error = "null" if error_type is None else encode_basestring_ascii(error_type)
        self._lines.append(
            f'{self._time_prefix()},"listener":{encode_basestring_ascii(listener)},'
            f'"method":{encode_basestring_ascii(method)},"route":{encode_basestring_ascii(route)},'
            f'"status":{status},"duration_ms":{duration_ms:.3f},"bytes_sent":{bytes_sent},'
            f'"trace_id":"{trace_id}","span_id":"{span_id}","order_id":{order},"error_type":{error}}}\n'
        )
        if len(self._lines) >= self._max_lines:
            self.flush()

    def __call__(self, entry: dict[str, object]) -> None:
        """Queue one access-log line of any fields (never raises, never blocks)."""
        prefix = self._time_prefix()
        body = self._encode(entry)
        self._lines.append(f"{prefix},{body[1:]}\n" if len(body) > 2 else f"{prefix}}}\n")
        if len(self._lines) >= self._max_lines:
            self.flush()

    def flush(self) -> None:
        """Write every queued line now."""
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        # A closed or broken stdout must never fail a proxied request.
        with contextlib.suppress(OSError, ValueError):
            self._out.write("".join(lines))
            self._out.flush()

    async def run(self) -> None:
        """Flush every ``interval`` until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(self._interval)
                self.flush()
        finally:
            self.flush()
