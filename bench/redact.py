"""Redaction cost per request, ordinary and worst case: ``python -m bench.redact``.

A request's recorded header values all pass :meth:`Redactor.headers`, so a caller who sends many
long values chooses how much redaction work a request costs. This times one request's header
redaction for the benchmark's ordinary request and for crafted ones: 120 ``X-Request-Id`` values
of 1,020 characters (the security test's shape, just under the 1,024-character cap) in several
families. Every value is distinct, as an attacker's would be, so the redactor's memo of answers
never helps; each round starts with an empty memo. Only the first
``redact.MAX_HEADER_CHARS_PER_REQUEST`` characters of them are read (about eight values); the
rest become the marker unread, which is what bounds a request's cost.

The figure is wall time per request on one core (median of ``--rounds``); run it on an idle
machine. No test asserts a time: this is where the worst case is watched.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Final

from mes_trace_proxy.redact import Redactor

__all__ = ["WORST_CASES", "crafted_values", "main", "ordinary_headers", "time_request"]

VALUE_LENGTH: Final = 1020
VALUES: Final = 120


def _repeat(unit: str) -> Callable[[int], str]:
    """Values of ``unit`` repeated to the length, each with a distinct 4-digit tail."""

    def make(index: int) -> str:
        tail = f" {index:04d}"
        body = unit * (VALUE_LENGTH // len(unit) + 1)
        return body[: VALUE_LENGTH - len(tail)] + tail

    return make


#: name → a value maker; the first is the security test's input.
WORST_CASES: Final[dict[str, Callable[[int], str]]] = {
    "411-groups": _repeat("411 "),
    "412-groups": _repeat("412 "),
    "card-groups": _repeat("4111-"),
    "plus-groups": _repeat("+7 900 "),
    "phones": _repeat("+7 900 123 45 67, "),
    "nbsp-phones": _repeat("+7\u00a0900\u00a0123\u00a045\u00a067 "),
    "emails": _repeat("ivan.canary@example.com "),
    "quoted-locals": _repeat('"a b"@x '),
    "quotes": _repeat('"'),
    "uuids-and-digits": _repeat("123e4567-e89b-12d3-a456-426614174000 8 900 "),
}


def ordinary_headers() -> list[tuple[str, str]]:
    """The benchmark's status change as a CRM client sends it."""
    return [
        ("Host", "mes.internal:8080"),
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
        ("User-Agent", "crm-client/4.2 (+python-aiohttp/3.9)"),
        ("X-Request-Id", "6f1c2a9e-4b7d-4e1a-9c3f-2d5b8a7e0c41"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("Content-Length", "52"),
    ]


def crafted_values(case: str, count: int = VALUES) -> list[tuple[str, str]]:
    """``count`` distinct ``X-Request-Id`` fields of one worst-case family."""
    make = WORST_CASES[case]
    return [("X-Request-Id", make(index)) for index in range(count)]


def time_request(redactor: Redactor, headers: Sequence[tuple[str, str]], rounds: int) -> float:
    """Median seconds of one request's header redaction, the memo emptied before each round."""
    times: list[float] = []
    for _ in range(rounds):
        redactor._memo.clear()
        started = time.perf_counter()
        redactor.headers(headers)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    """Print one line per case: microseconds per request and per value."""
    parser = argparse.ArgumentParser(prog="python -m bench.redact", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds per case; the median is shown")
    parser.add_argument("--values", type=int, default=VALUES, help="crafted values per request")
    parser.add_argument("--case", action="append", choices=sorted(WORST_CASES), help="only these cases")
    args = parser.parse_args(argv)
    redactor = Redactor()
    rows = [("ordinary", ordinary_headers())]
    rows += [(case, crafted_values(case, args.values)) for case in args.case or WORST_CASES]
    print(f"{'case':<18} {'per request':>14} {'per value':>12}")
    for name, headers in rows:
        seconds = time_request(redactor, headers, args.rounds)
        per_value = seconds / max(1, len(headers))
        print(f"{name:<18} {seconds * 1e6:>11.0f} us {per_value * 1e6:>9.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
