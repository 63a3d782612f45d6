"""A recording upstream for proxy tests: it keeps what it received, byte for byte, and can misbehave.

Routes under ``/t/`` are test behaviours; every other path records the request and echoes
a small JSON description of it (``/api/v1/...`` paths answer like the reference MES would
for a status change, so order extraction can be driven through a real server).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web


@dataclass(slots=True)
class Received:
    """One request as the upstream saw it."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool

    def header(self, name: str) -> str | None:
        """The first value of a header, case-insensitively."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_names(self) -> set[str]:
        """Lower-cased names of every header received."""
        return {key.lower() for key, _ in self.headers}


@dataclass(slots=True)
class RecordingUpstream:
    """State shared by the handlers: received requests and events tests wait on."""

    received: list[Received] = field(default_factory=list)
    #: set by the slow handler when it was cancelled (the proxy cancelled the upstream call)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    #: set by the slow handler when the request arrived
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)
    #: the slow handler waits on this; tests set it to release it
    release: asyncio.Event = field(default_factory=asyncio.Event)
    #: the SSE handler sends its second event only once this is set
    sse_next: asyncio.Event = field(default_factory=asyncio.Event)
    #: bytes and sha256 of the last streamed upload
    upload: tuple[int, str] = (0, "")

    def last(self) -> Received:
        """The most recent request."""
        return self.received[-1]


STATE = web.AppKey("recording", RecordingUpstream)


async def _record(request: web.Request, body: bytes) -> Received:
    item = Received(
        method=request.method,
        raw_path=request.raw_path,
        headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
        body=body,
        chunked=request.headers.get("Transfer-Encoding", "").lower() == "chunked",
    )
    request.app[STATE].received.append(item)
    return item


async def echo(request: web.Request) -> web.StreamResponse:
    """Record the request; answer with MES-like JSON."""
    body = await request.read()
    await _record(request, body)
    if request.method == "HEAD":
        return web.Response(status=200, headers={"Content-Length": "42", "Content-Type": "application/json"})
    payload: dict[str, object] = {"method": request.method, "path": request.raw_path, "bytes": len(body)}
    try:
        sent = json.loads(body) if body else None
    except ValueError:
        sent = None
    if isinstance(sent, dict) and "status" in sent:
        payload["status"] = sent["status"]
    elif request.method == "GET" and request.path.startswith("/api/v1/orders/"):
        payload["status"] = request.headers.get("X-Test-Status", "MANUFACTURING_STARTED")
    payload["orderId"] = request.match_info.get("tail", "")
    return web.json_response(payload, status=int(request.headers.get("X-Test-Answer", "200")))


async def cookies(request: web.Request) -> web.Response:
    """Answer with three Set-Cookie headers and a hop-by-hop header named in Connection."""
    await _record(request, await request.read())
    response = web.Response(text="ok")
    response.headers.add("Set-Cookie", "a=1; Path=/")
    response.headers.add("Set-Cookie", "b=2; Path=/; HttpOnly")
    response.headers.add("Set-Cookie", "c=3")
    response.headers.add("Connection", "X-Resp-Hop")
    response.headers.add("X-Resp-Hop", "secret")
    response.headers.add("X-Kept", "yes")
    return response


async def upload(request: web.Request) -> web.Response:
    """Consume a body in chunks (never whole), counting bytes and hashing them."""
    digest = hashlib.sha256()
    total = 0
    async for chunk in request.content.iter_chunked(256 * 1024):
        digest.update(chunk)
        total += len(chunk)
    request.app[STATE].upload = (total, digest.hexdigest())
    await _record(request, b"")
    return web.json_response({"bytes": total, "sha256": digest.hexdigest()})


async def download(request: web.Request) -> web.StreamResponse:
    """Stream ``size`` deterministic bytes; chunked unless ``length=1``."""
    size = int(request.query.get("size", "0"))
    response = web.StreamResponse()
    response.content_type = "application/octet-stream"
    if request.query.get("length") == "1":
        response.content_length = size
    await response.prepare(request)
    block = bytes(range(256)) * 1024  # 256 KiB
    remaining = size
    while remaining > 0:
        piece = block[: min(len(block), remaining)]
        await response.write(piece)
        remaining -= len(piece)
    await response.write_eof()
    return response


async def slow(request: web.Request) -> web.Response:
    """Wait until released; note cancellation (a cancelled upstream call)."""
    state = request.app[STATE]
    state.slow_started.set()
    try:
        await state.release.wait()
    except asyncio.CancelledError:
        state.cancelled.set()
        raise
    return web.Response(text="late")


async def sse(request: web.Request) -> web.StreamResponse:
    """Two Server-Sent Events; the second only after the test saw the first through the proxy."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    await response.write(b"data: first\n\n")
    await request.app[STATE].sse_next.wait()
    await response.write(b"data: second\n\n")
    await response.write_eof()
    return response


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """Echo every text and binary frame; record the upgrade request's headers."""
    await _record(request, b"")
    ws = web.WebSocketResponse(protocols=("mes.v1",))
    await ws.prepare(request)
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            await ws.send_str(f"echo:{message.data}")
        elif message.type is WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


async def truncated(request: web.Request) -> web.StreamResponse:
    """Promise ``length`` bytes (default 1000), send 70 KiB at most of them, then drop the connection."""
    length = int(request.query.get("length", "1000"))
    response = web.StreamResponse(headers={"Content-Length": str(length)})
    await response.prepare(request)
    await response.write(b"0123456789" * min(7 * 1024, (length - 1) // 10))
    assert request.transport is not None
    request.transport.close()
    return response


def build_upstream() -> tuple[web.Application, RecordingUpstream]:
    """The recording upstream application and its state."""
    app = web.Application(handler_args={"auto_decompress": False})
    state = RecordingUpstream()
    app[STATE] = state
    app.router.add_route("*", "/t/cookies", cookies)
    app.router.add_route("*", "/t/upload", upload)
    app.router.add_get("/t/download", download)
    app.router.add_get("/t/slow", slow)
    app.router.add_get("/t/sse", sse)
    app.router.add_get("/t/ws", websocket)
    app.router.add_get("/t/truncated", truncated)
    app.router.add_route("*", "/api/v1/orders/{tail:.*}", echo)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app, state
