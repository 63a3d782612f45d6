"""The demo's message-path summary lines (the run itself is covered by tests/test_demo.py)."""

from __future__ import annotations

from mes_trace_proxy.messages.demo import HOW_TO_ENABLE, MessageDemoResult, message_summary_lines


def test_without_a_broker_one_line_says_how_to_turn_it_on() -> None:
    assert message_summary_lines(None) == [HOW_TO_ENABLE]
    assert "rabbitmq-server" in HOW_TO_ENABLE


def test_the_summary_lists_dead_letters_and_the_redrive() -> None:
    result = MessageDemoResult(
        broker="127.0.0.1:5672/",
        sent=8,
        dead_lettered=(
            ("ORD-MQ-0001", "price request expired in mes.price.requests after 1 s"),
            ("ORD-MQ-0008", "price request rejected by a consumer of mes.price.requests"),
        ),
        redriven="ORD-MQ-0001",
        redrive_outcome="redriven",
        priced_after_redrive=True,
    )
    assert message_summary_lines(result) == [
        "Message path (RabbitMQ 127.0.0.1:5672/): 8 price requests over AMQP, 2 dead-lettered",
        "  ORD-MQ-0001  price request expired in mes.price.requests after 1 s",
        "  ORD-MQ-0008  price request rejected by a consumer of mes.price.requests",
        "  re-drive ORD-MQ-0001: redriven; MES priced it: back on track",
    ]
