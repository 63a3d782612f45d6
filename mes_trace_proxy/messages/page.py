"""The operations page's "Dead letters" section: pure HTML from the flagged orders.

Every value through ``html.escape``; no script. For an admin each order gets a form button
that posts to ``/orders/{id}/redrive`` (the page's CSP allows forms to its own origin only);
a viewer sees the same list without buttons.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Final
from urllib.parse import quote

from mes_trace_proxy.messages.record import FlaggedOrder

__all__ = ["PAGE_DEAD_LETTER_LIMIT", "dead_letter_section"]

#: Dead-lettered orders drawn on the page; ``/orders/-/stuck`` has them all.
PAGE_DEAD_LETTER_LIMIT: Final = 100
#: The re-drive outcomes the page reports after a form post (``/?redrive=OUTCOME``), in words.
_NOTICES: Final = {
    "redriven": "Re-driven: the message is back on its queue.",
    "nothing_held": "Nothing to re-drive: the message was re-driven already.",
    "in_progress": "A re-drive of this order is under way.",
    "no_destination": "The held message names no exchange to return to.",
    "unroutable": "The broker could not route the message; it is still held.",
    "nacked": "The broker refused the message; it is still held.",
    "broker_unavailable": "RabbitMQ cannot be reached; the message is still held.",
}


def _item(flagged: FlaggedOrder, can_redrive: bool) -> str:
    esc = html.escape
    dead = flagged.dead_letter
    button = (
        f'<form method="post" action="/orders/{esc(quote(flagged.order_id, safe=""))}/redrive">'
        '<button type="submit">Re-drive</button></form>'
        if can_redrive
        else ""
    )
    status = f'<span class="status">{esc(flagged.status)}</span>' if flagged.status else ""
    return (
        f'<li class="order dead-letter" data-order-id="{esc(flagged.order_id)}">'
        f'<div class="head"><span class="id">{esc(flagged.order_id)}</span>{status}</div>'
        f'<div class="since">{esc(str(dead.get("cause", "")))} · '
        f'<time datetime="{esc(str(dead.get("time", "")))}">{esc(str(dead.get("time", "")))}</time></div>'
        f"{button}</li>"
    )


def dead_letter_section(flagged: Sequence[FlaggedOrder], *, can_redrive: bool, notice: str | None) -> str:
    """The section's HTML: a notice after a re-drive, then the orders with their causes.

    Args:
        flagged: the dead-lettered orders that have not moved on (``MessagePath.flagged``).
        can_redrive: whether the caller has the admin role (buttons are drawn).
        notice: the ``redrive`` query parameter after a form post, or ``None``.
    """
    parts = [f'<section><h2 id="dead-letters">Dead letters ({len(flagged)})</h2>']
    if notice is not None:
        parts.append(
            f'<p class="meta" role="status">{html.escape(_NOTICES.get(notice, "Re-drive done."))}</p>'
        )
    if not flagged:
        parts.append('<p class="empty">No order is waiting on a dead-lettered message.</p>')
    else:
        items = "".join(_item(f, can_redrive) for f in flagged[:PAGE_DEAD_LETTER_LIMIT])
        parts.append(f'<ol class="stuck">{items}</ol>')
    parts.append("</section>")
    return "".join(parts)
