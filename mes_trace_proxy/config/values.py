"""Scalar value parsers: one string (or YAML scalar) in, one checked value out.

Each raises :class:`ValueError` with a message that reads after the key it came from
(``listeners[0].listen: '8080': expected HOST:PORT``); the overlay adds the key.
"""

from __future__ import annotations

import math
import re
from typing import Final
from urllib.parse import urlsplit

from mes_trace_proxy.config.model import CLIENT_SPAN_MODES, HostPort, Upstream
from mes_trace_proxy.framing import TOKEN

#: An HTTP header name: an RFC 9110 §5.6.2 token, the package's one definition (framing.py).
#: Match it with fullmatch(): "^...$" with re.match would also take a name followed by "\n".
HEADER_TOKEN: Final = TOKEN
_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE: Final = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS: Final = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_duration(value: object) -> float:
    """``15m`` → 900.0; bare numbers are seconds.

    Raises:
        ValueError: not a non-negative duration.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use e.g. 500ms, 10s, 15m, 2h, 7d)")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        found = _DURATION.match(str(value))
        if found is None:
            raise ValueError(f"{value!r} is not a duration (use e.g. 500ms, 10s, 15m, 2h, 7d)")
        seconds = float(found.group(1)) * _DURATION_UNITS[found.group(2)]
    # YAML's .nan and .inf, or 400 digits, would pass a '< 0' check and stall every timer.
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite duration")
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds


def parse_size(value: object) -> int:
    """``64KiB`` → 65536; bare numbers are bytes.

    Raises:
        ValueError: not a non-negative size.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    found = _SIZE.match(str(value))
    if found is None:
        raise ValueError(f"{value!r} is not a size (use e.g. 65536, 64KiB, 1MiB)")
    return int(found.group(1)) * _SIZE_UNITS[found.group(2)]


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{value!r} is not a boolean (use true or false)")


def _parse_hostport(value: object) -> HostPort:
    text = str(value).strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [IPv6]:PORT")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    if not host:
        raise ValueError(f"{text!r}: the host is empty (use 0.0.0.0 for every interface)")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return HostPort(host=host, port=int(port_text))


def _parse_upstream(value: object) -> Upstream:
    text = str(value).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{text!r} must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError(f"{text!r} has no host")
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r}: an upstream URL takes no query or fragment")
    if parts.username or parts.password:
        raise ValueError("credentials in the upstream URL would leak into logs; use a header instead")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r} has an invalid port") from None
    if port == 0:
        # "or default" would quietly turn ":0" into 80; nothing can be reached on port 0.
        raise ValueError(f"{text!r} has an invalid port")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return Upstream(
        url=text, scheme=parts.scheme, host=parts.hostname, port=port, base_path=parts.path.rstrip("/")
    )


def _parse_log_level(value: object) -> str:
    text = str(value).strip().lower()
    if text not in ("debug", "info", "warning", "error"):
        raise ValueError(f"{value!r}: use debug, info, warning or error")
    return text


def _parse_correlation(value: object) -> str:
    text = str(value).strip().lower()
    if text not in ("link", "trace-per-order", "off"):
        raise ValueError(f"{value!r}: use link, trace-per-order or off")
    return text


def _parse_client_span(value: object) -> str:
    text = str(value).strip().lower()
    if text not in CLIENT_SPAN_MODES:
        raise ValueError(f"{value!r}: use {' or '.join(CLIENT_SPAN_MODES)}")
    return text


def _parse_state(value: object) -> str:
    text = str(value).strip()
    if text == "memory" or text.startswith(("sqlite:///", "redis://", "rediss://", "unix://")):
        return text
    raise ValueError(f"{text!r}: use memory, sqlite:///PATH or redis://HOST:PORT/DB")


def _parse_http_url(value: object) -> str:
    text = str(value).strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{text!r} must be an http:// or https:// URL")
    return text


def _parse_workers(value: object) -> int:
    try:
        workers = int(str(value))
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None
    if not 1 <= workers <= 64:
        raise ValueError(f"{workers} is out of range 1..64")
    return workers


def _count(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a whole number")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise ValueError(f"{number} must be at least 1")
    return number
