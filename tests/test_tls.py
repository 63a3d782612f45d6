"""TLS on real sockets: HTTPS listeners, live certificate reload (SIGHUP and file change), upstream mTLS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509

from mes_trace_proxy.config import ConfigError, ServerTls, UpstreamTls
from mes_trace_proxy.tls import CertReloader, ClientCertReloader, client_context, server_context
from tests.certs import TestCA
from tests.conftest import MakeConfig, StartProxy
from tests.proxy_process import proxy_process
from tests.upstream import RecordingUpstream

# Every wait below is bounded; on this machine each condition is met in milliseconds.
WAIT = 10.0


@pytest.fixture
def ca() -> TestCA:
    """A fresh throwaway CA."""
    return TestCA()


def _trusting(ca: TestCA) -> ssl.SSLContext:
    """A client context that trusts only ``ca``."""
    return ssl.create_default_context(cadata=ca.cert_pem.decode())


async def _served_serial(host: str, port: int, context: ssl.SSLContext) -> int:
    """Handshake with a TLS server and return the serial number of the certificate it presented."""
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=context, server_hostname="localhost"), WAIT
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def _until(condition: Callable[[], bool]) -> None:
    """Wait, bounded by WAIT, until ``condition()`` holds (a file watcher or a child's log has no event)."""
    async with asyncio.timeout(WAIT):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


def _split(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


def test_unusable_pair_names_the_configured_key(tmp_path: Path, ca: TestCA) -> None:
    """A certificate with another certificate's key fails start-up naming the listener's tls key."""
    cert, _ = ca.issue("one").write(tmp_path, "one")
    _, other_key = ca.issue("two").write(tmp_path, "two")
    with pytest.raises(ConfigError) as info:
        server_context(ServerTls(cert_file=str(cert), key_file=str(other_key), source="listeners[0].tls"))
    assert info.value.key == "listeners[0].tls"
    with pytest.raises(ConfigError) as missing:
        client_context(
            UpstreamTls(
                ca_file=str(tmp_path / "absent.crt"),
                cert_file=None,
                key_file=None,
                verify=True,
                source="--upstream-ca",
            )
        )
    assert missing.value.key == "--upstream-ca"


async def test_https_listener_serves_the_pair_and_forwards(
    tmp_path: Path,
    ca: TestCA,
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
) -> None:
    """With --tls-cert/--tls-key the listener speaks HTTPS; upstream hears X-Forwarded-Proto: https."""
    base, upstream = recording_upstream
    issued = ca.issue("proxy")
    cert, key = issued.write(tmp_path, "proxy")
    proxy = await start_proxy(make_config(base, tls_cert=str(cert), tls_key=str(key)))
    url = proxy.url("ingress")
    assert url.startswith("https://")
    connector = aiohttp.TCPConnector(ssl=_trusting(ca))
    async with (
        aiohttp.ClientSession(connector=connector) as client,
        client.get(f"{url}/api/v1/orders/A-1") as resp,
    ):
        assert resp.status == 200
    assert upstream.last().header("X-Forwarded-Proto") == "https"
    assert await _served_serial(*_split(url), _trusting(ca)) == issued.serial


async def _get_status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """One keep-alive GET on an open connection; returns the status after reading the whole answer."""
    writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: mes\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await asyncio.wait_for(reader.readexactly(length), WAIT)
    return int(head.split(b" ", 2)[1])


async def test_reload_switches_new_handshakes_and_keeps_open_connections(
    tmp_path: Path,
    ca: TestCA,
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
) -> None:
    """After the files are replaced and reload runs, new handshakes get the new serial; a kept-alive
    connection from before goes on working."""
    base, _ = recording_upstream
    first, second = ca.issue("first"), ca.issue("second")
    cert, key = first.write(tmp_path, "proxy")
    proxy = await start_proxy(make_config(base, tls_cert=str(cert), tls_key=str(key)))
    host, port = _split(proxy.url("ingress"))
    reader, writer = await asyncio.open_connection(host, port, ssl=_trusting(ca), server_hostname="localhost")
    try:
        assert await _get_status(reader, writer) == 200
        second.write(tmp_path, "proxy")
        proxy.reload()
        assert await _served_serial(host, port, _trusting(ca)) == second.serial
        # The connection made with the first certificate is still served.
        assert await _get_status(reader, writer) == 200
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def test_a_bad_new_certificate_keeps_the_current_one(
    tmp_path: Path,
    ca: TestCA,
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reload that finds a broken pair logs an error without key material and serves the old one."""
    base, _ = recording_upstream
    first, stranger = ca.issue("first"), ca.issue("stranger")
    cert, key = first.write(tmp_path, "proxy")
    proxy = await start_proxy(make_config(base, tls_cert=str(cert), tls_key=str(key)))
    host, port = _split(proxy.url("ingress"))
    # A new certificate with the old key: a half-finished rotation.
    cert.write_bytes(stranger.cert_pem)
    with caplog.at_level(logging.ERROR, logger="mes_trace_proxy.tls"):
        assert proxy.certificates["ingress"].reload() is False
    assert await _served_serial(host, port, _trusting(ca)) == first.serial
    errors = [r for r in caplog.records if r.name == "mes_trace_proxy.tls" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "BEGIN" not in str(vars(errors[0]))


async def test_changed_files_are_picked_up_without_a_signal(tmp_path: Path, ca: TestCA) -> None:
    """The watcher task notices replaced files and new handshakes present the new certificate."""
    first, second = ca.issue("first"), ca.issue("second")
    cert, key = first.write(tmp_path, "proxy")
    reloader = CertReloader(
        "ingress", ServerTls(cert_file=str(cert), key_file=str(key), source="t"), interval=0.02
    )
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0, ssl=reloader.context)
    port = server.sockets[0].getsockname()[1]
    reloader.start()
    try:
        assert await _served_serial("127.0.0.1", port, _trusting(ca)) == first.serial
        # Written to new files and renamed over the old, as Kubernetes secret volumes do.
        second.write(tmp_path, "next")
        (tmp_path / "next.crt").replace(cert)
        (tmp_path / "next.key").replace(key)
        await _until(lambda: reloader.generation == 1)
        assert await _served_serial("127.0.0.1", port, _trusting(ca)) == second.serial
    finally:
        await reloader.aclose()
        server.close()
        await server.wait_closed()


async def test_sighup_reloads_a_running_process(
    tmp_path: Path, ca: TestCA, recording_upstream: tuple[str, RecordingUpstream]
) -> None:
    """A real SIGHUP to a serving process makes its next handshake present the replaced certificate."""
    base, _ = recording_upstream
    first, second = ca.issue("first"), ca.issue("second")
    cert, key = first.write(tmp_path, "proxy")
    args = [
        "--upstream",
        base,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--state",
        "memory",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
    ]
    async with proxy_process(args, {"OTEL_TRACES_EXPORTER": "none"}) as proc:
        host, port = proc.listeners["ingress"].rsplit(":", 1)
        assert await _served_serial(host, int(port), _trusting(ca)) == first.serial
        second.write(tmp_path, "proxy")
        proc.process.send_signal(signal.SIGHUP)
        await _until(
            lambda: any(line.get("message") == "TLS certificate reloaded" for line in proc.json_lines())
        )
        assert await _served_serial(host, int(port), _trusting(ca)) == second.serial


# ── upstream TLS and mTLS ──────────────────────────────────────────────────────────────────


@contextlib.asynccontextmanager
async def _tls_upstream(
    ca: TestCA, tmp_path: Path, *, require_client: bool, close: bool = False
) -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTPS upstream on loopback; yields its URL and the client-certificate CNs it saw.

    With ``close``, every answer closes its connection, so each request is a new handshake.
    """
    seen: list[str] = []

    async def whoami(request: web.Request) -> web.Response:
        assert request.transport is not None
        peer = request.transport.get_extra_info("peercert") or {}
        names = [value for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"]
        seen.extend(names)
        response = web.json_response({"client": names})
        if close:
            response.force_close()
        return response

    cert, key = ca.issue("mes").write(tmp_path, "mes")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if require_client:
        context.load_verify_locations(cadata=ca.cert_pem.decode())
        context.verify_mode = ssl.CERT_REQUIRED
    app = web.Application()
    app.router.add_get("/{tail:.*}", whoami)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_upstream_mtls_presents_the_client_certificate(
    tmp_path: Path, ca: TestCA, make_config: MakeConfig, start_proxy: StartProxy
) -> None:
    """With a CA bundle and a client pair, the proxy reaches an upstream that requires client certificates."""
    ca_file = ca.write(tmp_path)
    client_cert, client_key = ca.issue("mes-trace-proxy", client=True).write(tmp_path, "client")
    async with _tls_upstream(ca, tmp_path, require_client=True) as (url, seen):
        config = make_config(
            url, upstream_ca=str(ca_file), upstream_cert=str(client_cert), upstream_key=str(client_key)
        )
        proxy = await start_proxy(config)
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"{proxy.url('ingress')}/api/v1/health") as resp,
        ):
            assert resp.status == 200
            assert await resp.json() == {"client": ["mes-trace-proxy"]}
    assert seen == ["mes-trace-proxy"]


async def test_upstream_refuses_a_proxy_without_client_certificate(
    tmp_path: Path, ca: TestCA, make_config: MakeConfig, start_proxy: StartProxy
) -> None:
    """Without the client pair the mTLS upstream never serves the request; the caller gets a 502."""
    ca_file = ca.write(tmp_path)
    async with _tls_upstream(ca, tmp_path, require_client=True) as (url, seen):
        proxy = await start_proxy(make_config(url, upstream_ca=str(ca_file)))
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"{proxy.url('ingress')}/api/v1/health") as resp,
        ):
            assert resp.status == 502
            assert resp.content_type == "application/problem+json"
    assert seen == []


async def test_upstream_from_an_unknown_ca_is_a_tls_error(
    tmp_path: Path, ca: TestCA, make_config: MakeConfig, start_proxy: StartProxy
) -> None:
    """An https:// upstream whose certificate no trusted CA signed is refused: 502 upstream_tls_error."""
    other_ca = TestCA("someone else").write(tmp_path, "other")
    async with _tls_upstream(ca, tmp_path, require_client=False) as (url, seen):
        proxy = await start_proxy(make_config(url, upstream_ca=str(other_ca)))
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"{proxy.url('ingress')}/api/v1/health") as resp,
        ):
            body = await resp.json(content_type=None)
        assert resp.status == 502
        assert body["type"].endswith("upstream_tls_error")
    assert seen == []


# ── upstream client certificate rotation ────────────────────────────────────────────────────


async def _client_seen_through(url: str) -> list[str]:
    """The client-certificate CNs the upstream reports for one call through the proxy."""
    async with aiohttp.ClientSession() as client, client.get(f"{url}/api/v1/health") as resp:
        assert resp.status == 200
        body = await resp.json()
    names: list[str] = body["client"]
    return names


async def test_upstream_client_certificate_rotates_on_reload(
    tmp_path: Path, ca: TestCA, make_config: MakeConfig, start_proxy: StartProxy
) -> None:
    """Replaced client files and a reload (what SIGHUP runs): the next upstream handshake presents
    the new client certificate, with no restart."""
    ca_file = ca.write(tmp_path)
    cert, key = ca.issue("proxy-2026-a", client=True).write(tmp_path, "client")
    async with _tls_upstream(ca, tmp_path, require_client=True, close=True) as (url, seen):
        config = make_config(url, upstream_ca=str(ca_file), upstream_cert=str(cert), upstream_key=str(key))
        proxy = await start_proxy(config)
        assert await _client_seen_through(proxy.url("ingress")) == ["proxy-2026-a"]
        ca.issue("proxy-2026-b", client=True).write(tmp_path, "client")
        proxy.reload()
        assert proxy.upstream_certificates["ingress"].generation == 1
        assert await _client_seen_through(proxy.url("ingress")) == ["proxy-2026-b"]
    assert seen == ["proxy-2026-a", "proxy-2026-b"]


async def test_a_bad_new_client_pair_keeps_the_current_one(
    tmp_path: Path,
    ca: TestCA,
    make_config: MakeConfig,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A half-finished rotation (new certificate, old key) is logged without key material; the
    upstream goes on receiving the old client certificate."""
    ca_file = ca.write(tmp_path)
    cert, key = ca.issue("proxy-current", client=True).write(tmp_path, "client")
    async with _tls_upstream(ca, tmp_path, require_client=True, close=True) as (url, _seen):
        config = make_config(url, upstream_ca=str(ca_file), upstream_cert=str(cert), upstream_key=str(key))
        proxy = await start_proxy(config)
        cert.write_bytes(ca.issue("proxy-next", client=True).cert_pem)
        with caplog.at_level(logging.ERROR, logger="mes_trace_proxy.tls"):
            assert proxy.upstream_certificates["ingress"].reload() is False
        assert await _client_seen_through(proxy.url("ingress")) == ["proxy-current"]
    errors = [r for r in caplog.records if r.name == "mes_trace_proxy.tls" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "BEGIN" not in str(vars(errors[0]))


async def test_changed_client_files_are_picked_up_without_a_signal(tmp_path: Path, ca: TestCA) -> None:
    """The watcher notices client files renamed into place (as secret volumes do) and the next
    connection made with its context presents the new certificate."""
    ca_file = ca.write(tmp_path)
    cert, key = ca.issue("first-client", client=True).write(tmp_path, "client")
    tls = UpstreamTls(ca_file=str(ca_file), cert_file=str(cert), key_file=str(key), verify=True, source="t")
    reloader = ClientCertReloader("ingress", tls, interval=0.02)
    reloader.start()
    try:
        async with _tls_upstream(ca, tmp_path, require_client=True, close=True) as (url, seen):
            ca.issue("second-client", client=True).write(tmp_path, "next")
            (tmp_path / "next.crt").replace(cert)
            (tmp_path / "next.key").replace(key)
            await _until(lambda: reloader.generation == 1)
            connector = aiohttp.TCPConnector(ssl=reloader.context)
            async with aiohttp.ClientSession(connector=connector) as client, client.get(url) as resp:
                assert resp.status == 200
        assert seen == ["second-client"]
    finally:
        await reloader.aclose()


async def test_sighup_rotates_the_upstream_client_certificate_of_a_running_process(
    tmp_path: Path, ca: TestCA
) -> None:
    """A real SIGHUP to a serving process: its next upstream handshake presents the replaced client
    certificate; a bad pair at the next SIGHUP is logged and the last good one stays."""
    ca_file = ca.write(tmp_path)
    cert, key = ca.issue("process-a", client=True).write(tmp_path, "client")
    async with _tls_upstream(ca, tmp_path, require_client=True, close=True) as (url, seen):
        args = [
            *("--upstream", url, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"),
            *("--state", "memory", "--upstream-ca", str(ca_file)),
            *("--upstream-cert", str(cert), "--upstream-key", str(key)),
        ]
        async with proxy_process(args, {"OTEL_TRACES_EXPORTER": "none"}) as proc:
            assert await _client_seen_through(proc.url()) == ["process-a"]
            ca.issue("process-b", client=True).write(tmp_path, "client")
            proc.process.send_signal(signal.SIGHUP)
            await _until(
                lambda: any(
                    line.get("message") == "upstream TLS client certificate reloaded"
                    for line in proc.json_lines()
                )
            )
            assert await _client_seen_through(proc.url()) == ["process-b"]
            key.write_bytes(ca.issue("stranger", client=True).key_pem)
            proc.process.send_signal(signal.SIGHUP)
            await _until(lambda: any(line.get("level") == "error" for line in proc.json_lines()))
            assert await _client_seen_through(proc.url()) == ["process-b"]
    assert seen == ["process-a", "process-b", "process-b"]
