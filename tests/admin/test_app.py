"""The admin listener on real sockets: liveness, readiness that follows the upstream, metrics."""

from __future__ import annotations

import socket

import aiohttp

from tests.conftest import MakeConfig, StartProxy
from tests.upstream import RecordingUpstream


async def test_healthz_and_readyz_when_upstream_answers(
    make_config: MakeConfig, start_proxy: StartProxy, recording_upstream: tuple[str, RecordingUpstream]
) -> None:
    """A bound proxy whose upstream accepts connections is alive and ready."""
    base, _ = recording_upstream
    proxy = await start_proxy(make_config(base))
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.admin_url}/healthz") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok"}
        async with client.get(f"{proxy.admin_url}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200
            assert body["upstreams"] == {"ingress": "reachable"}
        async with client.get(f"{proxy.url('ingress')}/api/v1/health") as resp:
            assert resp.status == 200
        async with client.get(f"{proxy.admin_url}/readyz") as resp:
            assert (await resp.json())["upstreams"] == {"ingress": "answering"}


async def test_readyz_fails_while_upstream_is_unreachable(
    make_config: MakeConfig, start_proxy: StartProxy
) -> None:
    """Readiness reports 503 and names the listener whose upstream refuses connections."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        proxy = await start_proxy(make_config(f"http://127.0.0.1:{port}"))
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{proxy.admin_url}/readyz") as resp:
                body = await resp.json()
            assert resp.status == 503
            assert body["problems"] == ["upstream of ingress unreachable"]
            async with client.get(f"{proxy.admin_url}/healthz") as resp:
                assert resp.status == 200


async def test_metrics_expose_requests_and_span_counters(
    make_config: MakeConfig, start_proxy: StartProxy, recording_upstream: tuple[str, RecordingUpstream]
) -> None:
    """/metrics is Prometheus text with per-route request counts and export counters, no order ids."""
    base, _ = recording_upstream
    proxy = await start_proxy(make_config(base))
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.put(
                f"{proxy.url('ingress')}/api/v1/orders/SECRET-ORDER-42/status", json={"status": "PACKAGING"}
            ) as resp:
                assert resp.status == 200
        async with client.get(f"{proxy.admin_url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    assert (
        'mes_proxy_requests_total{code="200",listener="ingress",method="PUT",'
        'route="/api/v1/orders/{orderId}/status"} 3.0'
    ) in text
    assert "mes_orders{" in text
    assert "SECRET-ORDER-42" not in text
    # The scrape counts the loop's tasks: at least its own handler is running.
    tasks = next(line for line in text.splitlines() if line.startswith("mes_proxy_event_loop_tasks "))
    assert float(tasks.split()[1]) >= 1


async def test_egress_upstream_down_does_not_make_the_pod_unready(
    make_config: MakeConfig, start_proxy: StartProxy, recording_upstream: tuple[str, RecordingUpstream]
) -> None:
    """A dead CRM behind the egress listener is reported but leaves MES's pod ready."""
    base, _ = recording_upstream
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        config = make_config(base, egress_listen="127.0.0.1:0", egress_upstream=f"http://127.0.0.1:{port}")
        proxy = await start_proxy(config)
        async with aiohttp.ClientSession() as client, client.get(f"{proxy.admin_url}/readyz") as resp:
            body = await resp.json()
        assert resp.status == 200
        assert body["upstreams"] == {"ingress": "reachable", "egress": "unreachable"}
