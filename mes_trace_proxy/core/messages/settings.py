"""The ``messages`` configuration section, pure: values in, a frozen :class:`MessagesConfig` out.

``config.load_config`` merges flags, environment and file into the section's mapping (as for
every other section) and calls :func:`parse_messages`; errors name the key. Keys::

    messages:
      amqp_url: amqps://mes-trace-proxy@rabbit.mes:5671/mes   # password: below, never here
      amqp_password_file: /run/secrets/amqp-password           # or MES_PROXY_AMQP_PASSWORD
      tls: {ca: /etc/rabbit/ca.pem, cert: /etc/rabbit/client.pem, key: /etc/rabbit/client.key}
      dead_letter_queues: [mes.dead-letters]                    # own mode
      observe_exchange: mes.dlx                                 # observe mode (either or both)
      observe_queue: mes-trace-proxy.dead-letters
      prefetch: 64
      restore_expiration: false
      message_rules: [...]                                      # default: the reference topology
      auto_redrive:                                             # off unless a queue is listed
        mes.price.requests: {attempts: 3, backoff: 30s, reasons: [expired, maxlen]}
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from mes_trace_proxy.core.messages.deadletter import (
    DEFAULT_MESSAGE_RULES,
    KNOWN_REASONS,
    MessageRules,
    compile_message_rules,
)
from mes_trace_proxy.core.rules import RuleError
from mes_trace_proxy.core.url_secrets import mask_url

__all__ = [
    "TRANSIENT_REASONS",
    "AutoRedrive",
    "MessagesConfig",
    "MessagesConfigError",
    "auto_redrive_delay",
    "mask_amqp_url",
    "parse_messages",
]

#: Reasons a later attempt may cure (the consumer was away, the queue was full); a rejected
#: message or one over its delivery limit would only fail again.
TRANSIENT_REASONS: Final = frozenset({"expired", "maxlen"})
SECTION_KEYS: Final = frozenset(
    {
        "amqp_url", "amqp_password_file", "tls", "dead_letter_queues", "observe_exchange", "observe_queue",
        "prefetch", "restore_expiration", "message_rules", "auto_redrive",
    }
)  # fmt: skip
_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
# AMQP 0-9-1 short strings: queue and exchange names are at most 255 bytes.
_MAX_NAME: Final = 255


class MessagesConfigError(ValueError):
    """A bad ``messages`` setting; ``key`` names it (``messages.auto_redrive.q.attempts``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True, slots=True, kw_only=True)
class AutoRedrive:
    """The opt-in automatic re-drive of one queue's dead letters."""

    attempts: int
    backoff_s: float
    reasons: frozenset[str] = TRANSIENT_REASONS


@dataclass(frozen=True, slots=True, kw_only=True)
class MessagesConfig:
    """The message path; ``amqp_url`` ``None`` turns it off."""

    amqp_url: str | None = field(default=None, repr=False)
    amqp_password_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    dead_letter_queues: tuple[str, ...] = ()
    observe_exchange: str | None = None
    observe_queue: str = "mes-trace-proxy.dead-letters"
    prefetch: int = 64
    restore_expiration: bool = False
    rules: MessageRules = field(
        default_factory=lambda: compile_message_rules(
            list(DEFAULT_MESSAGE_RULES), key="messages.message_rules"
        )
    )
    auto_redrive: Mapping[str, AutoRedrive] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        """Whether a broker is configured."""
        return self.amqp_url is not None

    def describe(self) -> dict[str, object]:
        """For ``/config``: the URL without its password, file paths, no secret."""
        return {
            "amqp_url": mask_amqp_url(self.amqp_url) if self.amqp_url else None,
            "amqp_password_file": self.amqp_password_file,
            "tls": {"ca": self.tls_ca, "cert": self.tls_cert, "key": self.tls_key},
            "dead_letter_queues": list(self.dead_letter_queues),
            "observe_exchange": self.observe_exchange,
            "observe_queue": self.observe_queue,
            "prefetch": self.prefetch,
            "restore_expiration": self.restore_expiration,
            "message_rules": [r.name for r in self.rules.rules],
            "auto_redrive": {
                q: {"attempts": p.attempts, "backoff": p.backoff_s, "reasons": sorted(p.reasons)}
                for q, p in self.auto_redrive.items()
            },
        }


def mask_amqp_url(url: str) -> str:
    """``amqp://user:secret@host/vhost`` → ``amqp://user:***@host/vhost``; secret-named query
    parameters masked too, as in every URL ``/config`` shows (core/url_secrets.py)."""
    return mask_url(url)


def _text(key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MessagesConfigError(key, "must be a non-empty string")
    return value.strip()


def _name(key: str, value: object) -> str:
    text = _text(key, value)
    if len(text.encode("utf-8")) > _MAX_NAME:
        raise MessagesConfigError(key, "an AMQP queue or exchange name is at most 255 bytes")
    return text


def _names(key: str, value: object) -> tuple[str, ...]:
    # The environment gives a comma-separated string; the file and repeated flags a list.
    items: Sequence[object] = (
        value.split(",") if isinstance(value, str) else value if isinstance(value, list) else ()
    )
    if not isinstance(value, str | list):
        raise MessagesConfigError(key, "expected a list of queue names")
    names = tuple(
        _name(f"{key}[{i}]", item)
        for i, item in enumerate(items)
        if not (isinstance(item, str) and not item.strip())
    )
    if len(set(names)) != len(names):
        raise MessagesConfigError(key, "a queue is listed twice")
    return names


def _url(key: str, value: object) -> str:
    text = _text(key, value)
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in {"amqp", "amqps"} or not rest.rpartition("@")[2].split("/")[0]:
        raise MessagesConfigError(
            key, f"expected amqp://HOST[:PORT][/VHOST] or amqps://…; got {mask_amqp_url(text)!r}"
        )
    return text


def _duration(key: str, value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    found = _DURATION.match(value) if isinstance(value, str) else None
    if found is None or float(found.group(1)) <= 0:
        raise MessagesConfigError(key, f"expected a positive duration such as 30s or 500ms; got {value!r}")
    return float(found.group(1)) * _UNITS[found.group(2)]


def _bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
        return value.lower() in {"true", "1", "yes"}
    raise MessagesConfigError(key, f"expected true or false; got {value!r}")


def _auto(key: str, raw: object) -> dict[str, AutoRedrive]:
    if not isinstance(raw, Mapping):
        raise MessagesConfigError(key, "expected a mapping of queue name to {attempts, backoff, reasons}")
    policies: dict[str, AutoRedrive] = {}
    for queue, spec in raw.items():
        item = f"{key}.{queue}"
        if not isinstance(spec, Mapping):
            raise MessagesConfigError(item, "expected {attempts: N, backoff: DURATION}")
        unknown = sorted(set(spec) - {"attempts", "backoff", "reasons"})
        if unknown:
            raise MessagesConfigError(
                f"{item}.{unknown[0]}", "unknown key; allowed: attempts, backoff, reasons"
            )
        attempts = spec.get("attempts", 3)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 100:
            raise MessagesConfigError(f"{item}.attempts", "expected a whole number from 1 to 100")
        reasons_raw = spec.get("reasons", sorted(TRANSIENT_REASONS))
        if not isinstance(reasons_raw, list) or not reasons_raw:
            raise MessagesConfigError(f"{item}.reasons", "expected a non-empty list of reasons")
        reasons = frozenset(str(r) for r in reasons_raw)
        if not reasons <= KNOWN_REASONS:
            raise MessagesConfigError(
                f"{item}.reasons", f"unknown reason; use {', '.join(sorted(KNOWN_REASONS))}"
            )
        policies[_name(item, queue)] = AutoRedrive(
            attempts=attempts,
            backoff_s=_duration(f"{item}.backoff", spec.get("backoff", "30s")),
            reasons=reasons,
        )
    return policies


def parse_messages(section: Mapping[str, object], *, key: str = "messages") -> MessagesConfig:
    """Validate the merged ``messages`` section.

    Raises:
        MessagesConfigError: naming the first bad key.
    """
    unknown = sorted(set(section) - SECTION_KEYS)
    if unknown:
        raise MessagesConfigError(
            f"{key}.{unknown[0]}", f"unknown key; allowed: {', '.join(sorted(SECTION_KEYS))}"
        )
    url = section.get("amqp_url")
    if url is None:
        if section.get("dead_letter_queues") or section.get("observe_exchange"):
            raise MessagesConfigError(
                f"{key}.amqp_url", "dead-letter queues are named but no broker: set --amqp-url"
            )
        return MessagesConfig()
    queues = _names(f"{key}.dead_letter_queues", section.get("dead_letter_queues", []))
    observe = section.get("observe_exchange")
    if not queues and observe is None:
        raise MessagesConfigError(
            f"{key}.dead_letter_queues",
            "name a dead-letter queue (own mode) or an observe_exchange (observe mode)",
        )
    tls = section.get("tls") or {}
    if not isinstance(tls, Mapping) or set(tls) - {"ca", "cert", "key"}:
        raise MessagesConfigError(f"{key}.tls", "expected a mapping with ca, cert and key file paths")
    prefetch = section.get("prefetch", 64)
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 1 <= prefetch <= 10_000:
        raise MessagesConfigError(f"{key}.prefetch", "expected a whole number from 1 to 10000")
    try:
        rules = compile_message_rules(
            section.get("message_rules", list(DEFAULT_MESSAGE_RULES)), key=f"{key}.message_rules"
        )
    except RuleError as exc:
        raise MessagesConfigError(exc.key, exc.message) from None
    password_file = section.get("amqp_password_file")
    observe_queue = section.get("observe_queue", "mes-trace-proxy.dead-letters")
    return MessagesConfig(
        amqp_url=_url(f"{key}.amqp_url", url),
        amqp_password_file=None
        if password_file is None
        else _text(f"{key}.amqp_password_file", password_file),
        tls_ca=None if tls.get("ca") is None else _text(f"{key}.tls.ca", tls.get("ca")),
        tls_cert=None if tls.get("cert") is None else _text(f"{key}.tls.cert", tls.get("cert")),
        tls_key=None if tls.get("key") is None else _text(f"{key}.tls.key", tls.get("key")),
        dead_letter_queues=queues,
        observe_exchange=None if observe is None else _name(f"{key}.observe_exchange", observe),
        observe_queue=_name(f"{key}.observe_queue", observe_queue),
        prefetch=prefetch,
        restore_expiration=_bool(f"{key}.restore_expiration", section.get("restore_expiration", False)),
        rules=rules,
        auto_redrive=_auto(f"{key}.auto_redrive", section.get("auto_redrive", {})),
    )


def auto_redrive_delay(
    policies: Mapping[str, AutoRedrive], *, queue: str | None, reason: str | None, redriven: int
) -> float | None:
    """Seconds to wait before re-driving a dead letter automatically, or ``None`` for never.

    Args:
        policies: per queue (the queue the message died in).
        queue: that queue; ``reason``: the death reason.
        redriven: how often it was re-driven already (its ``x-mes-redrive-count`` header).

    The back-off doubles with each attempt: ``backoff``, ``2 * backoff``, ``4 * backoff`` and so on.
    """
    if queue is None or reason is None:
        return None
    policy = policies.get(queue)
    if policy is None or reason not in policy.reasons or redriven >= policy.attempts:
        return None
    return float(policy.backoff_s * (2**redriven))
