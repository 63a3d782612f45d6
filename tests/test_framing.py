"""Tests for framing: nothing ambiguous reaches MES (issue 15, part 2).

The pure policy is tested with tables. The invariants and the desync gadget table run through
a real proxy process to :class:`tests.strict_upstream.StrictUpstream`, which parses what it gets
strictly by RFC 9112 and records every message byte for byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

import pytest
import pytest_asyncio

from mes_trace_proxy.forwarding import ForwardPolicy, upstream_request_headers
from mes_trace_proxy.framing import (
    HOP_BY_HOP,
    LOOKALIKES,
    NameAction,
    UnderscorePolicy,
    check_framing,
    is_token,
    lookalike_names,
    name_action_parser,
)
from tests.proxy_process import ProxyProcess, proxy_process
from tests.strict_upstream import Answer, StrictUpstream, read_response

# ── the token grammar, defined once ──────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("X-Request-Id", True),
        ("x_custom", True),
        ("!#$%&'*+-.^_`|~09azAZ", True),
        ("", False),
        ("X Request", False),
        ("X-Request-Id\n", False),  # "^...$" with re.match would take this one
        ("Name:", False),
        ("Näme", False),
        ('"quoted"', False),
    ],
)
def test_is_token(text: str, ok: bool) -> None:
    """RFC 9110 §5.6.2 tchar only, the whole string, no trailing newline."""
    assert is_token(text) is ok


# ── the lookalike names ─────────────────────────────────────────────────────────────────


def test_lookalike_names_are_every_underscore_spelling() -> None:
    """Each '-' may be '_' (at least one is); names without '-' have no lookalike."""
    assert lookalike_names({"x-forwarded-for"}) == {"x_forwarded_for", "x-forwarded_for", "x_forwarded-for"}
    assert lookalike_names({"transfer-encoding", "te", "connection"}) == {"transfer_encoding"}


@pytest.mark.parametrize(
    "name",
    [
        "Transfer_Encoding",
        "CONTENT_LENGTH",
        "Keep_Alive",
        "Proxy_Connection",
        "Proxy_Authorization",
        "proxy_authenticate",
        "X_Forwarded_For",
        "X-Forwarded_Proto",
        "x_forwarded-host",
        "Sec_WebSocket_Key",
    ],
)
def test_reserved_lookalikes(name: str) -> None:
    """The issue's names, in any case and any mix of '-' and '_', are lookalikes."""
    assert name.lower() in LOOKALIKES


@pytest.mark.parametrize(
    "name", ["X_Custom", "transfer_encoding_x", "te_", "content__length", "X-Request-Id"]
)
def test_other_names_are_not_lookalikes(name: str) -> None:
    """Only a name that folds exactly onto a reserved field is a lookalike."""
    assert name.lower() not in LOOKALIKES


# ── the policy ──────────────────────────────────────────────────────────────────────────


def test_name_action_parser() -> None:
    """Config values: case and spaces ignored; another value names the allowed ones."""
    parse = name_action_parser(NameAction.DROP, NameAction.REFUSE)
    assert parse(" Refuse ") is NameAction.REFUSE
    with pytest.raises(ValueError, match="'pass': use drop or refuse"):
        parse("pass")


def test_lookalikes_can_never_pass() -> None:
    """A policy that would forward lookalikes cannot be built."""
    with pytest.raises(ValueError, match="never forwarded"):
        UnderscorePolicy(lookalikes=NameAction.PASS)


@pytest.mark.parametrize(
    ("lookalikes", "others", "dropped", "drop_all", "refuse_lookalikes", "refuse_all"),
    [
        (NameAction.DROP, NameAction.PASS, True, False, False, False),
        (NameAction.REFUSE, NameAction.PASS, False, False, True, False),
        (NameAction.DROP, NameAction.DROP, True, True, False, False),
        (NameAction.REFUSE, NameAction.DROP, False, True, True, False),
        (NameAction.DROP, NameAction.REFUSE, False, False, True, True),
    ],
)
def test_policy_derivation(
    lookalikes: NameAction,
    others: NameAction,
    dropped: bool,
    drop_all: bool,
    refuse_lookalikes: bool,
    refuse_all: bool,
) -> None:
    """Refusing every name with '_' refuses the lookalikes too; a refused lookalike is not dropped."""
    policy = UnderscorePolicy(lookalikes=lookalikes, others=others)
    assert (policy.dropped == LOOKALIKES, policy.drop_all) == (dropped, drop_all)
    assert (policy.refuse_lookalikes, policy.refuse_all) == (refuse_lookalikes, refuse_all)


DEFAULT_NAMES: Final = UnderscorePolicy()
REFUSE_LOOKALIKES: Final = UnderscorePolicy(lookalikes=NameAction.REFUSE)
REFUSE_ALL: Final = UnderscorePolicy(others=NameAction.REFUSE)


@pytest.mark.parametrize(
    ("headers", "chunked", "policy", "status"),
    [
        pytest.param([("Transfer-Encoding", "chunked")], True, DEFAULT_NAMES, None, id="chunked"),
        pytest.param([("transfer-encoding", "CHUNKED")], True, DEFAULT_NAMES, None, id="chunked-case"),
        pytest.param([("Transfer-Encoding", " , chunked,")], True, DEFAULT_NAMES, None, id="empty-elements"),
        pytest.param([("Transfer-Encoding", "gzip, chunked")], True, DEFAULT_NAMES, 400, id="gzip-chunked"),
        pytest.param([("Transfer-Encoding", "identity, chunked")], True, DEFAULT_NAMES, 400, id="identity"),
        pytest.param([("Transfer-Encoding", "chunked;x=1")], True, DEFAULT_NAMES, 400, id="parameter"),
        pytest.param(
            [("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")],
            True,
            DEFAULT_NAMES,
            400,
            id="two-fields",
        ),
        pytest.param(
            [("Transfer_Encoding", "chunked")], False, DEFAULT_NAMES, None, id="lookalike-dropped-later"
        ),
        pytest.param(
            [("Transfer_Encoding", "chunked")], False, REFUSE_LOOKALIKES, 400, id="lookalike-refused"
        ),
        pytest.param([("X_Forwarded-For", "10.0.0.1")], False, REFUSE_LOOKALIKES, 400, id="xff-refused"),
        pytest.param([("X_Custom", "1")], False, REFUSE_LOOKALIKES, None, id="other-passes"),
        pytest.param([("X_Custom", "1")], False, REFUSE_ALL, 400, id="other-refused"),
        pytest.param([("X-Custom", "1")], False, REFUSE_ALL, None, id="no-underscore"),
    ],
)
def test_check_framing(
    headers: list[tuple[str, str]], chunked: bool, policy: UnderscorePolicy, status: int | None
) -> None:
    """Only chunked alone frames a body; names with '_' are refused only where the policy says."""
    refused = check_framing(headers, chunked=chunked, policy=policy)
    assert (None if refused is None else refused.status) == status
    if refused is not None:
        assert "_Custom" not in refused.detail
        assert "Transfer_" not in refused.detail


def _forward(headers: list[tuple[str, str]], names: UnderscorePolicy, *, upgrade: bool = False) -> list[str]:
    policy = ForwardPolicy(upstream_host="mes", forwarded_headers=False, underscore=names)
    out = upstream_request_headers(
        headers, policy=policy, client_ip="127.0.0.1", scheme="http", host="mes", upgrade=upgrade
    )
    return [name for name, _ in out]


SENT: Final = [
    ("Host", "mes"),
    ("Transfer_Encoding", "chunked"),
    ("CONTENT_LENGTH", "0"),
    ("x-forwarded_for", "10.0.0.1"),
    ("X_Custom", "1"),
    ("X-Custom", "2"),
]


@pytest.mark.parametrize("upgrade", [False, True], ids=["request", "upgrade"])
def test_lookalikes_dropped_and_other_names_kept_by_default(upgrade: bool) -> None:
    """By default only the lookalikes go; X_Custom reaches MES as sent."""
    names = _forward(SENT, DEFAULT_NAMES, upgrade=upgrade)
    assert [n for n in names if n != "Connection"] == ["Host", "X_Custom", "X-Custom"]


def test_every_name_with_underscore_dropped_when_asked() -> None:
    """others=drop is nginx's underscores_in_headers off."""
    assert _forward(SENT, UnderscorePolicy(others=NameAction.DROP)) == ["Host", "X-Custom"]


def test_hop_by_hop_names_have_no_lookalike_left_behind() -> None:
    """Every hyphenated hop-by-hop field has its lookalikes in the table."""
    for name in HOP_BY_HOP:
        assert lookalike_names({name}) <= LOOKALIKES


# ── through a real proxy to a strict upstream ────────────────────────────────────────────

LOOPBACK_ARGS: Final = ("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--state", "memory")
STEP: Final = 10.0  # every socket wait; a hang fails the case, not the suite


@dataclass(slots=True)
class Stage:
    """One strict upstream and the proxy in front of it."""

    upstream: StrictUpstream
    proxy: ProxyProcess

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.proxy.listeners["ingress"].rsplit(":", 1)
        return host, int(port)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stage() -> AsyncIterator[Stage]:
    """The default proxy (lookalikes dropped, other '_' names passed) in front of the strict upstream."""
    async with (
        StrictUpstream() as upstream,
        proxy_process(
            [*LOOPBACK_ARGS, "--upstream", upstream.url], {"OTEL_TRACES_EXPORTER": "none"}
        ) as proxy,
    ):
        yield Stage(upstream, proxy)
    assert upstream.violations == []


async def _talk(stage: Stage, *messages: bytes) -> list[Answer | None]:
    """Send each message on one connection, reading one answer after each (None: the
    connection ended), then whatever else the proxy still answers."""
    reader, writer = await asyncio.open_connection(*stage.address)
    answers: list[Answer | None] = []
    try:
        async with asyncio.timeout(STEP):
            for message in messages:
                try:
                    writer.write(message)
                    await writer.drain()
                except ConnectionError:
                    pass
                try:
                    answers.append(await read_response(reader))
                except ConnectionError:
                    answers.append(None)
            if answers[-1] is not None and not answers[-1].closes:
                writer.write_eof()
            while answers[-1] is not None:
                try:
                    answers.append(await read_response(reader))
                except ConnectionError:
                    answers.append(None)
    finally:
        writer.close()
    return answers


def _get(request_id: str) -> bytes:
    return f"GET /echo/{request_id} HTTP/1.1\r\nHost: mes\r\nX-Request-Id: {request_id}\r\n\r\n".encode()


def _seen(stage: Stage, request_id: str) -> list[str]:
    """The framing of each message the upstream saw with this id."""
    return [s.framing for s in stage.upstream.seen if s.header("X-Request-Id") == request_id]


def _is_problem(answer: Answer | None, status: int = 400) -> bool:
    return (
        answer is not None
        and answer.status == status
        and answer.header("Content-Type") == "application/problem+json"
    )


def _closing_problem(answer: Answer | None) -> bool:
    return _is_problem(answer) and answer is not None and answer.closes


def _chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Sent:
    """An ordinary request and how it must reach MES."""

    id: str
    head: bytes  # the fields after Host and X-Request-Id
    body: bytes
    framing: str  # length | chunked | none
    payload: bytes  # the body MES must get


BIG: Final = bytes(range(256)) * 800  # 200 KiB: streamed, not sent with the head
ORDINARY: Final = (
    Sent("get", b"", b"", "none", b""),
    Sent("post-length", b"Content-Length: 5\r\n", b"hello", "length", b"hello"),
    Sent("post-empty", b"Content-Length: 0\r\n", b"", "length", b""),
    Sent("post-chunked", b"Transfer-Encoding: chunked\r\n", _chunked(b"hel", b"lo"), "chunked", b"hello"),
    Sent("post-comma-chunked", b"Transfer-Encoding: , chunked\r\n", _chunked(b"hi"), "chunked", b"hi"),
    Sent("post-big-length", b"Content-Length: %d\r\n" % len(BIG), BIG, "length", BIG),
    Sent(
        "post-big-chunked",
        b"Transfer-Encoding: chunked\r\n",
        _chunked(BIG[:70000], BIG[70000:]),
        "chunked",
        BIG,
    ),
    Sent(
        "put-json-read-by-rule",
        b"Content-Type: application/json\r\nContent-Length: 20\r\n",
        b'{"status":"in_work"}',
        "length",
        b'{"status":"in_work"}',
    ),
    Sent(
        "lookalikes-beside-length",
        b"Content-Length: 5\r\nTransfer_Encoding: chunked\r\nContent_Length: 99\r\nKeep_Alive: 1\r\n"
        b"Proxy_Connection: keep-alive\r\nX_Forwarded_For: 10.9.9.9\r\nX-Forwarded_Proto: https\r\n"
        b"x_forwarded_host: bank.example\r\nX_Custom: kept\r\n",
        b"hello",
        "length",
        b"hello",
    ),
    Sent(
        "lookalikes-beside-chunked",
        b"Transfer-Encoding: chunked\r\nContent_Length: 1\r\nTRANSFER_ENCODING: identity\r\n",
        _chunked(b"hello"),
        "chunked",
        b"hello",
    ),
)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("sent", ORDINARY, ids=[s.id for s in ORDINARY])
async def test_exactly_one_framing_reaches_mes(sent: Sent, stage: Stage) -> None:
    """Each request reaches MES once, strictly well formed, with one framing that matches its body,
    no lookalike, and the other '_' names as sent."""
    method = (
        b"PUT /api/v1/orders/A-1/status" if sent.id.startswith("put") else b"POST /echo/" + sent.id.encode()
    )
    if sent.id == "get":
        method = b"GET /echo/get"
    request = method + b" HTTP/1.1\r\nHost: mes\r\nX-Request-Id: " + sent.id.encode() + b"\r\n" + sent.head
    answers = await _talk(stage, request + b"\r\n" + sent.body, _get(f"{sent.id}-after"))
    assert [a.echo_id() if a else None for a in answers] == [sent.id, f"{sent.id}-after", None]
    [seen] = [s for s in stage.upstream.seen if s.header("X-Request-Id") == sent.id]
    assert (seen.framing, seen.body) == (sent.framing, sent.payload)
    if seen.framing == "length":
        assert seen.names().count("content-length") == 1
        assert seen.header("Content-Length") == str(len(sent.payload))
        assert "transfer-encoding" not in seen.names()
    elif seen.framing == "chunked":
        assert seen.header("Transfer-Encoding") == "chunked"
        assert seen.names().count("transfer-encoding") == 1
        assert "content-length" not in seen.names()
    assert not set(seen.names()) & LOOKALIKES
    if b"X_Custom" in sent.head:
        assert seen.header("X_Custom") == "kept"
    for line in seen.raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        assert b"\x00" not in line
        assert b"\r" not in line
        assert b"\n" not in line
        assert line[:1] not in (b" ", b"\t")
    assert stage.upstream.violations == []


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(
    ("case", "head"),
    [
        ("cl-and-te", b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"),
        ("te-and-cl", b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"),
        ("te-gzip-chunked", b"Transfer-Encoding: gzip, chunked\r\n"),
        ("te-identity-chunked", b"Transfer-Encoding: identity, chunked\r\n"),
    ],
)
async def test_ambiguous_framing_is_refused_and_the_connection_closed(
    case: str, head: bytes, stage: Stage
) -> None:
    """RFC 9112 §6.1: both fields (or a coding the proxy would drop) get a 400 and the
    connection closes after it; nothing reaches MES and the request after it is not read."""
    request = (
        b"POST /echo/" + case.encode() + b" HTTP/1.1\r\nHost: mes\r\nX-Request-Id: " + case.encode() + b"\r\n"
    )
    answers = await _talk(stage, request + head + b"\r\n" + _chunked(b"hello"), _get(f"{case}-after"))
    assert _is_problem(answers[0])
    assert answers[0] is not None
    assert answers[0].closes
    assert answers[1:] == [None]
    assert _seen(stage, case) == []
    assert _seen(stage, f"{case}-after") == []


@pytest.mark.asyncio(loop_scope="module")
async def test_http10_chunked_is_framed_by_te_and_closed(stage: Stage) -> None:
    """RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 request frames it, and the connection closes."""
    request = (
        b"POST /echo/h10 HTTP/1.0\r\nHost: mes\r\nX-Request-Id: h10\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    answers = await _talk(stage, request + _chunked(b"hello"))
    assert answers[0] is not None
    assert answers[0].echo_id() == "h10"
    assert answers[0].closes or (answers[0].header("Connection") or "").lower() != "keep-alive"
    assert answers[1:] == [None]
    assert _seen(stage, "h10") == ["chunked"]


# ── the strict upstream can tell: what it must refuse, sent to it directly ─────────────

HEAD: Final = b"POST /x HTTP/1.1\r\nHost: mes\r\n"
#: (id, raw message): each one a lenient server could read in two ways; the strict upstream
#: must record it as a violation, or the invariants above could not fail.
AMBIGUOUS: Final = (
    ("cl-and-te", HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(b"hello")),
    ("te-not-chunked-alone", HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + _chunked(b"hello")),
    ("te-doubled", HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("cl-doubled", HEAD + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
    ("cl-list", HEAD + b"Content-Length: 5, 5\r\n\r\nhello"),
    ("cl-plus", HEAD + b"Content-Length: +5\r\n\r\nhello"),
    ("lookalike", HEAD + b"Content-Length: 5\r\nTransfer_Encoding: chunked\r\n\r\nhello"),
    ("lookalike-forwarded", HEAD + b"X_Forwarded_For: 10.0.0.1\r\n\r\n"),
    ("hop-by-hop", HEAD + b"Keep-Alive: timeout=5\r\n\r\n"),
    ("folded-line", HEAD + b"X-Pad: 1\r\n folded\r\n\r\n"),
    ("bare-lf", HEAD + b"X-Pad: 1\nX-Other: 2\r\n\r\n"),
    ("bare-cr", HEAD + b"X-Pad: 1\rX-Other: 2\r\n\r\n"),
    ("nul-in-value", HEAD + b"X-Pad: a\x00b\r\n\r\n"),
    ("space-before-colon", HEAD + b"X-Pad : 1\r\n\r\n"),
    ("bad-chunk-size", HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
    ("trailer", HEAD + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX-Trailer: 1\r\n\r\n"),
)


@pytest.mark.asyncio(loop_scope="module")
async def test_the_strict_upstream_refuses_every_ambiguous_message() -> None:
    """Each message above, sent straight to a StrictUpstream, is a recorded violation answered 400,
    never a request it saw; an ordinary request on its own connection is seen (the control)."""
    async with StrictUpstream() as upstream:
        host, port = upstream.url.removeprefix("http://").rsplit(":", 1)
        cases = (*AMBIGUOUS, ("ordinary", HEAD + b"Content-Length: 5\r\n\r\nhello"))
        for index, (case_id, message) in enumerate(cases):
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                async with asyncio.timeout(STEP):
                    writer.write(message)
                    await writer.drain()
                    answer = await read_response(reader)
            finally:
                writer.close()
            assert answer is not None, case_id
            assert answer.status == (200 if case_id == "ordinary" else 400), case_id
            # One violation per ambiguous message, recorded before its answer was written.
            assert len(upstream.violations) == min(index + 1, len(AMBIGUOUS)), case_id
    assert [s.body for s in upstream.seen] == [b"hello"]


# ── the desync gadgets public smuggling scanners send ────────────────────────────────────

#: the bytes a CL.TE or TE.CL probe tries to leave behind on MES's connection
SMUGGLED: Final = (
    b"GPOST /smuggled HTTP/1.1\r\nHost: mes\r\nX-Request-Id: smuggled\r\nContent-Length: 0\r\n\r\n"
)
REFUSED: Final = "refused"  # 400 problem, the connection closes, nothing reaches MES
FORWARDED: Final = "forwarded"  # the probe and the request after it each get their own answer
# The proxy framed the probe one way and forwarded exactly that; the rest of what the caller
# sent is read as the next request on the caller's own connection, refused, and the connection
# closes. MES saw one well-formed message, or none when the rest arrived in the same read.
OWN_LEFTOVER: Final = "own-leftover"


@dataclass(frozen=True, slots=True)
class Gadget:
    """A field line as scanners vary it, and what each probe must come to."""

    id: str
    #: replaces the Transfer-Encoding line (``te``) or the Content-Length line (``cl``, with
    #: ``%d`` for the length)
    line: bytes
    target: str
    cl_te: str
    te_cl: str


def _te(case_id: str, line: bytes, cl_te: str = REFUSED, te_cl: str = REFUSED) -> Gadget:
    return Gadget(case_id, line, "te", cl_te, te_cl)


def _cl(case_id: str, line: bytes, cl_te: str = REFUSED, te_cl: str = REFUSED) -> Gadget:
    return Gadget(case_id, line, "cl", cl_te, te_cl)


GADGETS: Final = (
    # the field itself, in every case: with a Content-Length beside it, refused
    _te("te-plain", b"Transfer-Encoding: chunked"),
    _te("te-upper", b"TRANSFER-ENCODING: CHUNKED"),
    _te("te-lower", b"transfer-encoding: chunked"),
    _te("te-mixed-value", b"Transfer-Encoding: ChUnKeD"),
    # whitespace and control characters before, inside and after the name and the value
    _te("te-no-space", b"Transfer-Encoding:chunked"),
    _te("te-tab-value", b"Transfer-Encoding:\tchunked"),
    _te("te-trailing-space", b"Transfer-Encoding: chunked "),
    _te("te-trailing-tab", b"Transfer-Encoding: chunked\t"),
    _te("te-space-before-colon", b"Transfer-Encoding : chunked"),
    _te("te-tab-before-colon", b"Transfer-Encoding\t: chunked"),
    _te("te-leading-space", b" Transfer-Encoding: chunked"),
    _te("te-leading-tab", b"\tTransfer-Encoding: chunked"),
    _te("te-vt-before-value", b"Transfer-Encoding:\x0bchunked"),
    _te("te-ff-before-value", b"Transfer-Encoding:\x0cchunked"),
    _te("te-nbsp-before-value", b"Transfer-Encoding:\xa0chunked"),
    _te("te-nul-after-value", b"Transfer-Encoding: chunked\x00"),
    _te("te-vt-after-value", b"Transfer-Encoding: chunked\x0b"),
    _te("te-cr-after-value", b"Transfer-Encoding: chunked\r"),
    _te("te-del-after-value", b"Transfer-Encoding: chunked\x7f"),
    _te("te-xff-after-value", b"Transfer-Encoding: chunked\xff"),
    _te("te-nul-in-value", b"Transfer-Encoding: chu\x00nked"),
    _te("te-nul-in-name", b"Transfer-Encoding\x00: chunked"),
    _te("te-x85-in-name", b"Transfer-Encoding\x85: chunked"),
    _te("te-space-in-name", b"Transfer -Encoding: chunked"),
    _te("te-bare-lf-before", b"X-Pad: 1\nTransfer-Encoding: chunked"),
    _te("te-bare-cr-before", b"X-Pad: 1\rTransfer-Encoding: chunked"),
    _te("te-name-then-crlf", b"Transfer-Encoding\r\n: chunked"),
    # quoting
    _te("te-dquoted", b'Transfer-Encoding: "chunked"'),
    _te("te-squoted", b"Transfer-Encoding: 'chunked'"),
    # chunked among other codings, and near-misses
    _te("te-xchunked", b"Transfer-Encoding: xchunked"),
    _te("te-chunkedx", b"Transfer-Encoding: chunkedx"),
    _te("te-chunked-identity", b"Transfer-Encoding: chunked, identity"),
    _te("te-identity-chunked", b"Transfer-Encoding: identity, chunked"),
    _te("te-gzip-chunked", b"Transfer-Encoding: gzip, chunked"),
    _te("te-chunked-twice", b"Transfer-Encoding: chunked, chunked"),
    _te("te-empty-element", b"Transfer-Encoding: , chunked"),
    # doubled fields
    _te("te-doubled-identity-after", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity"),
    _te("te-doubled-identity-before", b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked"),
    _te("te-doubled-same", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked"),
    # line folding (obs-fold, RFC 9112 §5.2)
    _te("te-folded-value", b"Transfer-Encoding:\r\n chunked"),
    _te("te-folded-into-previous", b"X-Pad: 1\r\n Transfer-Encoding: chunked"),
    # "_" and space joins: the proxy's parser reads no framing in "Transfer_Encoding", a CGI/WSGI
    # server reads Transfer-Encoding; it is dropped, so Content-Length frames the probe on both
    # hops. In TE.CL that length is short: the rest is the caller's own next "request".
    _te("te-underscore", b"Transfer_Encoding: chunked", FORWARDED, OWN_LEFTOVER),
    _te("te-underscore-upper", b"TRANSFER_ENCODING: chunked", FORWARDED, OWN_LEFTOVER),
    _te("te-space-join", b"Transfer Encoding: chunked"),
    # Content-Length variants beside a plain Transfer-Encoding
    _cl("cl-plain", b"Content-Length: %d"),
    _cl("cl-upper", b"CONTENT-LENGTH: %d"),
    _cl("cl-space-before-colon", b"Content-Length : %d"),
    _cl("cl-vt-before-value", b"Content-Length:\x0b%d"),
    _cl("cl-plus", b"Content-Length: +%d"),
    _cl("cl-list", b"Content-Length: %d, %d"),
    _cl("cl-doubled", b"Content-Length: %d\r\nContent-Length: %d"),
    _cl("cl-folded", b"Content-Length:\r\n %d"),
    _cl("cl-space-join", b"Content Length: %d"),
    # "Content_Length" is dropped, so Transfer-Encoding frames the probe on both hops; in CL.TE
    # the chunked body ends early and the rest is the caller's own next "request".
    _cl("cl-underscore", b"Content_Length: %d", OWN_LEFTOVER, FORWARDED),
)

OUTCOMES: Final = [(g, "cl.te") for g in GADGETS] + [(g, "te.cl") for g in GADGETS]


def _probe(gadget: Gadget, shape: str, probe_id: str) -> bytes:
    """A CL.TE probe (the length covers a chunked end and SMUGGLED) or a TE.CL probe (the length
    covers only the first chunk-size line); each is complete whichever framing a reader picks."""
    if shape == "cl.te":
        body = b"0\r\n\r\n" + SMUGGLED
        length = len(body)
    else:
        body = _chunked(SMUGGLED)
        length = body.index(b"\r\n") + 2
    te_line = b"Transfer-Encoding: chunked"
    cl_line = b"Content-Length: %d" % length
    if gadget.target == "te":
        te_line = gadget.line
    else:
        cl_line = gadget.line.replace(b"%d", b"%d" % length)
    return (
        b"POST /echo/probe HTTP/1.1\r\nHost: mes\r\nX-Request-Id: "
        + probe_id.encode()
        + b"\r\n"
        + cl_line
        + b"\r\n"
        + te_line
        + b"\r\n\r\n"
        + body
    )


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("gadget", "shape"), OUTCOMES, ids=[f"{g.id}-{s}" for g, s in OUTCOMES])
async def test_desync_gadget(gadget: Gadget, shape: str, stage: Stage) -> None:
    """A probe, then a second request on the same connection, then one on a fresh connection
    (which MES gets on the pooled connection the probe used): every answer is its own request's
    or a refusal that closes the caller's connection; MES never saw an ambiguous message, nor
    the bytes the probe tried to leave behind."""
    probe_id = f"{gadget.id}-{shape}"
    second_id = f"{probe_id}-second"
    expected = gadget.cl_te if shape == "cl.te" else gadget.te_cl
    answers = await _talk(stage, _probe(gadget, shape, probe_id), _get(second_id))
    if expected == REFUSED:
        assert _closing_problem(answers[0])
        assert answers[1:] == [None]
        assert _seen(stage, probe_id) == []
    elif expected == FORWARDED:
        assert [a.echo_id() if a else None for a in answers] == [probe_id, second_id, None]
    else:
        # When the leftover arrives in the same read as the probe, the parser's refusal of it
        # ends the connection before the probe is served: then nothing reaches MES at all.
        if answers[0] is not None and answers[0].status == 200:
            assert answers[0].echo_id() == probe_id
            answers = answers[1:]
        else:
            assert _seen(stage, probe_id) == []
        assert _closing_problem(answers[0])
        assert answers[1:] == [None]
    for seen in [s for s in stage.upstream.seen if s.header("X-Request-Id") == probe_id]:
        assert not set(seen.names()) & LOOKALIKES
        assert seen.framing in ("length", "chunked")
    assert len(_seen(stage, probe_id)) <= 1
    fresh = await _talk(stage, _get(f"{probe_id}-fresh"))
    assert [a.echo_id() if a else None for a in fresh] == [f"{probe_id}-fresh", None]
    assert stage.upstream.violations == []
    assert all(
        s.header("X-Request-Id") != "smuggled" and "smuggled" not in s.target for s in stage.upstream.seen
    )


def test_gadget_ids_are_distinct() -> None:
    """A failure names exactly one gadget."""
    assert len({g.id for g in GADGETS}) == len(GADGETS)


# ── the settings, through a real proxy ────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Setting:
    """A listener's '_' settings and what each kind of name must come to."""

    id: str
    flags: tuple[str, ...]
    lookalike: str  # dropped | refused
    other: str  # passed | dropped | refused


SETTINGS: Final = (
    Setting("default", (), "dropped", "passed"),
    Setting("refuse-lookalikes", ("--underscore-lookalikes", "refuse"), "refused", "passed"),
    Setting("drop-all", ("--underscore-headers", "drop"), "dropped", "dropped"),
    Setting(
        "refuse-lookalikes-drop-others",
        ("--underscore-lookalikes", "refuse", "--underscore-headers", "drop"),
        "refused",
        "dropped",
    ),
    Setting("refuse-all", ("--underscore-headers", "refuse"), "refused", "refused"),
)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("setting", SETTINGS, ids=[s.id for s in SETTINGS])
async def test_underscore_settings(setting: Setting) -> None:
    """Each setting does what docs/security.md says to a lookalike, to another '_' name and to
    a request without either; a refusal is a 400 problem that closes the connection."""
    async with (
        StrictUpstream() as upstream,
        proxy_process(
            [*LOOPBACK_ARGS, "--upstream", upstream.url, *setting.flags], {"OTEL_TRACES_EXPORTER": "none"}
        ) as proxy,
    ):
        stage = Stage(upstream, proxy)
        for kind, field_line, outcome in (
            ("lookalike", "Transfer_Encoding: chunked", setting.lookalike),
            ("other", "X_Custom: 1", setting.other),
            ("plain", "X-Custom: 1", "passed"),
        ):
            request_id = f"{setting.id}-{kind}"
            request = (
                f"POST /echo/{kind} HTTP/1.1\r\nHost: mes\r\nX-Request-Id: {request_id}\r\n"
                f"Content-Length: 5\r\n{field_line}\r\n\r\nhello"
            ).encode()
            answers = await _talk(stage, request)
            if outcome == "refused":
                assert _closing_problem(answers[0])
                assert answers[1:] == [None]
                assert _seen(stage, request_id) == []
                continue
            assert [a.echo_id() if a else None for a in answers] == [request_id, None]
            [seen] = [s for s in upstream.seen if s.header("X-Request-Id") == request_id]
            name = field_line.split(":", 1)[0]
            assert (seen.header(name) is not None) is (outcome == "passed")
            assert (seen.framing, seen.body) == ("length", b"hello")
        assert upstream.violations == []
