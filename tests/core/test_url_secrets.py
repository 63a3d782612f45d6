"""Tests for core.url_secrets: which parts of a URL /config masks, as a table of URLs."""

from __future__ import annotations

import pytest

from mes_trace_proxy.core.url_secrets import SECRET_WORDS, is_secret_name, mask_url

MASKED = [
    # the userinfo password, to the last '@' of the authority
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://user:pw@h/0", "redis://user:***@h/0"),
    ("redis://user:p@ss:w@h/0", "redis://user:***@h/0"),
    ("amqps://u:p%40x@h:5671/", "amqps://u:***@h:5671/"),
    ("http://jaeger:pa55word@jaeger:16686", "http://jaeger:***@jaeger:16686"),
    ("https://u:pw@[::1]:8443/ui?x=1", "https://u:***@[::1]:8443/ui?x=1"),
    # every secret-looking query name the brief lists, any case
    ("redis://h/0?db=1&password=pw", "redis://h/0?db=1&password=***"),
    ("redis://h/0?PASSWORD=pw", "redis://h/0?PASSWORD=***"),
    ("http://j:16686/?token=t0k", "http://j:16686/?token=***"),
    ("http://j/?access_token=t&lang=en", "http://j/?access_token=***&lang=en"),
    ("http://j/?Api_Key=k", "http://j/?Api_Key=***"),
    ("http://j/?apikey=k", "http://j/?apikey=***"),
    ("http://j/?key=k", "http://j/?key=***"),
    ("http://j/?secret=s", "http://j/?secret=***"),
    ("http://j/?sig=s", "http://j/?sig=***"),
    ("http://j/?Signature=s", "http://j/?Signature=***"),
    # names whose last word is a secret word, in the shapes services use
    ("https://b.s3/o?X-Amz-Signature=ab&X-Amz-Date=1", "https://b.s3/o?X-Amz-Signature=***&X-Amz-Date=1"),
    ("http://j/?client_secret=s&refresh_token=r", "http://j/?client_secret=***&refresh_token=***"),
    ("http://j/?x-api-key=k", "http://j/?x-api-key=***"),
    ("http://j/?access%5Ftoken=t", "http://j/?access%5Ftoken=***"),
    # both at once, the same name twice, and a fragment holding parameters
    ("http://u:pw@j/?token=a&token=b", "http://u:***@j/?token=***&token=***"),
    ("http://j/ui#access_token=t&state=s", "http://j/ui#access_token=***&state=s"),
    ("http://j/?a=1#token=t", "http://j/?a=1#token=***"),
]

UNCHANGED = [
    "sqlite:///./a.db",
    "sqlite:////var/lib/mes-trace-proxy/state.db",
    "memory",
    "http://localhost:16686",
    "http://127.0.0.1:8081/api",
    "amqp://h/",
    "amqp://u@h/",  # a user name alone is no password
    "redis://u:@h/0",  # an empty password hides nothing
    "http://j/?monkey=1&keyspace=2&key_id=3&token_type=bearer",  # the last word decides
    "http://j/?token=&lang=en",  # nothing to hide
    "http://j/?token",  # a bare name
    "http://j/ui#section-2",
    "http://j/path/with:colon/and@at",  # '@' past the authority is path, not userinfo
]


@pytest.mark.parametrize(("url", "masked"), MASKED, ids=[url for url, _ in MASKED])
def test_secrets_are_masked(url: str, masked: str) -> None:
    """The password and every secret-named parameter become ***; the rest of the URL stays as written."""
    assert mask_url(url) == masked


@pytest.mark.parametrize("url", UNCHANGED)
def test_urls_without_a_secret_are_left_alone(url: str) -> None:
    """No password and no secret-named parameter: the text comes back unchanged."""
    assert mask_url(url) == url


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        *((word, True) for word in sorted(SECRET_WORDS)),
        *((word.upper(), True) for word in sorted(SECRET_WORDS)),
        ("access_token", True),
        ("id.token", True),
        ("api-key", True),
        ("lang", False),
        ("tokens_file", False),
        ("signed", False),
        ("", False),
    ],
)
def test_secret_names(name: str, secret: bool) -> None:
    """A name is a secret's when its last word (split at - _ .) is a secret word, in any case."""
    assert is_secret_name(name) is secret
