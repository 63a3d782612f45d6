"""The message path on the admin listener: ``POST /orders/{id}/redrive`` and the ``dead_letter`` objects.

The route needs the ``admin`` role (the admin listener's role table); a viewer gets 403 there,
before this handler runs. The audit line names the caller by role and a fingerprint of the
token (the first 8 hex digits of its SHA-256, never the token), as ``admin:sha256:1a2b3c4d``.

A form on the page posts here too: such a request (``application/x-www-form-urlencoded``) is
answered with a redirect back to the page, and refused when it comes from another site
(``Origin`` / ``Sec-Fetch-Site``), since a page elsewhere could otherwise post to a loopback
admin listener that has no tokens.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from typing import Final
from urllib.parse import quote, urlsplit

from aiohttp import web

from mes_trace_proxy.admin_auth import TokenTable
from mes_trace_proxy.messages.page import dead_letter_section
from mes_trace_proxy.messages.record import FlaggedOrder
from mes_trace_proxy.messages.service import MessagePath
from mes_trace_proxy.problems import PROBLEM_CONTENT_TYPE, problem_body, problem_type_uri

__all__ = ["REDRIVE_ROUTE", "add_message_routes", "caller", "dead_letter_of", "flagged_json", "page_section"]

REDRIVE_ROUTE: Final = "/orders/{order_id}/redrive"
#: outcome → (HTTP status, problem slug, title); ``redriven`` is a 200 with a JSON body.
_ANSWERS: Final[Mapping[str, tuple[int, str, str]]] = {
    "nothing_held": (404, "nothing-held", "No dead letter is held for this order"),
    "in_progress": (409, "redrive-in-progress", "A re-drive of this order is under way"),
    "no_destination": (422, "no-destination", "The held message names no exchange to return to"),
    "unroutable": (502, "redrive-unroutable", "The broker could not route the re-driven message"),
    "nacked": (502, "redrive-nacked", "The broker refused the re-driven message"),
    "broker_unavailable": (503, "broker-unavailable", "RabbitMQ cannot be reached"),
}


def caller(table: TokenTable, authorization: str | None) -> str:
    """Who is calling, for the audit log: ``ROLE:sha256:XXXXXXXX``, or ``anonymous`` without tokens."""
    if not table.enabled or authorization is None:
        return "anonymous"
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "anonymous"
    digest = hashlib.sha256(token.strip().encode("utf-8", "surrogatepass")).digest()
    for known, role in table.entries:
        if hmac.compare_digest(known, digest):
            return f"{role.name.lower()}:sha256:{digest.hex()[:8]}"
    return "anonymous"


def flagged_json(flagged: FlaggedOrder, iso: Callable[[float], str]) -> dict[str, object]:
    """A dead-lettered order as an ``/orders/-/stuck`` entry."""
    return {
        "order_id": flagged.order_id,
        "status": flagged.status,
        "since": iso(flagged.since),
        "over_limit_by_seconds": None,
        "limit_seconds": None,
        "dead_letter": dict(flagged.dead_letter),
    }


def _problem(status: int, slug: str, title: str, detail: str) -> web.Response:
    body = problem_body(status=status, title=title, detail=detail, type_=problem_type_uri(slug))
    return web.Response(status=status, body=body, content_type=PROBLEM_CONTENT_TYPE)


def _cross_site(request: web.Request) -> bool:
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in {"same-origin", "none"}:
        return True
    origin = request.headers.get("Origin")
    return origin is not None and origin != "null" and urlsplit(origin).netloc != request.host


def add_message_routes(
    app: web.Application,
    path: Callable[[], MessagePath | None],
    tokens: Callable[[], TokenTable],
) -> None:
    """Add ``POST /orders/{order_id}/redrive`` (route name ``orders.redrive``)."""

    async def redrive(request: web.Request) -> web.StreamResponse:
        from_form = request.content_type == "application/x-www-form-urlencoded"
        if from_form and _cross_site(request):
            return _problem(
                403, "cross-site", "Cross-site form refused", "Re-drive from the proxy's own page."
            )
        messages = path()
        if messages is None:
            return _problem(
                404,
                "messages-off",
                "The message path is off",
                "Start the proxy with --amqp-url to hold dead letters.",
            )
        order_id = request.match_info["order_id"]
        who = caller(tokens(), request.headers.get("Authorization"))
        result = await messages.redrive(order_id, who=who)
        if from_form:
            raise web.HTTPSeeOther(location=f"/?redrive={quote(result.outcome)}")
        if result.outcome != "redriven":
            status, slug, title = _ANSWERS[result.outcome]
            # The id is not echoed: it came from the URL and may be anything.
            return _problem(status, slug, title, f"Re-drive outcome: {result.outcome}.")
        return web.json_response(
            {
                "order_id": order_id,
                "outcome": result.outcome,
                "messages": [{"key": key, "outcome": outcome} for key, outcome in result.outcomes],
                "traceparents": list(result.traceparents),
            }
        )

    app[_PATH] = path
    app[_TOKENS] = tokens
    app.router.add_post(REDRIVE_ROUTE, redrive, name="orders.redrive")


_TOKENS: Final[web.AppKey[Callable[[], TokenTable]]] = web.AppKey("message_path_tokens")
_PATH: Final[web.AppKey[Callable[[], MessagePath | None]]] = web.AppKey("message_path")


def page_section(request: web.Request) -> str:
    """The page's "Dead letters" section for this caller ("" when the message path is off).

    The Re-drive buttons are drawn for the ``admin`` role (or for everyone when the admin
    listener has no tokens, as every route is open then).
    """
    path_of = request.app.get(_PATH)
    messages = path_of() if path_of is not None else None
    if messages is None:
        return ""
    table = request.app[_TOKENS]()
    allowed = not table.enabled or caller(table, request.headers.get("Authorization")).startswith("admin:")
    return dead_letter_section(messages.flagged(), can_redrive=allowed, notice=request.query.get("redrive"))


def dead_letter_of(request: web.Request, order_id: str) -> dict[str, object] | None:
    """The order's ``dead_letter`` object, or ``None`` (also when the message path is off)."""
    path_of = request.app.get(_PATH)
    messages = path_of() if path_of is not None else None
    return None if messages is None else messages.dead_letter(order_id)
