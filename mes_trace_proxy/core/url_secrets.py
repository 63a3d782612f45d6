"""Credentials in URLs, masked for display: the userinfo password and secret-named parameters.

``/config`` and ``check-config`` show every URL-valued setting (the state store, the Jaeger UI,
the AMQP broker, the upstreams) through :func:`mask_url`, so one rule decides what a reader of
the dump never sees: ``redis://user:***@host``, ``http://jaeger/?token=***``.

Pure: strings in, strings out; the URL is not validated here (the loader did that) and nothing
but the masked values changes, so the dump still shows which setting points where.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote_plus

__all__ = ["MASK", "SECRET_WORDS", "is_secret_name", "mask_url"]

#: What a masked value becomes.
MASK: Final = "***"

#: A query or fragment parameter is a secret when the last word of its name is one of these
#: (words split at ``-``, ``_`` and ``.``, case-insensitive): ``token``, ``access_token``,
#: ``X-Amz-Signature``, ``client_secret``, ``api_key``, ``apikey``. The last word, not any
#: word: ``key_id`` or ``token_type`` name no secret, and ``monkey`` is one word.
SECRET_WORDS: Final = frozenset(
    {
        "token",
        "secret",
        "password",
        "passwd",
        "pwd",
        "key",
        "apikey",
        "sig",
        "signature",
        "credential",
        "credentials",
    }
)
_WORD_SEPARATORS: Final = re.compile(r"[-_.]")


def is_secret_name(name: str) -> bool:
    """Whether a query parameter called ``name`` (as written, possibly percent-encoded) holds a secret."""
    words = _WORD_SEPARATORS.split(unquote_plus(name).strip().lower())
    return words[-1] in SECRET_WORDS


def _mask_params(params: str) -> str:
    """``a=1&token=x`` → ``a=1&token=***``; names, order, separators and empty values stay."""
    parts = params.split("&")
    for index, part in enumerate(parts):
        name, equals, value = part.partition("=")
        if equals and value and is_secret_name(name):
            parts[index] = f"{name}={MASK}"
    return "&".join(parts)


def _mask_userinfo(base: str) -> str:
    """``scheme://user:secret@host/path`` → ``scheme://user:***@host/path``.

    The authority ends at the first ``/`` after ``//`` (the caller has cut ``?`` and ``#``),
    and the password runs from the first ``:`` of the userinfo to its last ``@``, as
    :func:`urllib.parse.urlsplit` and redis-py read it.
    """
    start = base.find("://")
    if start < 0:
        return base
    start += 3
    end = base.find("/", start)
    end = len(base) if end < 0 else end
    userinfo, at, host = base[start:end].rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not at or not colon or not password:
        return base
    return f"{base[:start]}{user}:{MASK}@{host}{base[end:]}"


def mask_url(url: str) -> str:
    """The URL with its userinfo password and every secret-named query or fragment parameter masked.

    Args:
        url: any URL-valued setting, as configured (``memory`` and other non-URLs pass unchanged).

    Returns:
        The same text with each such value replaced by ``***``.
    """
    head, hash_mark, fragment = url.partition("#")
    base, question_mark, query = head.partition("?")
    # A fragment may carry parameters too (OAuth's implicit flow puts access_token there).
    return _mask_userinfo(base) + question_mark + _mask_params(query) + hash_mark + _mask_params(fragment)
