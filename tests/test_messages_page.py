"""The page's "Dead letters" section: escaped values, buttons for admins only, the notice."""

from __future__ import annotations

import pytest

from mes_trace_proxy.messages.page import dead_letter_section
from mes_trace_proxy.messages.record import FlaggedOrder

FLAGGED = FlaggedOrder(
    order_id="ORD/<7>",
    status="SUBMITTED",
    since=1.0,
    dead_letter={
        "cause": "price request expired in mes.price.requests after 30 s",
        "time": "2026-12-07T12:00:00Z",
    },
)


def test_admins_get_a_redrive_button_posting_to_the_order() -> None:
    html = dead_letter_section([FLAGGED], can_redrive=True, notice=None)
    assert 'action="/orders/ORD%2F%3C7%3E/redrive"' in html
    assert "<button" in html
    assert "ORD/&lt;7&gt;" in html  # escaped, never raw markup
    assert "<7>" not in html
    assert "price request expired in mes.price.requests after 30 s" in html


def test_viewers_see_the_list_without_buttons() -> None:
    html = dead_letter_section([FLAGGED], can_redrive=False, notice=None)
    assert "<form" not in html
    assert "Dead letters (1)" in html


@pytest.mark.parametrize(
    ("notice", "text"),
    [
        ("redriven", "back on its queue"),
        ("broker_unavailable", "cannot be reached"),
        ("<script>", "Re-drive done."),
    ],
)
def test_the_notice_after_a_form_post(notice: str, text: str) -> None:
    html = dead_letter_section([], can_redrive=True, notice=notice)
    assert text in html
    assert "<script>" not in html
    assert "No order is waiting" in html
