"""The ``messages`` section: good values, a clear error naming the key for each bad one, the policy."""

from __future__ import annotations

import pytest

from mes_trace_proxy.messages.settings import (
    AutoRedrive,
    MessagesConfig,
    MessagesConfigError,
    auto_redrive_delay,
    mask_amqp_url,
    parse_messages,
)

URL = "amqp://proxy:s3cret@127.0.0.1:5672/mes"


def test_no_url_means_off() -> None:
    off = parse_messages({})
    assert not off.enabled
    assert off.describe() == MessagesConfig().describe()


def test_a_full_section() -> None:
    cfg = parse_messages(
        {
            "amqp_url": URL,
            "amqp_password_file": "/run/secrets/amqp",
            "tls": {"ca": "/ca.pem", "cert": "/c.pem", "key": "/k.pem"},
            "dead_letter_queues": "mes.dead-letters, other.dlq",  # the environment's form
            "observe_exchange": "mes.dlx",
            "prefetch": 10,
            "restore_expiration": "true",
            "message_rules": [{"name": "r", "order_id": "header:x-order"}],
            "auto_redrive": {"mes.price.requests": {"attempts": 2, "backoff": "500ms"}},
        }
    )
    assert cfg.enabled
    assert cfg.dead_letter_queues == ("mes.dead-letters", "other.dlq")
    assert (cfg.observe_exchange, cfg.prefetch, cfg.restore_expiration) == ("mes.dlx", 10, True)
    assert [r.name for r in cfg.rules.rules] == ["r"]
    assert cfg.auto_redrive == {
        "mes.price.requests": AutoRedrive(attempts=2, backoff_s=0.5, reasons=frozenset({"expired", "maxlen"}))
    }
    described = cfg.describe()
    assert described["amqp_url"] == "amqp://proxy:***@127.0.0.1:5672/mes"
    assert "s3cret" not in repr(described)
    assert "s3cret" not in repr(cfg)


@pytest.mark.parametrize(
    ("section", "key", "needle"),
    [
        ({"dead_letter_queues": ["q"]}, "messages.amqp_url", "no broker"),
        ({"amqp_url": URL}, "messages.dead_letter_queues", "name a dead-letter queue"),
        ({"amqp_url": "http://x/", "dead_letter_queues": ["q"]}, "messages.amqp_url", "expected amqp://"),
        ({"amqp_url": "amqp://u:pw@/", "dead_letter_queues": ["q"]}, "messages.amqp_url", "expected amqp://"),
        ({"amqp_url": URL, "dead_letter_queues": ["q", "q"]}, "messages.dead_letter_queues", "listed twice"),
        ({"amqp_url": URL, "dead_letter_queues": 5}, "messages.dead_letter_queues", "expected a list"),
        ({"amqp_url": URL, "dead_letter_queues": ["q" * 256]}, "messages.dead_letter_queues[0]", "255 bytes"),
        ({"amqp_url": URL, "dead_letter_queues": ["q"], "prefetch": 0}, "messages.prefetch", "from 1"),
        ({"amqp_url": URL, "dead_letter_queues": ["q"], "tls": {"pem": "x"}}, "messages.tls", "ca, cert"),
        ({"amqp_url": URL, "dead_letter_queues": ["q"], "restore_expiration": "maybe"},
         "messages.restore_expiration", "true or false"),
        ({"amqp_url": URL, "dead_letter_queues": ["q"], "message_rules": [{"order_id": "nope:x"}]},
         "messages.message_rules[0].order_id", "unknown message source kind"),
        ({"amqp_url": URL, "dead_letter_queues": ["q"], "auto_redrive": {"q": {"attempts": 0}}},
         "messages.auto_redrive.q.attempts", "from 1 to 100"),
        ({"amqp_url": URL, "dead_letter_queues": ["q"], "auto_redrive": {"q": {"backoff": "soon"}}},
         "messages.auto_redrive.q.backoff", "positive duration"),
        ({"amqp_url": URL, "dead_letter_queues": ["q"], "auto_redrive": {"q": {"reasons": ["bored"]}}},
         "messages.auto_redrive.q.reasons", "unknown reason"),
        ({"amqp_url": URL, "dead_letter_queues": ["q"], "auto_redrive": {"q": {"tries": 1}}},
         "messages.auto_redrive.q.tries", "unknown key"),
        ({"amqp_url": URL, "dead_letter_queues": ["q"], "auto_redrive": []},
         "messages.auto_redrive", "mapping"),
        ({"amqp_url": URL, "queues": ["q"]}, "messages.queues", "unknown key"),
    ],
)  # fmt: skip
def test_bad_settings_name_the_key(section: dict[str, object], key: str, needle: str) -> None:
    with pytest.raises(MessagesConfigError) as caught:
        parse_messages(section)
    assert caught.value.key == key
    assert needle in caught.value.message
    assert "pw@" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://u:p@h/v", "amqp://u:***@h/v"),
        ("amqps://u:p%40x@h:5671/", "amqps://u:***@h:5671/"),
        ("amqp://h/", "amqp://h/"),
        ("amqp://u@h/", "amqp://u@h/"),
    ],
)
def test_mask_amqp_url(url: str, shown: str) -> None:
    assert mask_amqp_url(url) == shown


POLICIES = {"q": AutoRedrive(attempts=3, backoff_s=10.0)}


@pytest.mark.parametrize(
    ("queue", "reason", "redriven", "delay"),
    [
        ("q", "expired", 0, 10.0),
        ("q", "maxlen", 1, 20.0),
        ("q", "expired", 2, 40.0),
        ("q", "expired", 3, None),  # attempts used up
        ("q", "rejected", 0, None),  # not transient
        ("other", "expired", 0, None),  # no policy: off by default
        (None, "expired", 0, None),
        ("q", None, 0, None),
    ],
)
def test_auto_redrive_delay(
    queue: str | None, reason: str | None, redriven: int, delay: float | None
) -> None:
    assert auto_redrive_delay(POLICIES, queue=queue, reason=reason, redriven=redriven) == delay
