"""JSON logs: one object per line, extra fields kept, exception messages never printed."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from mes_trace_proxy.telemetry.logs import ACCESS_LOGGER, AccessLog, JsonFormatter, configure_logging


def test_formatter_writes_one_json_object_with_extra_fields() -> None:
    """A record becomes JSON with time, level, logger, message and the caller's extra fields."""
    record = logging.LogRecord(
        "mes_trace_proxy.x", logging.WARNING, __file__, 1, "store down %s", ("now",), None
    )
    record.listener = "ingress"
    data = json.loads(JsonFormatter().format(record))
    assert data["level"] == "warning"
    assert data["logger"] == "mes_trace_proxy.x"
    assert data["message"] == "store down now"
    assert data["listener"] == "ingress"
    assert data["time"].endswith("Z")


def test_formatter_names_exception_class_but_never_its_message() -> None:
    """Exception text can carry request data, so only the class name is logged."""
    try:
        raise ValueError("customer ivan@example.com")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert json.loads(line)["exception"] == "ValueError"
    assert "ivan@example.com" not in line


def test_access_log_batches_lines_until_flushed_and_survives_a_closed_stream() -> None:
    """Lines queue until a flush writes them as JSON; a closed stdout never raises into a request."""
    stream = io.StringIO()
    write = AccessLog(stream)
    write({"route": "/api/v1/orders/{orderId}", "status": 200})
    write({})
    assert stream.getvalue() == ""
    write.flush()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["logger"] == ACCESS_LOGGER
    assert first["status"] == 200
    assert second["logger"] == ACCESS_LOGGER
    stream.close()
    write({"status": 500})
    write.flush()


def test_access_log_flushes_early_on_a_burst() -> None:
    """A burst larger than the batch is written at once instead of growing the buffer."""
    stream = io.StringIO()
    write = AccessLog(stream, max_lines=3)
    for status in (200, 201, 202):
        write({"status": status})
    assert len(stream.getvalue().splitlines()) == 3


async def test_access_log_task_flushes_when_cancelled() -> None:
    """Cancelling the flush task (shutdown) writes what is still queued."""
    stream = io.StringIO()
    write = AccessLog(stream, interval=3600)
    task = asyncio.ensure_future(write.run())
    await asyncio.sleep(0)
    write({"status": 204})
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert json.loads(stream.getvalue())["status"] == 204


def test_configure_logging_routes_records_as_json() -> None:
    """After configure_logging, application records come out as JSON at the chosen level."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("warning", stream)
        logging.getLogger("mes_trace_proxy.t").info("hidden")
        logging.getLogger("mes_trace_proxy.t").warning("shown")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["shown"]


@pytest.mark.parametrize(
    "order_id",
    [None, "A-1", 'quote"and\\backslash', "caf\u00e9 \u0417\u0430\u043a\u0430\u0437", "tab\tnew\nline"],
)
def test_request_lines_are_the_json_the_general_form_writes(order_id: str | None) -> None:
    """AccessLog.request builds the line by hand; it is the JSON __call__ writes for those keys."""
    error_type = None if order_id is None else "upstream_read_timeout"
    fast_stream, general_stream = io.StringIO(), io.StringIO()
    fast, general = AccessLog(fast_stream), AccessLog(general_stream)
    fast.request(
        "ingress",
        "PUT",
        "/api/v1/orders/{orderId}/status",
        200,
        0.0764,
        50,
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
        order_id,
        error_type,
    )
    general(
        {
            "listener": "ingress",
            "method": "PUT",
            "route": "/api/v1/orders/{orderId}/status",
            "status": 200,
            "duration_ms": 0.076,
            "bytes_sent": 50,
            "trace_id": "0af7651916cd43dd8448eb211c80319c",
            "span_id": "b7ad6b7169203331",
            "order_id": order_id,
            "error_type": error_type,
        }
    )
    fast.flush()
    general.flush()
    fast_line, general_line = fast_stream.getvalue(), general_stream.getvalue()
    assert fast_line.endswith("\n")
    assert fast_line.count("\n") == 1
    # The time prefix may differ by a millisecond between the two calls.
    assert {**json.loads(fast_line), "time": ""} == {**json.loads(general_line), "time": ""}
    assert list(json.loads(fast_line)) == list(json.loads(general_line))
    assert fast_line.isascii()


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        # 1765000000.001 as a float is 1765000000.0009999…: "% 1 * 1000" alone would print .000.
        (1765000000.001, "2025-12-06T05:46:40.001Z"),
        (1765000000.999, "2025-12-06T05:46:40.999Z"),
        (1765000001.0, "2025-12-06T05:46:41.000Z"),
        (1765000061.5, "2025-12-06T05:47:41.500Z"),
    ],
)
def test_access_lines_carry_the_millisecond_they_were_written_in(
    now: float, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached time prefix follows the clock to the millisecond, across seconds too."""
    stream = io.StringIO()
    log = AccessLog(stream)
    # A line in an earlier second and millisecond first, so the caches must be replaced.
    monkeypatch.setattr("time.time", lambda: now - 1.25)
    log.request("ingress", "GET", "/x", 200, 1.0, 0, "0" * 32, "0" * 16, None, None)
    monkeypatch.setattr("time.time", lambda: now)
    log.request("ingress", "GET", "/x", 200, 1.0, 0, "0" * 32, "0" * 16, None, None)
    log.flush()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert second["time"] == expected
    assert first["time"] != expected
