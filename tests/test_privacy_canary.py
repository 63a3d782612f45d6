"""The privacy canary suite: known personal data goes in, and none of it comes out anywhere the proxy writes.

Requests carry names, e-mail addresses, phone numbers (international and Russian formats),
Luhn-valid card numbers, a raw user id, a bearer JWT and cookies in path segments, query
values (allow-listed and not), headers and JSON bodies (top level and nested); the upstream
answers with more of them in its body and headers. A real proxy process exports through the
real OTLP exporter to the OtlpSink, and everything it emitted is searched: every span (name,
attributes, events, links, resource), every line it printed (application and access logs at
debug level), ``/metrics``, ``/config`` and every admin page and order lookup it serves.
Each canary is searched as sent, in lower and upper case, percent-encoded and JSON-escaped.

What the proxy does not promise (docs/security.md): a name has no pattern, so a name sent
where the proxy records the value (a path segment, an allow-listed query value, the status a
rule reads) is not recognised; the canaries below put names only where the promise covers them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Final
from urllib.parse import quote, quote_plus

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mes_trace_proxy.admin import ROUTE_ROLES
from mes_trace_proxy.redact import pseudonymize
from mes_trace_proxy.sim.otlp_sink import OtlpSink, ReceivedSpan
from mes_trace_proxy.textfold import fold
from tests.conftest import MakeConfig, StartProxy, otlp_env
from tests.proxy_process import ProxyProcess, proxy_process

# Every wait below is bounded; each is met in well under a second here.
WAIT = 15.0

# ── the canaries ───────────────────────────────────────────────────────────────────────────
NAME = "Ivanna Canarykova"
NAME_RU = "Анна Канареечкина"
RESPONSE_NAME = "Responsa Canarova"
EMAIL = "anna.canary@example.org"
RESPONSE_EMAIL = "Resp.Canary@Example.NET"
PHONE_INTL = "+44 20 7946 0958"
PHONE_RU = "+7 (912) 345-67-89"
PHONE_RU_8 = "8 912 345 67 89"
PHONE_RU_PLAIN = "89123456780"
RESPONSE_PHONE = "+7 495 123-45-67"
CARD = "4111 1111 1111 1111"
CARD_DASHED = "5500-0000-0000-0004"
CARD_PLAIN = "4012888888881881"
USER_ID = "user-canary-31337"
JWT_SUBJECT = "jwt-sub-canary-777"
COOKIE = "cookie-canary-secret-4242"
SET_COOKIE = "response-cookie-canary-5151"
CUSTOM_HEADER = "custom-header-canary-6262"
USER_KEY = "user-id-key-for-the-canary-suite-0123"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


JWT = ".".join(
    [
        _b64url(b'{"alg":"HS256","typ":"JWT"}'),
        _b64url(json.dumps({"sub": JWT_SUBJECT, "name": NAME, "email": EMAIL}).encode()),
        _b64url(b"signature-canary-8383"),
    ]
)

#: Data the redactor recognises by pattern: safe to send anywhere.
PATTERN_CANARIES = (
    EMAIL,
    RESPONSE_EMAIL,
    PHONE_INTL,
    PHONE_RU,
    PHONE_RU_8,
    RESPONSE_PHONE,
    CARD,
    CARD_DASHED,
)
#: Everything that must never come out.
CANARIES = (
    *PATTERN_CANARIES,
    PHONE_RU_PLAIN,
    CARD_PLAIN,
    NAME,
    NAME_RU,
    RESPONSE_NAME,
    USER_ID,
    JWT_SUBJECT,
    JWT,
    COOKIE,
    SET_COOKIE,
    CUSTOM_HEADER,
    USER_KEY,
)


def _variants(canary: str) -> set[str]:
    """The forms a canary could take in output: as sent, case-changed, percent-encoded, JSON-escaped,
    and for numbers their bare digits."""
    forms = {canary, canary.lower(), canary.upper()}
    forms |= {quote(form, safe="") for form in list(forms)} | {quote_plus(form) for form in list(forms)}
    forms |= {form.replace("%40", "%40".lower()) for form in list(forms)}
    forms |= {json.dumps(form)[1:-1] for form in list(forms)}
    digits = re.sub(r"\D", "", canary)
    if len(digits) >= 10 and not re.search(r"[A-Za-z]", canary):
        forms.add(digits)
    return forms


VARIANTS = {canary: _variants(canary) for canary in CANARIES}


def leaks(text: str, canaries: Iterable[str] = CANARIES) -> list[str]:
    """The canaries (by their sent form) that ``text`` contains in any of their forms."""
    return [canary for canary in canaries if any(form in text for form in VARIANTS[canary])]


def test_the_detector_finds_every_form() -> None:
    """The search works: each canary is found as sent, upper-cased, percent-encoded and JSON-escaped."""
    for canary in CANARIES:
        for form in (canary, canary.upper(), quote(canary, safe=""), json.dumps(canary.lower())):
            assert leaks(f"x {form} y", [canary]) == [canary], (canary, form)
    assert leaks("trace 0af7651916cd43dd8448eb211c80319c route /api/v1/orders/{orderId}") == []


# ── the upstream: answers with more personal data ──────────────────────────────────────────


async def _answer(request: web.Request) -> web.Response:
    """Answer like MES, plus customer fields, a cookie and a personal header."""
    body = await request.read()
    try:
        sent = json.loads(body) if body else None
    except ValueError:
        sent = None
    status = sent.get("status") if isinstance(sent, dict) else None
    response = web.json_response(
        {
            "orderId": request.match_info["tail"],
            "status": status if isinstance(status, str) else "MANUFACTURING_STARTED",
            "customer": {"fullName": RESPONSE_NAME, "email": RESPONSE_EMAIL, "phone": RESPONSE_PHONE},
            "payment": {"card": CARD_PLAIN},
            "note": f"call {RESPONSE_PHONE} or write to {RESPONSE_EMAIL}",
        }
    )
    response.headers.add("Set-Cookie", f"sid={SET_COOKIE}; Path=/; HttpOnly")
    response.headers["X-Customer-Email"] = RESPONSE_EMAIL
    return response


@pytest.fixture
async def canary_upstream() -> AsyncIterator[str]:
    """A real upstream on loopback that puts personal data in every answer; yields its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _answer)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


# ── the requests ───────────────────────────────────────────────────────────────────────────

PERSONAL_HEADERS = {
    "X-User-Id": USER_ID,
    "Authorization": f"Bearer {JWT}",
    "Cookie": f"session={COOKIE}; theme=dark",
    "X-Customer-Name": NAME,
    "X-Customer-Phone": PHONE_RU,
    "X-Custom-Secret": CUSTOM_HEADER,
    "User-Agent": f"crm/1.0 (+{EMAIL})",
    "Accept": "application/json",
}
NESTED_BODY = {
    "status": "PACKAGING",
    "fullName": NAME,
    "email": EMAIL,
    "customer": {"name": NAME_RU, "email": EMAIL, "phone": PHONE_RU, "card": CARD},
    "items": [{"engraving": f"for {NAME}", "contact": PHONE_RU_8, "phone": PHONE_RU_PLAIN}],
    "payment": {"pan": CARD_DASHED},
}


#: A trusted caller's trace context: its tracestate holds an e-mail and a phone between vendor entries.
CALLER_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE_ID}-b7ad6b7169203331-01"
CALLER_TRACESTATE = f"rojo=00f067aa0ba902b7,crm={EMAIL},tel={PHONE_RU},congo=t61rcWkgMzE"
#: What is left of it: the vendor entries, in order.
CLEAN_TRACESTATE = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"


def _query(**params: str) -> str:
    return "&".join(f"{name}={quote(value, safe='')}" for name, value in params.items())


#: (method, target, JSON body or None, headers): every place personal data can sit in a request.
REQUESTS: tuple[tuple[str, str, object, Mapping[str, str]], ...] = (
    # E-mail as the order id path segment; personal and allow-listed query values; nested body.
    (
        "PUT",
        f"/api/v1/orders/{quote(EMAIL, safe='')}/status?"
        + _query(status=PHONE_INTL, page="1", email=EMAIL, phone=PHONE_RU, customerName=NAME),
        NESTED_BODY,
        PERSONAL_HEADERS,
    ),
    # A phone number as a path segment, a card in an allow-listed query value.
    (
        "GET",
        f"/api/v1/orders/{quote(PHONE_RU, safe='')}?" + _query(sort=CARD, size=CARD_PLAIN, q=NAME),
        None,
        {"X-User-Id": USER_ID},
    ),
    # Personal status values set by the body (top level), read back from the response.
    ("PATCH", f"/api/v1/orders/{CARD_DASHED}", {"status": EMAIL, "customerEmail": EMAIL}, {}),
    ("POST", "/api/v1/orders", {"orderId": CARD_PLAIN, "status": PHONE_RU_8, "customer": NAME}, {}),
    # A clean order: the positive control (its id and observed status must show up), from a
    # caller whose tracestate carries personal data among its vendor entries.
    (
        "GET",
        "/api/v1/orders/ORD-CLEAN-1",
        None,
        {
            "Authorization": f"Bearer {JWT}",
            "traceparent": CALLER_TRACEPARENT,
            "tracestate": CALLER_TRACESTATE,
        },
    ),
    # No rule matches: the fallback span still scrubs the path and drops unlisted parameters.
    (
        "GET",
        f"/customers/{quote(EMAIL, safe='')}/cards/{CARD.replace(' ', '%20')}/{PHONE_RU_8.replace(' ', '-')}?"
        + _query(name=NAME, status=EMAIL),
        None,
        {"Cookie": f"session={COOKIE}"},
    ),
)


async def _send_all(client: aiohttp.ClientSession, base: str) -> None:
    for method, target, body, headers in REQUESTS:
        data = json.dumps(body).encode() if body is not None else None
        sent_headers = dict(headers)
        if data is not None:
            sent_headers["Content-Type"] = "application/json"
        async with client.request(method, base + target, data=data, headers=sent_headers) as resp:
            assert resp.status == 200, (method, target, resp.status)
            await resp.read()
    # The same nested body once more, chunked (no Content-Length): inspected under the cap.
    chunks = [json.dumps(NESTED_BODY).encode()[i : i + 50] for i in range(0, 400, 50)]

    async def chunked() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    tail = json.dumps(NESTED_BODY).encode()[400:]

    async def whole() -> AsyncIterator[bytes]:
        async for chunk in chunked():
            yield chunk
        yield tail

    async with client.put(
        f"{base}/api/v1/orders/ORD-CHUNKED/status",
        data=whole(),
        headers={"Content-Type": "application/json", **PERSONAL_HEADERS},
    ) as resp:
        assert resp.status == 200
        await resp.read()


REQUEST_COUNT = len(REQUESTS) + 1


SENT_ORDER_IDS: Final = ("ORD-CLEAN-1", "ORD-CHUNKED", EMAIL, PHONE_RU, CARD_DASHED, CARD_PLAIN, "[REDACTED]")


async def _admin_texts(
    proxy: ProxyProcess, client: aiohttp.ClientSession, order_ids: Iterable[str] = SENT_ORDER_IDS
) -> dict[str, str]:
    """Every admin endpoint's answer: the fixed GET routes, and order lookups by every id sent."""
    paths: list[str] = []
    for method, route in ROUTE_ROLES:
        if method != "GET":
            continue
        if "{order_id}" in route:
            paths.extend(route.replace("{order_id}", quote(order_id, safe="")) for order_id in order_ids)
        else:
            paths.append(route)
    texts = {}
    for path in paths:
        async with client.get(proxy.admin_url + path) as resp:
            texts[path] = f"{resp.status} {dict(resp.headers)} {await resp.text()}"
    return texts


async def test_no_canary_leaves_the_proxy(canary_upstream: str, otlp_sink: OtlpSink) -> None:
    """Spans, logs, metrics and admin pages of a real proxy process hold none of the canaries,
    and enduser.id is the keyed pseudonym, never the raw user id."""
    args = [
        "--upstream",
        canary_upstream,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--state",
        "memory",
        "--log-level",
        "debug",
    ]
    env = otlp_env(otlp_sink) | {"MES_PROXY_USER_ID_KEY": USER_KEY}
    async with proxy_process(args, env) as proxy, aiohttp.ClientSession() as client:
        await _send_all(client, proxy.url())
        spans = await otlp_sink.wait_for_spans(2 * REQUEST_COUNT, timeout=WAIT)
        access_lines: list[dict[str, object]] = []
        async with asyncio.timeout(WAIT):
            while True:  # the child's output is read by a pump task; wait for every access line
                access_lines = [
                    line for line in proxy.json_lines() if line.get("logger") == "mes_trace_proxy.access"
                ]
                if len(access_lines) >= REQUEST_COUNT:
                    break
                await asyncio.sleep(0.02)
        async with client.get(proxy.admin_url + "/metrics") as resp:
            metrics_text = await resp.text()
        admin_texts = await _admin_texts(proxy, client)
    log_text = "\n".join(proxy.lines)  # everything printed, including the shutdown

    span_text = json.dumps([span.to_json_dict() for span in spans], ensure_ascii=False, default=str)
    assert leaks(span_text) == []
    assert leaks(log_text) == []
    assert leaks(metrics_text) == []
    for path, text in admin_texts.items():
        assert leaks(text) == [], path

    # Positive controls: the collection saw real data, so an empty search means something.
    servers = [span for span in spans if span.kind == "SERVER"]
    assert len(servers) == REQUEST_COUNT
    clean = next(span for span in servers if span.attributes.get("mes.order.id") == "ORD-CLEAN-1")
    assert clean.attributes["mes.order.status.observed"] == "MANUFACTURING_STARTED"
    assert clean.trace_id == CALLER_TRACE_ID
    assert clean.trace_state == CLEAN_TRACESTATE
    assert "/api/v1/orders/{orderId}" in span_text
    assert 'route="/api/v1/orders/{orderId}/status"' in metrics_text
    assert len(access_lines) == REQUEST_COUNT
    assert admin_texts["/config"].startswith("200 ")

    # enduser.id: the HMAC pseudonym of X-User-Id, or of the JWT's sub when that header is absent.
    pseudonyms = {span.attributes.get("enduser.id") for span in servers} - {None}
    assert pseudonyms == {
        pseudonymize(USER_KEY.encode(), USER_ID),
        pseudonymize(USER_KEY.encode(), JWT_SUBJECT),
    }


async def test_without_a_key_there_is_no_user_id_and_one_log_line_says_so(
    canary_upstream: str,
    otlp_sink: OtlpSink,
    make_config: MakeConfig,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With no user-id key no span carries enduser.id, and start-up logs that exactly once."""
    with caplog.at_level(logging.INFO, logger="mes_trace_proxy.server"):
        proxy = await start_proxy(make_config(canary_upstream), environ=otlp_env(otlp_sink))
    async with aiohttp.ClientSession() as client:
        await _send_all(client, proxy.url("ingress"))
    spans = await otlp_sink.wait_for_spans(2 * REQUEST_COUNT, timeout=WAIT)
    assert all("enduser.id" not in span.attributes for span in spans)
    notices = [r for r in caplog.records if "enduser.id is not recorded" in r.getMessage()]
    assert len(notices) == 1


# ── generated bodies and paths around the canaries ────────────────────────────────────────

_NOISE = st.text(alphabet=st.sampled_from("abcdefghij KLMNOP-_.,:;!"), max_size=12)
_PATTERN = st.sampled_from(PATTERN_CANARIES)
_NAMES = st.sampled_from((NAME, NAME_RU, RESPONSE_NAME, USER_ID))
#: A value that may be recorded: an e-mail, phone or card inside ordinary text.
_SURROUNDED = st.builds(
    lambda before, canary, after: f"{before} {canary} {after}".strip(), _NOISE, _PATTERN, _NOISE
)
_PERSONAL_KEYS = st.sampled_from(
    ("name", "fullName", "first_name", "Email", "phone", "address", "customerRef")
)
_NEUTRAL_KEYS = st.sampled_from(("note", "comment", "items", "meta", "lines"))
_LEAF = st.one_of(_SURROUNDED, _PATTERN, st.integers(), st.booleans(), st.none())
_JSON = st.recursive(
    _LEAF,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(_NEUTRAL_KEYS, children, max_size=3),
        st.dictionaries(_PERSONAL_KEYS, st.one_of(children, _NAMES), max_size=2),
    ),
    max_leaves=8,
)


@st.composite
def _exchanges(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """A request: a method and target with canaries in path and query, and a JSON body around them."""
    segment = draw(st.one_of(_PATTERN, _SURROUNDED, st.just("ORD-1")))
    status = draw(st.one_of(_SURROUNDED, st.just("PACKAGING")))
    body = {
        "status": status,
        **draw(st.dictionaries(st.one_of(_NEUTRAL_KEYS, _PERSONAL_KEYS), _JSON, max_size=4)),
    }
    query = _query(status=draw(_SURROUNDED), name=draw(_NAMES), page="2")
    path = draw(
        st.sampled_from(
            (
                f"/api/v1/orders/{quote(segment, safe='')}/status",
                f"/api/v1/orders/{quote(segment, safe='')}",
                f"/elsewhere/{quote(segment, safe='')}/x",
            )
        )
    )
    method = "PUT" if path.endswith("/status") else draw(st.sampled_from(("GET", "PATCH", "POST")))
    return method, f"{path}?{query}", json.dumps(body, ensure_ascii=draw(st.booleans())).encode()


async def test_generated_requests_leak_nothing(
    canary_upstream: str, otlp_sink: OtlpSink, make_config: MakeConfig, start_proxy: StartProxy
) -> None:
    """Hypothesis-made bodies, paths and queries around the canaries never put one into a span."""
    # otlp_sink is requested before start_proxy, so the proxy's final flush still finds it.
    proxy = await start_proxy(make_config(canary_upstream), environ=otlp_env(otlp_sink))
    base = proxy.url("ingress")
    loop = asyncio.get_running_loop()

    async def one(method: str, target: str, body: bytes) -> list[ReceivedSpan]:
        # Hypothesis seeds the global random module per example, and the SDK draws trace ids
        # from it: ids repeat across examples, so spans are told apart by clearing between them.
        otlp_sink.clear()
        async with (
            aiohttp.ClientSession() as client,
            client.request(
                method,
                base + target,
                data=body,
                headers={"Content-Type": "application/json", **PERSONAL_HEADERS},
            ) as resp,
        ):
            await resp.read()
        return await otlp_sink.wait_for_spans(2, timeout=WAIT)

    # Hypothesis drives from a worker thread; each example runs on this loop, where the proxy lives.
    @settings(
        max_examples=30,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(_exchanges())
    def check(exchange: tuple[str, str, bytes]) -> None:
        spans = asyncio.run_coroutine_threadsafe(one(*exchange), loop).result(WAIT)
        text = json.dumps([span.to_json_dict() for span in spans], ensure_ascii=False, default=str)
        assert leaks(text) == [], exchange

    await asyncio.to_thread(check)


# ── the caller's tracestate ────────────────────────────────────────────────────────────────


async def test_tracestate_personal_members_are_neither_exported_nor_forwarded(otlp_sink: OtlpSink) -> None:
    """A trusted caller's tracestate members holding an e-mail or a phone are dropped from both
    spans and from the tracestate sent upstream; the vendor entries around them stay, in order."""
    forwarded: list[list[str]] = []

    async def record(request: web.Request) -> web.Response:
        forwarded.append(request.headers.getall("tracestate", []))
        return web.json_response({"orderId": "ORD-TS-1", "status": "PACKAGING"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    upstream = TestServer(app, host="127.0.0.1", port=0)
    await upstream.start_server()
    args = ["--upstream", f"http://127.0.0.1:{upstream.port}", "--listen", "127.0.0.1:0"]
    args += ["--admin-listen", "127.0.0.1:0", "--state", "memory"]
    # Two fields, as a caller behind another proxy may send them: one list, combined in order.
    first, _, second = CALLER_TRACESTATE.partition(",tel=")
    headers = [("traceparent", CALLER_TRACEPARENT), ("tracestate", first), ("tracestate", "tel=" + second)]
    try:
        async with (
            proxy_process(args, otlp_env(otlp_sink)) as proxy,
            aiohttp.ClientSession(headers=headers) as client,
            client.get(proxy.url() + "/api/v1/orders/ORD-TS-1") as resp,
        ):
            assert resp.status == 200
            await resp.read()
        spans = await otlp_sink.wait_for_spans(2, timeout=WAIT)
    finally:
        await upstream.close()
    assert sorted(span.kind for span in spans) == ["CLIENT", "SERVER"]
    for span in spans:
        assert span.trace_id == CALLER_TRACE_ID
        assert span.trace_state == CLEAN_TRACESTATE, span.kind
    assert forwarded == [[CLEAN_TRACESTATE]]
    text = json.dumps([span.to_json_dict() for span in spans], default=str) + repr(forwarded)
    assert leaks(text) == []


# ── personal data hidden by Unicode or written in RFC 5321's rarer forms (issue 15) ────────

NBSP: Final = "\u00a0"
#: (canary, tell): each written so that a pattern reading ASCII alone misses it, or finds only
#: part of it; the tell is the part such a partial find would leave behind.
HIDDEN: Final = (
    (f"+7{NBSP}912{NBSP}345{NBSP}67{NBSP}01", "79123456701"),  # phone spaced with no-break spaces
    (f"8{NBSP}(912){NBSP}345-67-02", "89123456702"),  # a national shape, the same
    ("ivanzw\u200bcanary@example.org", "ivanzw"),  # zero-width space in the local part
    ("softhyphen\u00adcanary@example.org", "softhyphen"),  # soft hyphen
    ("fullwidthcanary\uff20example.org", "fullwidthcanary"),  # fullwidth commercial at
    ('"quoted canary"@example.org', "quoted canary"),  # RFC 5321 quoted local part
    ("literalcanary@[192.0.2.17]", "literalcanary"),  # IPv4 address literal
    ("literalsixcanary@[IPv6:2001:db8::17]", "literalsixcanary"),  # IPv6 address literal
)


def hidden_leaks(text: str) -> list[str]:
    """The hidden canaries ``text`` holds: as sent or as folded, in any form of :func:`_variants`,
    or the tell a partial redaction would leave."""
    lowered = text.lower()
    found = []
    for canary, tell in HIDDEN:
        forms = _variants(canary) | _variants(fold(canary))
        if any(form in text for form in forms) or tell in lowered:
            found.append(canary)
    return found


def test_the_hidden_canary_detector_finds_every_form() -> None:
    """The search works: each hidden canary is found as sent, folded, encoded, and by its tell alone."""
    for canary, tell in HIDDEN:
        for form in (canary, fold(canary), quote(canary, safe=""), json.dumps(canary), f"x{tell.upper()}x"):
            assert hidden_leaks(f"x {form} y") == [canary], (canary, form)
    assert hidden_leaks(f"ORD-HIDDEN-0 [REDACTED] 0af7651916cd43dd8448eb211c80319c {NBSP}") == []


async def test_hidden_personal_data_leaves_the_proxy_nowhere(
    canary_upstream: str, otlp_sink: OtlpSink
) -> None:
    """No-break-spaced phones, e-mails with U+200B, U+00AD or U+FF20 inside, quoted local parts and
    address literals, sent in url.path (an order id and a path no rule knows), allow-listed query
    values (url.query), an allow-listed header and the status a rule reads from the body: none
    reaches a span, a log line, /metrics or an admin page of a real proxy process."""
    args = [*("--upstream", canary_upstream, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")]
    args += ["--state", "memory", "--log-level", "debug"]
    sent = 0
    async with proxy_process(args, otlp_env(otlp_sink)) as proxy, aiohttp.ClientSession() as client:
        base = proxy.url()
        for index, (canary, _tell) in enumerate(HIDDEN):
            encoded = quote(canary, safe="")
            query = f"status={encoded}&sort={encoded}&page=1"
            headers = {"X-Request-Id": canary, "User-Agent": f"crm/1.0 ({canary})"}
            for method, target, body in (
                ("GET", f"/api/v1/orders/{encoded}?{query}", None),
                ("GET", f"/customers/{encoded}/orders?{query}", None),
                ("PUT", f"/api/v1/orders/ORD-HIDDEN-{index}/status?{query}", {"status": canary}),
            ):
                async with client.request(method, base + target, json=body, headers=headers) as resp:
                    assert resp.status == 200, (method, target, resp.status)
                    await resp.read()
                sent += 1
        spans = await otlp_sink.wait_for_spans(2 * sent, timeout=WAIT)
        async with asyncio.timeout(WAIT):
            while True:  # the child's output is read by a pump task; wait for every access line
                if (
                    len([r for r in proxy.json_lines() if r.get("logger") == "mes_trace_proxy.access"])
                    >= sent
                ):
                    break
                await asyncio.sleep(0.02)
        async with client.get(proxy.admin_url + "/metrics") as resp:
            metrics_text = await resp.text()
        order_ids = [canary for canary, _ in HIDDEN] + [f"ORD-HIDDEN-{i}" for i in range(len(HIDDEN))]
        admin_texts = await _admin_texts(proxy, client, order_ids)
    span_text = json.dumps([span.to_json_dict() for span in spans], ensure_ascii=False, default=str)
    assert hidden_leaks(span_text) == []
    assert hidden_leaks(json.dumps([span.to_json_dict() for span in spans], default=str)) == []
    assert hidden_leaks("\n".join(proxy.lines)) == []
    assert hidden_leaks(metrics_text) == []
    for path, text in admin_texts.items():
        assert hidden_leaks(text) == [], path
    # Positive controls: every request made its spans, and the values were recorded, as the marker.
    servers = [span for span in spans if span.kind == "SERVER"]
    assert len(servers) == sent
    fallback = [
        span for span in servers if str(span.attributes.get("url.path", "")).startswith("/customers/")
    ]
    assert len(fallback) == len(HIDDEN)
    assert all(span.attributes["url.path"] == "/customers/[REDACTED]/orders" for span in fallback)
    assert all("status=[REDACTED]" in str(span.attributes.get("url.query")) for span in servers)
    assert admin_texts["/orders/ORD-HIDDEN-0"].startswith("200 ")
